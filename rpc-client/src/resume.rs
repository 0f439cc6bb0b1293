//! Resumable server streams on the client: one stream for the consumer across the breaks of the
//! streams under it.
//!
//! The decisions (what to deliver, when to open the stream again and after which position, when
//! to give up, what to report) are [`ResumeState`]'s, pure logic that takes `now` and events and
//! has property tests; [`Resumable`] is the shell that opens streams through the holder and feeds
//! it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use rpc_core::event::ConnectionEvent;
use rpc_core::metrics::{STREAM_DUPLICATES, STREAM_REPLAYED, STREAM_RESUMES, STREAM_RESUME_GAP};
use rpc_core::resume::{Positioned, Resume};
use rpc_core::stream::{Decode, Streaming};
use rpc_core::{Metadata, Method, Status};
use tokio::time::Instant;

use crate::backoff::BackoffConfig;
use crate::error::{Error, ErrorKind};
use crate::Client;

/// When a broken stream is opened again, and when that is given up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResumePolicy {
    pub(crate) timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: BackoffConfig,
}

/// What to do with a message at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Deliver it: it comes after everything delivered.
    Deliver,
    /// Drop it: at or below what was delivered (a replay overlapping what arrived before).
    Duplicate,
}

/// What to do after a break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Open the stream again after `delay`, resuming as `resume` says; this is attempt `attempt`
    /// since the break.
    Reopen {
        resume: Resume,
        delay: Duration,
        attempt: u32,
    },
    /// Stop: `attempts` were made over `waited`.
    GiveUp { attempts: u32, waited: Duration },
}

/// A resume, reported once the resumed stream has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resumed {
    pub(crate) after: Option<u64>,
    pub(crate) attempts: u32,
    pub(crate) gap: Duration,
    pub(crate) replayed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    since: Instant,
    attempts: u32,
    after: Option<u64>,
}

/// Where one resumable stream stands: the last position delivered, and the outage or the
/// catching up in progress, if any.
#[derive(Debug, Clone)]
pub(crate) struct ResumeState {
    policy: ResumePolicy,
    /// The position of the last message delivered (or checkpoint passed).
    delivered: Option<u64>,
    outage: Option<Outage>,
    /// When the stream under it was last opened again, during an outage.
    reopened_at: Option<Instant>,
    /// After a resume, until its first checkpoint: the resume, with the messages delivered
    /// since.
    catching_up: Option<Resumed>,
}

impl ResumeState {
    pub(crate) fn new(after: Option<u64>, policy: ResumePolicy) -> Self {
        ResumeState {
            policy,
            delivered: after,
            outage: None,
            reopened_at: None,
            catching_up: None,
        }
    }

    /// How the next open resumes.
    pub(crate) fn resume(&self) -> Resume {
        self.delivered.map_or(Resume::New, Resume::After)
    }

    /// The position of the last message delivered.
    pub(crate) fn delivered(&self) -> Option<u64> {
        self.delivered
    }

    /// A reopened stream was opened at `now` (its request is on its way).
    pub(crate) fn on_reopened(&mut self, now: Instant) {
        self.reopened_at = Some(now);
    }

    /// The first item of a resumed stream ends the outage.
    fn arrived(&mut self, now: Instant) {
        self.reopened_at = None;
        if let Some(o) = self.outage.take() {
            self.catching_up = Some(Resumed {
                after: o.after,
                attempts: o.attempts,
                gap: now.saturating_duration_since(o.since),
                replayed: 0,
            });
        }
    }

    /// A message at `position` arrived.
    pub(crate) fn on_message(&mut self, now: Instant, position: u64) -> Step {
        self.arrived(now);
        if self.delivered.is_some_and(|d| position <= d) {
            return Step::Duplicate;
        }
        self.delivered = Some(position);
        if let Some(c) = self.catching_up.as_mut() {
            c.replayed += 1;
        }
        Step::Deliver
    }

    /// A checkpoint at `position` arrived: the resume in progress, if any, has caught up.
    pub(crate) fn on_checkpoint(&mut self, now: Instant, position: u64) -> Option<Resumed> {
        self.arrived(now);
        if self.delivered.is_none_or(|d| position > d) {
            self.delivered = Some(position);
        }
        self.catching_up.take()
    }

    /// The stream (or an attempt to open it again) broke at `now`; `unit` is a random value in
    /// `[0, 1)` for the backoff's jitter. A resume still catching up is not reported: it did not
    /// get there.
    pub(crate) fn on_break(&mut self, now: Instant, unit: f64) -> Decision {
        self.catching_up = None;
        // A reopened stream that stayed open for `timeout` without an item (a quiet topic) was
        // healthy: its break begins an outage of its own.
        if self
            .reopened_at
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= self.policy.timeout)
        {
            self.outage = None;
        }
        let delivered = self.delivered;
        let outage = self.outage.get_or_insert(Outage {
            since: now,
            attempts: 0,
            after: delivered,
        });
        outage.after = delivered;
        let waited = now.saturating_duration_since(outage.since);
        let ends = outage.since + self.policy.timeout;
        if outage.attempts >= self.policy.max_attempts || now >= ends {
            let attempts = outage.attempts;
            return Decision::GiveUp { attempts, waited };
        }
        outage.attempts += 1;
        let attempt = outage.attempts;
        let delay = if attempt == 1 {
            Duration::ZERO
        } else {
            self.policy.backoff.delay(attempt - 1, unit)
        };
        let delay = delay.min(ends.saturating_duration_since(now));
        let resume = self.resume();
        Decision::Reopen { resume, delay, attempt }
    }

    /// When the outage in progress is given up, if there is one.
    pub(crate) fn outage_ends(&self) -> Option<Instant> {
        self.outage.map(|o| o.since + self.policy.timeout)
    }
}

type Opening = Pin<Box<dyn Future<Output = Result<(SocketAddr, Streaming<Bytes>), Error>> + Send>>;

/// A resumable server stream as its consumer sees it: one `Stream` of messages, in order, with
/// no gap and no duplicate, across the breaks of the streams under it. It ends when the server
/// ends it (its final status, an error such as a [`ResumeGap`](rpc_core::resume::ResumeGap) included)
/// or when it cannot be opened again within `resume_timeout` and `max_resume_attempts`.
/// Dropping it cancels the stream under it.
pub struct Resumable<T> {
    client: Client,
    method: Method,
    metadata: Metadata,
    body: Bytes,
    deadline: Option<Instant>,
    decode: Decode<T>,
    state: ResumeState,
    current: Option<Streaming<Bytes>>,
    opening: Option<Opening>,
    /// The endpoint of the current stream: a reopen prefers another.
    endpoint: Option<SocketAddr>,
    /// Why the last attempt failed, for the error of giving up.
    last_error: Option<Status>,
    done: bool,
}

impl<T> std::fmt::Debug for Resumable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumable")
            .field("method", &self.method.as_str())
            .field("position", &self.state.delivered())
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Resumable<Bytes> {
    /// Opens the first stream.
    pub(crate) async fn open(
        client: Client,
        method: Method,
        metadata: Metadata,
        body: Bytes,
        deadline: Option<Instant>,
        after: Option<u64>,
    ) -> Result<Self, Error> {
        let policy = ResumePolicy {
            timeout: client.config().resume_timeout,
            max_attempts: client.config().max_resume_attempts,
            backoff: client.config().backoff,
        };
        let state = ResumeState::new(after, policy);
        let opening = open(
            client.clone(),
            method.clone(),
            metadata.clone(),
            body.clone(),
            deadline,
            state.resume(),
            None,
        );
        let (endpoint, stream) = opening.await?;
        Ok(Resumable {
            client,
            method,
            metadata,
            body,
            deadline,
            decode: Ok,
            state,
            current: Some(stream),
            opening: None,
            endpoint: Some(endpoint),
            last_error: None,
            done: false,
        })
    }

    /// A stream of decoded messages.
    pub fn decoded<T>(self, decode: Decode<T>) -> Resumable<T> {
        Resumable {
            client: self.client,
            method: self.method,
            metadata: self.metadata,
            body: self.body,
            deadline: self.deadline,
            decode,
            state: self.state,
            current: self.current,
            opening: self.opening,
            endpoint: self.endpoint,
            last_error: self.last_error,
            done: self.done,
        }
    }
}

/// Opens one stream of a resumable call: checkout (preferring another endpoint than `avoid`),
/// the request with where it resumes, its one message.
fn open(
    client: Client,
    method: Method,
    mut metadata: Metadata,
    body: Bytes,
    deadline: Option<Instant>,
    resume: Resume,
    avoid: Option<SocketAddr>,
) -> Opening {
    Box::pin(async move {
        resume.write(&mut metadata);
        let (addr, sender, responses) = client.open_stream_on(method, metadata, deadline, avoid).await?;
        let mut sender = sender;
        // A failure here shows in the responses too (the stream's end says why).
        if sender.send(body).await.is_ok() {
            let _ = sender.finish().await;
        }
        Ok((addr, responses))
    })
}

impl<T> Resumable<T> {
    /// The message: the next one, in order; `Ok(None)` once the server ended the stream.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx))
            .await
            .transpose()
    }

    /// The position of the last message delivered (or checkpoint passed): where a resume, or a
    /// later subscription, starts after.
    pub fn position(&self) -> Option<u64> {
        self.state.delivered()
    }

    /// The endpoint the stream is on now (or was last).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    fn report(&self, resumed: Option<Resumed>) {
        let Some(r) = resumed else { return };
        metrics::counter!(STREAM_RESUMES, "outcome" => "resumed").increment(1);
        metrics::histogram!(STREAM_RESUME_GAP).record(r.gap.as_secs_f64());
        metrics::counter!(STREAM_REPLAYED).increment(r.replayed);
        tracing::info!(method = %self.method, after = ?r.after, attempts = r.attempts, gap = ?r.gap, replayed = r.replayed, "stream resumed");
        self.client.holder().emit(ConnectionEvent::StreamResumed {
            method: self.method.as_str().to_owned(),
            after: r.after,
            attempts: r.attempts,
            gap: r.gap,
            replayed: r.replayed,
        });
    }

    /// The stream broke with `status`: opens it again, or returns the error that ends it.
    fn broke(&mut self, status: Status) -> Option<Status> {
        let now = Instant::now();
        match self.state.on_break(now, rand::random::<f64>()) {
            Decision::Reopen { resume, delay, attempt } => {
                tracing::debug!(method = %self.method, %status, attempt, ?delay, "resumable stream broke; opening it again");
                self.last_error = Some(status);
                let opening = open(
                    self.client.clone(),
                    self.method.clone(),
                    self.metadata.clone(),
                    self.body.clone(),
                    self.deadline,
                    resume,
                    self.endpoint,
                );
                // The attempt in flight is bounded by the outage's end too, and the wait by the
                // stream's deadline (an attempt past it fails at once, typed).
                let ends = self.state.outage_ends().unwrap_or(now);
                let delay = self
                    .deadline
                    .map_or(delay, |d| delay.min(d.saturating_duration_since(now)));
                self.opening = Some(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    match tokio::time::timeout_at(ends, opening).await {
                        Ok(opened) => opened,
                        Err(_) => Err(Error::new(ErrorKind::ConnectTimeout, false)),
                    }
                }));
                None
            }
            Decision::GiveUp { attempts, waited } => {
                self.done = true;
                metrics::counter!(STREAM_RESUMES, "outcome" => "failed").increment(1);
                tracing::warn!(method = %self.method, %status, attempts, ?waited, "resumable stream could not be resumed");
                self.client.holder().emit(ConnectionEvent::ResumeFailed {
                    method: self.method.as_str().to_owned(),
                    after: self.state.delivered(),
                    attempts,
                    waited,
                });
                let (code, message, metadata) = status.into_parts();
                Some(Status::from_parts(
                    code,
                    format!("resume failed after {attempts} attempts in {waited:?}: {message}"),
                    metadata,
                ))
            }
        }
    }
}

/// The status of an attempt that could not open its stream, and whether it is worth another:
/// when no endpoint could be reached (a TLS handshake failure included: with every endpoint
/// backing off, the holder reports the latest failure of any of them, which may not be the one
/// the stream will come back on) or the connection failed under it. A deadline, a request that
/// cannot be encoded, a server's answer (a version-1 server without streams) or a configuration
/// would end every attempt the same way.
fn open_failure(e: &Error) -> (Status, bool) {
    use rpc_core::driver::ConnectionError as C;
    let again = matches!(
        e.kind(),
        ErrorKind::Connect(_)
            | ErrorKind::ConnectTimeout
            | ErrorKind::Handshake(_)
            | ErrorKind::Tls(_)
            | ErrorKind::NoEndpoint
            | ErrorKind::Connection(C::NotWritten(_) | C::ClosedAfterWrite(_) | C::GoAway { .. } | C::Draining)
    );
    let status = match e.as_status() {
        Some(s) => s.clone(),
        None => Status::new(e.code(), e.to_string()),
    };
    (status, again)
}

impl<T> Unpin for Resumable<T> {}

impl<T> Stream for Resumable<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(opening) = this.opening.as_mut() {
                let opened = std::task::ready!(opening.as_mut().poll(cx));
                this.opening = None;
                match opened {
                    Ok((addr, stream)) => {
                        this.endpoint = Some(addr);
                        this.current = Some(stream);
                        this.state.on_reopened(Instant::now());
                    }
                    Err(e) => {
                        let (status, again) = open_failure(&e);
                        let end = if again { this.broke(status) } else { Some(status) };
                        if let Some(status) = end {
                            this.done = true;
                            return Poll::Ready(Some(Err(status)));
                        }
                        continue;
                    }
                }
            }
            let Some(stream) = this.current.as_mut() else {
                this.done = true;
                return Poll::Ready(None);
            };
            match std::task::ready!(Pin::new(&mut *stream).poll_next(cx)) {
                Some(Ok(body)) => match rpc_core::resume::decode(body) {
                    Ok(Positioned::Message(p, m)) => match this.state.on_message(Instant::now(), p) {
                        Step::Deliver => {
                            let decoded = (this.decode)(m);
                            if decoded.is_err() {
                                // Its position is passed: the stream cannot go on without it.
                                this.done = true;
                                this.current = None;
                            }
                            return Poll::Ready(Some(decoded));
                        }
                        Step::Duplicate => metrics::counter!(STREAM_DUPLICATES).increment(1),
                    },
                    Ok(Positioned::Checkpoint(p)) => {
                        let resumed = this.state.on_checkpoint(Instant::now(), p);
                        this.report(resumed);
                    }
                    Err(status) => {
                        this.done = true;
                        this.current = None;
                        return Poll::Ready(Some(Err(status)));
                    }
                },
                Some(Err(status)) => {
                    let broken = stream.is_broken() && this.deadline.is_none_or(|d| Instant::now() < d);
                    this.current = None;
                    let end = if broken { this.broke(status) } else { Some(status) };
                    if let Some(status) = end {
                        this.done = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                None => {
                    this.done = true;
                    this.current = None;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> ResumePolicy {
        ResumePolicy {
            timeout: Duration::from_secs(30),
            max_attempts: 5,
            backoff: BackoffConfig::default(),
        }
    }

    #[derive(Debug, Clone)]
    enum Event {
        Message(u64),
        Checkpoint(u64),
        Break,
        Reopened,
        Wait(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0u64..40).prop_map(Event::Message),
            1 => (0u64..40).prop_map(Event::Checkpoint),
            1 => Just(Event::Break),
            1 => Just(Event::Reopened),
            1 => (0u64..40_000).prop_map(Event::Wait),
        ]
    }

    proptest! {
        /// Whatever arrives, what is delivered strictly increases and follows the start; every
        /// reopen resumes after the last delivered; attempts and time stay within the policy;
        /// a resume is reported once, with the messages delivered while it caught up.
        #[test]
        fn delivery_is_in_order_and_reopens_stay_within_the_policy(
            start in proptest::option::of(0u64..10),
            events in proptest::collection::vec(event(), 0..80),
            unit in 0.0f64..1.0,
        ) {
            let p = policy();
            let mut s = ResumeState::new(start, p);
            let mut now = Instant::now();
            let mut delivered = start;
            let mut outage: Option<(Instant, u32)> = None;
            let mut given_up = false;
            let mut replayed_since_reopen = 0u64;
            let mut reopened_at: Option<Instant> = None;
            for e in events {
                if given_up { break; }
                match e {
                    Event::Wait(ms) => now += Duration::from_millis(ms),
                    Event::Reopened => {
                        s.on_reopened(now);
                        reopened_at = Some(now);
                    }
                    Event::Message(pos) => {
                        let step = s.on_message(now, pos);
                        let expect = if delivered.is_some_and(|d| pos <= d) { Step::Duplicate } else { Step::Deliver };
                        prop_assert_eq!(step, expect);
                        if step == Step::Deliver {
                            delivered = Some(pos);
                            replayed_since_reopen += 1;
                        }
                        outage = None;
                        reopened_at = None;
                    }
                    Event::Checkpoint(pos) => {
                        let was_catching_up = s.catching_up.is_some() || s.outage.is_some();
                        if let Some(r) = s.on_checkpoint(now, pos) {
                            prop_assert!(was_catching_up);
                            prop_assert_eq!(r.replayed, replayed_since_reopen);
                        }
                        if delivered.is_none_or(|d| pos > d) { delivered = Some(pos); }
                        outage = None;
                        reopened_at = None;
                    }
                    Event::Break => {
                        // A reopened stream quiet but open for the whole timeout was healthy.
                        if reopened_at.take().is_some_and(|t| now - t >= p.timeout) {
                            outage = None;
                        }
                        let (since, attempts) = *outage.get_or_insert((now, 0));
                        match s.on_break(now, unit) {
                            Decision::Reopen { resume, delay, attempt } => {
                                prop_assert_eq!(resume, delivered.map_or(Resume::New, Resume::After));
                                prop_assert_eq!(attempt, attempts + 1);
                                prop_assert!(attempt <= p.max_attempts);
                                prop_assert!(now + delay <= since + p.timeout);
                                prop_assert!(now < since + p.timeout);
                                if attempt == 1 { prop_assert_eq!(delay, Duration::ZERO); }
                                outage = Some((since, attempt));
                                replayed_since_reopen = 0;
                            }
                            Decision::GiveUp { attempts: made, waited } => {
                                prop_assert_eq!(made, attempts);
                                prop_assert!(made >= p.max_attempts || now >= since + p.timeout);
                                prop_assert_eq!(waited, now - since);
                                given_up = true;
                            }
                        }
                    }
                }
                prop_assert_eq!(s.delivered(), delivered);
            }
        }
    }

    /// A stream reopened on a quiet topic that stays open, silent, for longer than
    /// `resume_timeout` and then breaks is resumed again, not given up as part of the old
    /// outage. Found in review.
    #[test]
    fn review_a_quiet_reopened_stream_that_breaks_later_begins_a_new_outage() {
        let mut s = ResumeState::new(Some(5), policy());
        let t0 = Instant::now();
        assert!(matches!(s.on_break(t0, 0.5), Decision::Reopen { attempt: 1, .. }));
        s.on_reopened(t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            s.on_break(later, 0.5),
            Decision::Reopen {
                resume: Resume::After(5),
                delay: Duration::ZERO,
                attempt: 1
            }
        );
    }

    /// Which failures to open a stream again are worth another attempt. A TLS failure is: with
    /// every endpoint backing off, the holder reports the newest failure of any of them (found
    /// in review: another endpoint's bad certificate ended a subscription whose own server was
    /// restarting).
    #[test]
    fn review_open_failures_worth_another_attempt() {
        let io = || std::io::Error::other("x");
        for (kind, again) in [
            (ErrorKind::Tls(io()), true),
            (ErrorKind::Connect(io()), true),
            (ErrorKind::NoEndpoint, true),
            (ErrorKind::ConnectTimeout, true),
            (ErrorKind::DeadlineExceeded, false),
            (ErrorKind::Status(Status::unimplemented("no streams")), false),
        ] {
            let name = format!("{kind:?}");
            assert_eq!(open_failure(&Error::new(kind, false)).1, again, "{name}");
        }
    }

    #[test]
    fn a_resume_is_reported_at_its_checkpoint_with_its_gap_and_replay() {
        let mut s = ResumeState::new(None, policy());
        let t0 = Instant::now();
        assert_eq!(
            s.on_checkpoint(t0, 10),
            None,
            "a fresh stream's checkpoint is no resume"
        );
        assert_eq!(s.on_message(t0, 11), Step::Deliver);
        let d = s.on_break(t0 + Duration::from_secs(1), 0.5);
        assert_eq!(
            d,
            Decision::Reopen {
                resume: Resume::After(11),
                delay: Duration::ZERO,
                attempt: 1
            }
        );
        let d = s.on_break(t0 + Duration::from_secs(2), 0.5);
        assert!(matches!(d, Decision::Reopen { attempt: 2, delay, .. } if delay == Duration::from_secs(1)));
        assert_eq!(s.on_message(t0 + Duration::from_secs(4), 11), Step::Duplicate);
        assert_eq!(s.on_message(t0 + Duration::from_secs(4), 12), Step::Deliver);
        assert_eq!(s.on_message(t0 + Duration::from_secs(4), 13), Step::Deliver);
        assert_eq!(
            s.on_checkpoint(t0 + Duration::from_secs(5), 13),
            Some(Resumed {
                after: Some(11),
                attempts: 2,
                gap: Duration::from_secs(3),
                replayed: 2
            })
        );
    }
}
