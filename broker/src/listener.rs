//! The listener: accepts connections, holds each one to the caps and deadlines of
//! `[http]` ([`HttpSettings`]), and serves the application on it (HTTP/1.1, with
//! upgrades for the agents' WebSockets).
//!
//! `axum::serve` enforces none of these: a peer that opened connections and trickled a
//! header byte every few seconds held them for as long as it liked. Here:
//!
//! - **Caps.** A connection takes a slot of `max_connections` and one of its client
//!   address's `max_connections_per_ip` (IPv6 counted per /64) for as long as its socket
//!   lives, through a WebSocket upgrade. Without one it is answered 503 or 429 and
//!   closed at once; refusing is itself bounded (a few at a time, a second each).
//! - **Header deadline.** A request head must arrive whole within
//!   `header_read_timeout_secs` of its first byte (for a connection's first request,
//!   of the accept). It is checked on every read, so trickling does not extend it.
//! - **Body deadline.** A request body must arrive within `body_read_timeout_secs` of
//!   its head; reading it then fails with [`BodyTimeout`], which handlers report.
//! - **Idle.** A connection with no request in progress and no byte moving for
//!   `idle_timeout_secs` is closed, and so is one whose writes make no progress for that
//!   long (its peer stopped reading), upgraded or not.
//!
//! The deadlines live in the connection's I/O ([`Guarded`]), not in a task per
//! connection: a read or write that has to wait arms a timer, and the timer's expiry
//! fails that read or write, which ends the connection. Upgraded connections leave the
//! read deadlines behind: the gateway's registration timeout and pings govern agents.
//! What was refused or cut off is counted and logged as one warning per ten seconds at
//! most; nothing is written per connection (a flood must not become a log flood).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;
use crate::error::{ApiError, ErrorCode};

/// Largest request head (and read buffer) a connection may hold.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Refusals (503/429 answers) in progress at once; beyond, connections are just closed.
const MAX_REFUSING: usize = 64;
/// How long a refusal may take: write the answer, then let the peer read it.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// How often refusals and cut-offs are summed up in the log.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not the peer's doing (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Reading a request body failed: it did not arrive within `http.body_read_timeout_secs`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the request body did not arrive within {secs} s (http.body_read_timeout_secs); the request is refused")]
pub struct BodyTimeout {
    /// The deadline, in seconds.
    pub secs: u64,
}

/// The [`BodyTimeout`] behind a failure to read a request body, if that was the cause.
pub fn body_timeout<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e BodyTimeout> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(late) = c.downcast_ref::<BodyTimeout>() {
            return Some(late);
        }
        cause = c.source();
    }
    None
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets open connections
/// finish for up to `grace` and closes what is left.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    stop: CancellationToken,
    grace: Duration,
) {
    let shared = Arc::new(Shared::new(&settings));
    // Every connection task holds a clone; when all are gone, `recv` answers `None`.
    let (running, mut all_done) = mpsc::channel::<()>(1);
    let abort = CancellationToken::new();
    let mut report = tokio::time::interval(REPORT_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_accept_warning = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(io) = shared.admit(stream, peer) else { continue };
                    let service = service(app.clone(), Arc::clone(&io.conn), Arc::clone(&shared), bucket(peer.ip()));
                    tokio::spawn(serve_connection(io, service, stop.clone(), abort.clone(), running.clone()));
                }
                Err(e) if is_peer_error(&e) => {}
                Err(e) => {
                    // Once per report period at most: this repeats while it lasts.
                    if last_accept_warning.is_none_or(|t: Instant| t.elapsed() >= REPORT_EVERY) {
                        tracing::warn!(error = %e, "cannot accept connections (out of file descriptors?); retrying");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = report.tick() => shared.report(),
            () = stop.cancelled() => break,
        }
    }
    drop(listener);
    drop(running);
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        tracing::warn!("connections still open after the grace period; closing them");
        abort.cancel();
    }
    shared.report();
}

/// Errors of one peer's connection attempt, not of the listener.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection<S>(
    io: Guarded,
    service: S,
    stop: CancellationToken,
    abort: CancellationToken,
    _running: mpsc::Sender<()>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let outcome = tokio::select! {
        outcome = conn.as_mut() => outcome,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                outcome = conn.as_mut() => outcome,
                () = abort.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The application as hyper calls it on one connection: marks requests in progress
/// (idle deadlines pause), bounds the body's arrival, and notes upgrades.
fn service(
    app: Router,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    client: IpAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send + 'static,
> {
    let app = TowerToHyperService::new(app);
    hyper::service::service_fn(move |req: Request<Incoming>| {
        conn.request_started();
        let in_flight = InFlight(Arc::clone(&conn));
        let deadline = Instant::now() + shared.body;
        let shared = Arc::clone(&shared);
        let mut req = req.map(|inner| Body::new(TimedBody { inner, deadline, timer: None, shared }));
        req.extensions_mut().insert(ClientAddr(client));
        let response = hyper::service::Service::call(&app, req);
        async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                in_flight.0.upgraded.store(true, Ordering::Relaxed);
            }
            Ok(response.map(|inner| Body::new(InFlightBody { inner, _in_flight: in_flight })))
        }
    })
}

/// Why a connection was cut off.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Header,
    Idle,
    WriteStall,
}

/// Settings, slots and counters shared by every connection.
#[derive(Debug)]
struct Shared {
    header: Duration,
    body: Duration,
    idle: Duration,
    max_connections: u32,
    max_per_ip: u32,
    slots: Arc<Semaphore>,
    per_ip: DashMap<IpAddr, u32>,
    refusing: Arc<Semaphore>,
    over_total: Bytes,
    over_per_ip: Bytes,
    stats: Stats,
}

/// What was refused or cut off since the last report.
#[derive(Debug, Default)]
struct Stats {
    refused_total: AtomicU64,
    refused_per_ip: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    write_stalls: AtomicU64,
}

impl Shared {
    fn new(s: &HttpSettings) -> Shared {
        let over_total = refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the broker has {} connections open (http.max_connections); retry shortly", s.max_connections),
        );
        let over_per_ip = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "your address has {} connections open (http.max_connections_per_ip); close some or retry shortly",
                s.max_connections_per_ip
            ),
        );
        Shared {
            header: Duration::from_secs(s.header_read_timeout_secs),
            body: Duration::from_secs(s.body_read_timeout_secs),
            idle: Duration::from_secs(s.idle_timeout_secs),
            max_connections: s.max_connections,
            max_per_ip: s.max_connections_per_ip,
            slots: Arc::new(Semaphore::new(s.max_connections as usize)),
            per_ip: DashMap::new(),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            over_total,
            over_per_ip,
            stats: Stats::default(),
        }
    }

    /// A slot for a new connection, or its refusal.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<Guarded> {
        let Ok(total) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            self.refuse(stream, self.over_total.clone());
            return None;
        };
        let ip = bucket(peer.ip());
        {
            let mut open = self.per_ip.entry(ip).or_insert(0);
            if *open >= self.max_per_ip {
                drop(open);
                self.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                self.refuse(stream, self.over_per_ip.clone());
                return None;
            }
            *open += 1;
        }
        let _ = stream.set_nodelay(true);
        Some(Guarded {
            stream,
            conn: Arc::new(Conn::new()),
            read_timer: None,
            write_timer: None,
            stalled_since: None,
            slot: Slot { shared: Arc::clone(self), ip, _total: total },
        })
    }

    /// Answers `response` and closes, without reading the request (a few at a time; a
    /// connection that cannot get a turn is closed without an answer).
    fn refuse(&self, mut stream: TcpStream, response: Bytes) {
        let Ok(turn) = Arc::clone(&self.refusing).try_acquire_owned() else { return };
        tokio::spawn(async move {
            let _turn = turn;
            let _ = tokio::time::timeout(REFUSAL_TIME, async move {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                // Read what the peer sent until it closes, so that closing does not reset
                // the connection before the peer has read the answer.
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            })
            .await;
        });
    }

    fn cut(&self, why: Cut) -> io::Error {
        let (counter, message) = match why {
            Cut::Header => {
                (&self.stats.header_timeouts, "request head not received in time (http.header_read_timeout_secs)")
            }
            Cut::Idle => (&self.stats.idle_timeouts, "connection idle (http.idle_timeout_secs)"),
            Cut::WriteStall => (&self.stats.write_stalls, "the peer stopped reading (http.idle_timeout_secs)"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        io::Error::new(io::ErrorKind::TimedOut, message)
    }

    /// One warning summing up what was refused or cut off since the last one.
    fn report(&self) {
        let s = &self.stats;
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let (total, per_ip) = (take(&s.refused_total), take(&s.refused_per_ip));
        let (header, body, idle, stalls) =
            (take(&s.header_timeouts), take(&s.body_timeouts), take(&s.idle_timeouts), take(&s.write_stalls));
        if total + per_ip + header + body + idle + stalls == 0 {
            return;
        }
        let busiest = self.per_ip.iter().max_by_key(|e| *e.value()).map(|e| (*e.key(), *e.value()));
        tracing::warn!(
            refused_over_max_connections = total,
            refused_over_max_connections_per_ip = per_ip,
            closed_slow_request_head = header,
            refused_slow_request_body = body,
            closed_idle = idle,
            closed_not_reading = stalls,
            open = self.max_connections as usize - self.slots.available_permits(),
            busiest_address = ?busiest.map(|b| b.0),
            busiest_address_open = busiest.map_or(0, |b| b.1),
            "connections refused or cut off by the [http] limits in the last {} s",
            REPORT_EVERY.as_secs()
        );
    }
}

/// A whole refusal response: status, JSON error body, `Connection: close`.
fn refusal(status: StatusCode, message: &str) -> Bytes {
    let body = ApiError::new(ErrorCode::QuotaExceeded, message)
        .with_details(serde_json::json!({ "retry_after_seconds": 1 }))
        .body()
        .to_string();
    let reason = status.canonical_reason().unwrap_or("");
    Bytes::from(format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\n\
         connection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    ))
}

/// The client's address as connections are counted (IPv6 by its /64), in every
/// request's extensions: what per-address limits (sign-in, client registration) key on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// The address connections are counted under: IPv4 as is, IPv6 by its /64 (what one
/// subscriber usually holds), IPv4-mapped IPv6 as IPv4.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// A connection's slots; given back when the socket is dropped.
#[derive(Debug)]
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.per_ip.remove_if_mut(&self.ip, |_, open| {
            *open = open.saturating_sub(1);
            *open == 0
        });
    }
}

/// What the I/O and the service of one connection share: whether a request is in
/// progress, whether the connection was upgraded, and when bytes last moved.
#[derive(Debug)]
struct Conn {
    opened: Instant,
    in_flight: AtomicU32,
    upgraded: AtomicBool,
    /// Milliseconds since `opened` (plus one) of the first byte of the request head being
    /// read; 0 when none is.
    head_from: AtomicU64,
    /// Milliseconds since `opened` of the last byte read or written.
    last_io: AtomicU64,
    /// The task waiting to read, woken when a request ends: its read deadline, none
    /// while the request was in progress, now applies.
    reader: AtomicWaker,
}

impl Conn {
    fn new() -> Conn {
        // The first request's head is due from the accept on.
        Conn {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            upgraded: AtomicBool::new(false),
            head_from: AtomicU64::new(1),
            last_io: AtomicU64::new(0),
            reader: AtomicWaker::new(),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.opened).as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// When a read that waits must give up, and why; none while a request is in
    /// progress (its body has its own deadline) or after an upgrade.
    fn read_deadline(&self, shared: &Shared) -> Option<(Instant, Cut)> {
        if self.upgraded.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        match self.head_from.load(Ordering::Relaxed) {
            0 => Some((self.at(self.last_io.load(Ordering::Relaxed)) + shared.idle, Cut::Idle)),
            from => Some((self.at(from - 1) + shared.header, Cut::Header)),
        }
    }

    fn bytes_read(&self) {
        let now = self.ms(Instant::now());
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.upgraded.load(Ordering::Relaxed)
            && self.head_from.load(Ordering::Relaxed) == 0
        {
            self.head_from.store(now + 1, Ordering::Relaxed);
        }
    }

    fn bytes_written(&self) {
        self.last_io.store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_from.store(0, Ordering::Relaxed);
    }

    fn request_ended(&self) {
        self.last_io.store(self.ms(Instant::now()), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.reader.wake();
    }
}

/// A request in progress, from its head until its response has been sent (or dropped).
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A connection's socket with its deadlines and its slots.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    conn: Arc<Conn>,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    stalled_since: Option<Instant>,
    slot: Slot,
}

/// Whether `deadline` has passed; otherwise arms `timer` to wake the task at it.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    if Instant::now() >= deadline {
        return true;
    }
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep.as_mut().poll(cx).is_ready()
}

impl Guarded {
    fn wrote(&mut self, polled: Poll<io::Result<usize>>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => {
                let since = *self.stalled_since.get_or_insert_with(Instant::now);
                if expired(&mut self.write_timer, since + self.slot.shared.idle, cx) {
                    return Poll::Ready(Err(self.slot.shared.cut(Cut::WriteStall)));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                self.stalled_since = None;
                if n > 0 {
                    self.conn.bytes_written();
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.bytes_read();
                    // Bytes arriving do not extend a head's deadline.
                    if let Some((at, Cut::Header)) = this.conn.read_deadline(&this.slot.shared)
                        && Instant::now() >= at
                    {
                        return Poll::Ready(Err(this.slot.shared.cut(Cut::Header)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.conn.reader.register(cx.waker());
                match this.conn.read_deadline(&this.slot.shared) {
                    Some((at, why)) if expired(&mut this.read_timer, at, cx) => {
                        Poll::Ready(Err(this.slot.shared.cut(why)))
                    }
                    _ => Poll::Pending,
                }
            }
            failed => failed,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that must arrive whole by `deadline`.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    shared: Arc<Shared>,
}

impl TimedBody {
    fn timed_out(&self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        self.shared.stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Some(Err(Box::new(BodyTimeout { secs: self.shared.body.as_secs() }))))
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Frames arriving do not extend the deadline.
        if !this.inner.is_end_stream() && Instant::now() >= this.deadline {
            return this.timed_out();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending if expired(&mut this.timer, this.deadline, cx) => this.timed_out(),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that marks its request in progress until it is sent or dropped.
struct InFlightBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for InFlightBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_cut_off_and_its_slots_are_given_back() {
        let settings = HttpSettings { idle_timeout_secs: 1, max_connections: 16, ..Default::default() };
        let shared = Arc::new(Shared::new(&settings));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let mut io = shared.admit(server, peer).unwrap();
        assert_eq!((shared.slots.available_permits(), shared.per_ip.len()), (15, 1));
        // Upgraded, like an agent's WebSocket: no read deadline, but writes must progress.
        io.conn.upgraded.store(true, Ordering::Relaxed);
        let chunk = vec![0u8; 64 * 1024];
        let written = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                io.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        })
        .await
        .expect("the stalled write fails within 30 s");
        assert_eq!(written.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(shared.stats.write_stalls.load(Ordering::Relaxed), 1);
        drop(io);
        assert_eq!((shared.slots.available_permits(), shared.per_ip.len()), (16, 0));
        drop(client);
    }

    #[test]
    fn a_late_body_is_recognized_behind_the_errors_that_wrap_it() {
        let late: axum::BoxError = Box::new(BodyTimeout { secs: 3 });
        let wrapped = axum::Error::new(axum::Error::new(late));
        assert_eq!(body_timeout(&wrapped).map(|t| t.secs), Some(3));
        assert!(body_timeout(&axum::Error::new(io::Error::other("reset"))).is_none());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(bucket(a), bucket(b));
        assert_ne!(bucket(a), bucket(c));
        assert_eq!(bucket("::ffff:10.0.0.7".parse().unwrap()), "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(bucket("10.0.0.7".parse().unwrap()), "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn refusals_are_complete_http_responses_with_a_json_error() {
        let r = refusal(StatusCode::TOO_MANY_REQUESTS, "too many");
        let text = std::str::from_utf8(&r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "quota_exceeded");
        assert_eq!(json["error"]["details"]["retry_after_seconds"], 1);
    }
}
