//! Opening one connection: TCP connect and handshake, both inside `connect_timeout`.

use std::net::SocketAddr;

use rpc_core::driver::{ConnectionHandle, Driver, DriverConfig};
use rpc_core::event::EventSender;
use rpc_core::frame::Settings;
use rpc_core::metrics::Side;
use rpc_core::socket::configure_tcp;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use crate::config::ClientConfig;
use crate::error::{Error, ErrorKind};

/// Connects to `addr`, applies the socket options, runs the TLS handshake when `tls` is given,
/// spawns the connection's driver and waits for the tether handshake. The whole attempt is bounded
/// by `connect_timeout`, or by `deadline` if earlier.
pub async fn connect(
    addr: SocketAddr,
    config: &ClientConfig,
    tls: Option<&TlsConnector>,
    events: Option<EventSender>,
    deadline: Option<Instant>,
) -> Result<ConnectionHandle, Error> {
    let mut limit = Instant::now() + config.connect_timeout;
    if let Some(d) = deadline {
        limit = limit.min(d);
    }
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect(e), false))?;
        // Socket options go on the TCP socket, before any TLS.
        let tcp_options = configure_tcp(&stream, &config.tcp);
        let handle = match tls {
            None => start(stream, addr, config, tcp_options, events),
            Some(connector) => {
                let name = match config.tls.as_ref().and_then(|t| t.server_name.clone()) {
                    Some(n) => ServerName::try_from(n).map_err(|e| {
                        Error::new(
                            ErrorKind::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)),
                            false,
                        )
                    })?,
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                let tls_stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| Error::new(ErrorKind::Tls(e), false))?;
                start(tls_stream, addr, config, tcp_options, events)
            }
        };
        handle
            .ready()
            .await
            .map_err(|r| Error::new(ErrorKind::Handshake(r), false))?;
        let server_idle = handle.peer_settings().and_then(|s| s.idle_timeout);
        if let Err(e) = config.validate_against(server_idle) {
            tracing::warn!(peer = %addr, error = %e, "server evicts idle connections before this client's heartbeat");
        }
        Ok(handle)
    };
    match tokio::time::timeout_at(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(ErrorKind::ConnectTimeout, false)),
    }
}

/// Spawns the driver for a connected stream (plain or TLS) and returns its handle.
fn start<S>(
    stream: S,
    addr: SocketAddr,
    config: &ClientConfig,
    tcp_options: Option<rpc_core::config::TcpConfig>,
    events: Option<EventSender>,
) -> ConnectionHandle
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut cfg = DriverConfig::new(Side::Client);
    cfg.connection = config.connection;
    cfg.heartbeat = Some(config.heartbeat);
    cfg.tcp_options = tcp_options;
    cfg.peer = Some(addr);
    cfg.events = events;
    cfg.settings = Settings {
        max_frame_size: Some(config.connection.max_frame_size),
        heartbeat_interval: config.heartbeat.enabled.then_some(config.heartbeat.interval),
        max_metadata_entries: Some(u32::try_from(config.connection.max_metadata_entries).unwrap_or(u32::MAX)),
        max_metadata_bytes: Some(u32::try_from(config.connection.max_metadata_bytes).unwrap_or(u32::MAX)),
        features: Some(rpc_core::frame::features::ALL),
        version: Some(rpc_core::frame::PROTOCOL_VERSION),
        stream_window: Some(config.connection.stream_window),
        connection_window: Some(config.connection.connection_window),
        ..Settings::default()
    };
    let (handle, driver) = Driver::client(stream, cfg);
    let span = tracing::info_span!("conn", id = handle.id(), peer = %addr);
    tokio::spawn(driver.run().instrument(span));
    handle
}
