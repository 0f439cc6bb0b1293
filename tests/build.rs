//! Marks the registry tests ignored when etcd is not installed, and the admin page's browser test
//! when chromium is not, so `cargo test` reports them as ignored rather than passed. Under
//! `CI=true` they are never ignored: a missing etcd or chromium fails them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(etcd_missing)");
    println!("cargo::rustc-check-cfg=cfg(chromium_missing)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=TETHER_ETCD");
    println!("cargo::rerun-if-env-changed=PATH");
    // Installing Debian's etcd-server changes /usr/bin.
    println!("cargo::rerun-if-changed=/usr/bin");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !ci && !etcd_installed() {
        println!("cargo::warning=etcd not found (Debian package etcd-server): the registry tests are ignored");
        println!("cargo::rustc-cfg=etcd_missing");
    }
    if !ci && !on_path("chromium") {
        println!(
            "cargo::warning=chromium not found (Debian package chromium): the admin page's browser test is ignored"
        );
        println!("cargo::rustc-cfg=chromium_missing");
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

fn etcd_installed() -> bool {
    if let Ok(bin) = std::env::var("TETHER_ETCD") {
        return std::path::Path::new(&bin).is_file();
    }
    on_path("etcd")
}
