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

/// Streams events: `Watch` pushes them (each waits for the subscriber's credit, so a slow
/// subscriber slows only its own stream), `Upload` counts them, `Echo` answers each with itself.
#[derive(Debug, Clone, Default)]
pub struct FeedService;

impl crate::feed::v1::feed_server::Feed for FeedService {
    async fn watch(
        &self,
        request: Request<crate::feed::v1::Subscribe>,
    ) -> Result<Response<rpc_server::codegen::BoxStream<crate::feed::v1::Event>>, Status> {
        let sub = request.into_body();
        let payload = Bytes::from(vec![0x5A; sub.size as usize]);
        let interval = Duration::from_millis(u64::from(sub.interval_ms));
        let count = if sub.count == 0 { u64::MAX } else { u64::from(sub.count) };
        let events = futures_util::stream::unfold(0u64, move |seq| {
            let payload = payload.clone();
            async move {
                if seq >= count {
                    return None;
                }
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let event = crate::feed::v1::Event { seq: seq + 1, payload };
                Some((Ok(event), seq + 1))
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn upload(
        &self,
        request: Request<rpc_server::Streaming<crate::feed::v1::Event>>,
    ) -> Result<Response<crate::feed::v1::Summary>, Status> {
        let mut events = request.into_body();
        let mut summary = crate::feed::v1::Summary::default();
        while let Some(e) = events.message().await? {
            summary.count += 1;
            summary.bytes += e.payload.len() as u64;
            summary.last_seq = e.seq;
        }
        Ok(Response::new(summary))
    }

    async fn echo(
        &self,
        request: Request<rpc_server::Streaming<crate::feed::v1::Event>>,
    ) -> Result<Response<rpc_server::codegen::BoxStream<crate::feed::v1::Event>>, Status> {
        Ok(Response::new(Box::pin(request.into_body())))
    }
}

/// A pub/sub topic served from a [`ReplayLog`](rpc_server::ReplayLog): a subscription starts
/// at the log's head, a resume replays what the subscriber missed (or fails with
/// `ResumeGap` if the log no longer has it). Several servers can serve one topic by sharing the
/// log (in one process) or by each publishing the same positions into their own.
#[derive(Debug, Clone)]
pub struct TopicService {
    log: rpc_server::ReplayLog<crate::topic::v1::Tick>,
}

impl TopicService {
    /// Serves the `ticks` topic from `log`.
    pub fn new(log: rpc_server::ReplayLog<crate::topic::v1::Tick>) -> Self {
        TopicService { log }
    }
}

impl crate::topic::v1::topic_server::Topic for TopicService {
    async fn subscribe(
        &self,
        request: Request<crate::topic::v1::Subscription>,
        after: Option<u64>,
    ) -> Result<Response<rpc_server::codegen::PositionedStream<crate::topic::v1::Tick>>, Status> {
        let topic = request.into_body().topic;
        if topic != "ticks" {
            return Err(Status::not_found(format!(
                "no topic {topic:?} (this server has \"ticks\")"
            )));
        }
        let subscription = self.log.subscribe(after).map_err(Status::from)?;
        Ok(Response::new(subscription.into_stream()))
    }
}
