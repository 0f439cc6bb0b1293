//! The README's quick start, as a newcomer uses it: its Cargo.toml, .proto, build.rs and main.rs
//! copied into a fresh crate outside the workspace, built and run. Also: dropping the
//! `ServerHandle` that `bind` returns is a compile-time warning, not a server gone in silence,
//! and config structs are built with `..Default::default()`, so new settings break no one.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The fenced block after each `<!-- quickstart: NAME -->` marker of the README, by name.
fn quick_start_files(readme: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut rest = readme;
    while let Some(at) = rest.find("<!-- quickstart: ") {
        rest = &rest[at + "<!-- quickstart: ".len()..];
        let end = rest.find(" -->").unwrap();
        let name = rest[..end].to_owned();
        let fence = rest.find("```").unwrap();
        let body_start = fence + rest[fence..].find('\n').unwrap() + 1;
        let body_end = body_start + rest[body_start..].find("```").unwrap();
        files.push((name, rest[body_start..body_end].to_owned()));
        rest = &rest[body_end..];
    }
    files
}

fn cargo(dir: &Path, args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    Command::new(cargo)
        .args(args)
        .current_dir(dir)
        // Its own target directory: the workspace's is locked by the build running this test.
        .env("CARGO_TARGET_DIR", workspace().join("target").join("quickstart"))
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap()
}

#[test]
fn the_readme_quick_start_builds_and_runs_as_a_new_crate() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let files = quick_start_files(&readme);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Cargo.toml", "proto/hello.proto", "build.rs", "src/main.rs"]);
    let dir = tempfile::tempdir().unwrap();
    let checkout = format!("{}/", root.display());
    for (name, text) in &files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text.replace("../tether/", &checkout)).unwrap();
    }
    // The workspace's versions, so the scratch crate builds what the tests built.
    std::fs::copy(root.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();

    let run = cargo(dir.path(), &["run", "--quiet"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the quick start failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        stdout, "hello, world\nINVALID_ARGUMENT (may have executed: true)\n",
        "what the README says it prints"
    );

    // A newcomer's slip: `bind(..).await?;` drops the handle, and with it the server.
    let main = dir.path().join("src/main.rs");
    let text = std::fs::read_to_string(&main).unwrap();
    let slip = text.replacen(
        "async fn main() -> Result<(), Box<dyn std::error::Error>> {",
        "async fn main() -> Result<(), Box<dyn std::error::Error>> {\n    rpc_server::Server::builder().bind(\"127.0.0.1:0\").await?;",
        1,
    );
    assert_ne!(slip, text);
    std::fs::write(&main, format!("#![deny(unused_must_use)]\n{slip}")).unwrap();
    let check = cargo(dir.path(), &["check", "--quiet"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success(),
        "dropping the ServerHandle compiled without a warning"
    );
    assert!(
        stderr.contains("dropping the ServerHandle shuts the server down"),
        "{stderr}"
    );

    // Config structs gain settings without breaking their users: a literal must end in
    // `..Default::default()`, so one naming every field of today's struct does not compile.
    let literal = |tail: &str| {
        format!(
            "{text}\nfn _backoff() -> rpc_client::BackoffConfig {{\n    rpc_client::BackoffConfig {{ initial: std::time::Duration::from_millis(1), multiplier: 2.0, jitter: 0.1, max: std::time::Duration::from_secs(1){tail} }}\n}}\n"
        )
    };
    std::fs::write(&main, literal(", ..Default::default()")).unwrap();
    let check = cargo(dir.path(), &["check", "--quiet"]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    std::fs::write(&main, literal("")).unwrap();
    let check = cargo(dir.path(), &["check", "--quiet"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "an exhaustive config literal compiled");
    assert!(stderr.contains("missing field `__non_exhaustive`"), "{stderr}");
}
