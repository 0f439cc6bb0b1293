//! Socket options through socket2, in one place for both sides. A failure to set an option is
//! logged with the option's name, never silently ignored; the connection still proceeds, because a
//! missing tuning option should not take a service down.

use std::io;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::TcpConfig;

/// Applies `config` to a connected or accepted socket. Returns the names of options that could not
/// be set (each also logged at `warn`).
pub fn apply_tcp_config(stream: &TcpStream, config: &TcpConfig) -> Vec<&'static str> {
    let sock = SockRef::from(stream);
    let mut failed = Vec::new();
    let mut check = |name: &'static str, r: io::Result<()>| {
        if let Err(e) = r {
            tracing::warn!(option = name, error = %e, "failed to set socket option");
            failed.push(name);
        }
    };
    check("TCP_NODELAY", sock.set_tcp_nodelay(config.nodelay));
    match &config.keepalive {
        Some(k) => {
            let ka = TcpKeepalive::new()
                .with_time(k.time)
                .with_interval(k.interval)
                .with_retries(k.retries);
            check("SO_KEEPALIVE", sock.set_tcp_keepalive(&ka));
        }
        None => check("SO_KEEPALIVE", sock.set_keepalive(false)),
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    check("TCP_USER_TIMEOUT", sock.set_tcp_user_timeout(config.user_timeout));
    if let Some(n) = config.send_buffer_size {
        check("SO_SNDBUF", sock.set_send_buffer_size(n));
    }
    if let Some(n) = config.recv_buffer_size {
        check("SO_RCVBUF", sock.set_recv_buffer_size(n));
    }
    failed
}

/// Reads the options back from the socket with getsockopt: what the kernel actually applied (Linux,
/// for example, doubles buffer sizes). Keepalive fields are read only while SO_KEEPALIVE is on.
pub fn read_tcp_config(stream: &TcpStream) -> io::Result<TcpConfig> {
    let sock = SockRef::from(stream);
    let keepalive = if sock.keepalive()? {
        Some(crate::config::KeepaliveConfig {
            time: sock.tcp_keepalive_time()?,
            interval: sock.tcp_keepalive_interval()?,
            retries: sock.tcp_keepalive_retries()?,
            __non_exhaustive: (),
        })
    } else {
        None
    };
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let user_timeout = sock.tcp_user_timeout()?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let user_timeout = None;
    Ok(TcpConfig {
        nodelay: sock.tcp_nodelay()?,
        keepalive,
        user_timeout,
        send_buffer_size: Some(sock.send_buffer_size()?),
        recv_buffer_size: Some(sock.recv_buffer_size()?),
        __non_exhaustive: (),
    })
}

/// Applies `config`, then reads back what the kernel applied (`None` if the read failed, logged).
pub fn configure_tcp(stream: &TcpStream, config: &TcpConfig) -> Option<TcpConfig> {
    apply_tcp_config(stream, config);
    match read_tcp_config(stream) {
        Ok(applied) => Some(applied),
        Err(e) => {
            tracing::warn!(error = %e, "failed to read socket options back");
            None
        }
    }
}
