//! The same `.proto` compiled twice: by tether (into `$OUT_DIR/tether/`) and by tonic (into
//! `$OUT_DIR/`), as in the first step of a migration.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../proto/shop/v1/shop.proto", "../proto/common/v1/money.proto"];
    rpc_proto::configure().compile(&protos, &["../proto"])?;
    let fds = protox::compile(protos, ["../proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
