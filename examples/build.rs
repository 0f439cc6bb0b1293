//! Generates the example services from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpc_proto::configure().compile(
        &["proto/echo.proto", "proto/greeter.proto", "proto/feed.proto"],
        &["proto"],
    )?;
    Ok(())
}
