//! Service implementations used by the examples and the tests.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rpc_core::{Request, Response, Status};

use crate::echo::{echo_server, EchoReply, EchoRequest};
use crate::greeter::v1::{greeter_server, CountReply, CountRequest, HelloReply, HelloRequest};

/// Echoes messages back, after an optional delay (per request, plus a fixed `handler_delay`).
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    /// Added to every request's own `delay_ms`.
    pub handler_delay: Duration,
}

impl echo_server::Echo for EchoService {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let remaining = request.remaining();
        let req = request.into_body();
        let delay = self.handler_delay + Duration::from_millis(u64::from(req.delay_ms));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let payload = if req.reply_size > 0 {
            Bytes::from(vec![0xAB; req.reply_size as usize])
        } else {
            req.payload
        };
        Ok(Response::new(EchoReply {
            message: req.message,
            payload,
            remaining_deadline_ms: remaining.map_or(0, |d| d.as_millis() as u64),
        }))
    }

    async fn fail(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::application(request.into_body().message))
    }
}

/// Greets people and counts them by city.
#[derive(Debug, Clone, Default)]
pub struct GreeterService;

impl greeter_server::Greeter for GreeterService {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let person = request
            .into_body()
            .person
            .ok_or_else(|| Status::invalid_argument("person is required"))?;
        let tags: Vec<String> = person.tags.iter().map(|t| format!("{}={}", t.key, t.value)).collect();
        let greeting = if tags.is_empty() {
            format!("Hello, {}!", person.name)
        } else {
            format!("Hello, {} [{}]!", person.name, tags.join(","))
        };
        Ok(Response::new(HelloReply {
            greeting,
            address: person.address,
        }))
    }

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<CountReply>, Status> {
        let people = request.into_body().people;
        let mut by_city: HashMap<String, u32> = HashMap::new();
        for p in &people {
            let city = p.address.as_ref().map_or_else(String::new, |a| a.city.clone());
            *by_city.entry(city).or_default() += 1;
        }
        Ok(Response::new(CountReply {
            count: people.len() as u32,
            by_city,
        }))
    }
}
