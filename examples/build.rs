//! Generates the example services from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpc_proto::configure().resumable("topic.v1.Topic.Subscribe").compile(
        &[
            "proto/echo.proto",
            "proto/greeter.proto",
            "proto/feed.proto",
            "proto/topic.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
