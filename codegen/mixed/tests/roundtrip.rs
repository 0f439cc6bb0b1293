//! The shop services served and called through tether's generated code (well-known types in and
//! out, a message of another package, nested types, oneof, maps, a stream), and the same `.proto`
//! through tonic's code in the same crate.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use codegen_mixed::tether::common::v1::{Currency, Money};
use codegen_mixed::tether::shop::v1::{self as shop, item, Item, ItemRequest};
use futures_util::StreamExt;
use rpc_client::{Client, ClientConfig};
use rpc_server::{Request, Response, Server, Status};

struct Clock;

impl shop::clock_server::Clock for Clock {
    async fn now(&self, _request: Request<()>) -> Result<Response<prost_types::Timestamp>, Status> {
        Ok(Response::new(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }))
    }

    async fn sleep(&self, request: Request<prost_types::Duration>) -> Result<Response<()>, Status> {
        let d = request.into_body();
        if d.seconds < 0 {
            return Err(Status::new(rpc_server::Code::InvalidArgument, "negative"));
        }
        Ok(Response::new(()))
    }
}

fn hammer(currency: Currency) -> Item {
    Item {
        name: "hammer".into(),
        kind: item::Kind::Tool as i32,
        variants: vec![item::Variant {
            sku: "H-1".into(),
            attributes: HashMap::from([("weight".to_owned(), "500g".to_owned())]),
        }],
        price: Some(Money {
            currency: currency as i32,
            units: 12,
            nanos: 500_000_000,
        }),
        stock: Some(item::Stock::Count(3)),
        counters: HashMap::from([("sold".to_owned(), 7)]),
        added: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
    }
}

struct Catalog;

impl shop::catalog_server::Catalog for Catalog {
    async fn get(&self, request: Request<ItemRequest>) -> Result<Response<Item>, Status> {
        let req = request.into_body();
        match req.name.as_str() {
            "hammer" => Ok(Response::new(hammer(req.currency()))),
            _ => Err(Status::new(rpc_server::Code::NotFound, "no such item")),
        }
    }

    async fn price(&self, request: Request<ItemRequest>) -> Result<Response<Money>, Status> {
        let req = request.into_body();
        Ok(Response::new(hammer(req.currency()).price.unwrap()))
    }

    async fn watch(&self, _request: Request<()>) -> Result<Response<rpc_server::codegen::BoxStream<Item>>, Status> {
        let items = futures_util::stream::iter((0..3).map(|i| {
            let mut it = hammer(Currency::Usd);
            it.stock = if i == 2 {
                Some(item::Stock::Unlimited(true))
            } else {
                Some(item::Stock::Count(i))
            };
            Ok(it)
        }));
        Ok(Response::new(Box::pin(items)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tethers_generated_code_round_trips_well_known_types_and_imported_messages() {
    let server = Server::builder()
        .add_service(shop::clock_server::ClockServer::new(Clock))
        .add_service(shop::catalog_server::CatalogServer::new(Catalog))
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    let mut clock = shop::clock_client::ClockClient::new(client.clone());
    let now = clock.now(()).await.unwrap().into_body();
    assert_eq!((now.seconds, now.nanos), (1_700_000_000, 5));
    clock
        .sleep(prost_types::Duration { seconds: 1, nanos: 0 })
        .await
        .unwrap();
    let err = clock
        .sleep(prost_types::Duration { seconds: -1, nanos: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), rpc_client::Code::InvalidArgument);

    let mut catalog = shop::catalog_client::CatalogClient::new(client.clone());
    let req = ItemRequest {
        name: "hammer".into(),
        currency: Currency::Eur as i32,
    };
    let item = catalog.get(req.clone()).await.unwrap().into_body();
    assert_eq!(item, hammer(Currency::Eur));
    let price = catalog.price(req).await.unwrap().into_body();
    assert_eq!((price.currency(), price.units), (Currency::Eur, 12));
    let missing = catalog
        .get(ItemRequest {
            name: "saw".into(),
            currency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), rpc_client::Code::NotFound);

    let catalog = shop::catalog_client::CatalogClient::new(client);
    let stocks: Vec<Option<item::Stock>> = catalog
        .watch(())
        .await
        .unwrap()
        .map(|r| r.unwrap().stock)
        .collect()
        .await;
    assert_eq!(
        stocks,
        vec![
            Some(item::Stock::Count(0)),
            Some(item::Stock::Count(1)),
            Some(item::Stock::Unlimited(true))
        ]
    );
}

struct TonicClock;

#[tonic::async_trait]
impl codegen_mixed::grpc::shop::v1::clock_server::Clock for TonicClock {
    async fn now(
        &self,
        _request: tonic::Request<()>,
    ) -> Result<tonic::Response<prost_types::Timestamp>, tonic::Status> {
        Ok(tonic::Response::new(prost_types::Timestamp { seconds: 42, nanos: 0 }))
    }

    async fn sleep(
        &self,
        _request: tonic::Request<prost_types::Duration>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Ok(tonic::Response::new(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_proto_compiled_for_tonic_in_the_same_crate_serves_too() {
    use codegen_mixed::grpc::shop::v1::{clock_client::ClockClient, clock_server::ClockServer};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClockServer::new(TonicClock))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut clock = ClockClient::connect(format!("http://{addr}")).await.unwrap();
    let now = clock.now(()).await.unwrap().into_inner();
    assert_eq!(now.seconds, 42);
    // The two generated message types are distinct, each framework's own.
    let tether_item = codegen_mixed::tether::shop::v1::Item::default();
    let tonic_item = codegen_mixed::grpc::shop::v1::Item::default();
    assert_eq!(tether_item.name, tonic_item.name);
}
