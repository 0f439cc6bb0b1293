//! Generates the tonic echo service from the examples' `echo.proto` (the same service tether
//! serves), parsed with protox: no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../examples/proto/echo.proto");
    println!("cargo:rerun-if-changed=../examples/proto/feed.proto");
    let fds = protox::compile(
        ["../examples/proto/echo.proto", "../examples/proto/feed.proto"],
        ["../examples/proto"],
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
