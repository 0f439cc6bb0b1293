//! Only the client side: the generated code names `rpc_client` and never `rpc_server`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpc_proto::configure()
        .build_server(false)
        .compile(&["../proto/shop/v1/shop.proto"], &["../proto"])?;
    Ok(())
}
