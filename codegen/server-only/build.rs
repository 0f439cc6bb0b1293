//! Only the server side: the generated code names `rpc_server` and never `rpc_client`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpc_proto::configure()
        .build_client(false)
        .compile(&["../proto/shop/v1/shop.proto"], &["../proto"])?;
    Ok(())
}
