//! A server that requires a bearer token in request metadata, and a client that sends it (and one
//! that does not), in one process.

use examples::auth::{require_bearer, with_bearer};
use examples::echo::echo_client::EchoClient;
use examples::echo::echo_server::EchoServer;
use examples::echo::EchoRequest;
use examples::services::EchoService;
use rpc_client::{Client, ClientConfig};
use rpc_server::Server;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    examples::cli::init_tracing();
    let server = Server::builder()
        .layer(require_bearer("s3cret"))
        .add_service(EchoServer::new(EchoService::default()))
        .bind("127.0.0.1:0")
        .await?;
    let client = Client::connect(server.local_addr(), ClientConfig::default()).await?;

    let mut authed = EchoClient::new(
        ServiceBuilder::new()
            .layer(with_bearer("s3cret"))
            .service(client.clone()),
    );
    let reply = authed
        .say(EchoRequest {
            message: "with token".into(),
            ..Default::default()
        })
        .await?;
    println!("with token    -> {:?}", reply.into_body().message);

    let mut anonymous = EchoClient::new(client.clone());
    let err = anonymous
        .say(EchoRequest {
            message: "without".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    println!("without token -> {err}");

    client.close();
    server.shutdown().await;
    Ok(())
}
