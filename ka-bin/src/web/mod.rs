//! `ka serve --http ADDR`: a read-only web view of the running session,
//! served from the `ka serve` process on the session's own runtime.
//!
//! - `GET /`: one self-contained page (HTML, CSS and JS compiled into the
//!   binary) drawing the chain, each node's state, bytes, rate and ETA, an
//!   event timeline and the final report, updated live over server-sent
//!   events.
//! - `GET /api/session`: the latest [`SessionStatus`] (what `ka status
//!   --json` prints) as JSON.
//! - `GET /api/events`: server-sent events: `session` (a snapshot, first
//!   and about once a second), `event` (each line `ka serve --json` prints
//!   for an event, [`SourceEventLine`]) and `report` (the final report).
//! - `GET /metrics`: Prometheus text.
//!
//! The session never waits for a browser: [`WebFeed`] only stores the
//! latest state under a short lock and sends on a bounded broadcast
//! channel; a client that falls behind it gets a fresh snapshot instead of
//! the events it missed. Connections are capped at [`MAX_CONNECTIONS`].
//! Anything but GET is refused (405); with a token every request must
//! carry it (401 otherwise), and an address other than loopback is refused
//! without one.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use crate::cli::events::SourceEventLine;
use crate::cli::status::SessionStatus;

mod metrics;
pub mod token;

pub use metrics::metrics_text;

/// The most HTTP connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// Messages a client's stream may lag behind before it is resynchronised
/// with a snapshot: a browser that stalls costs this much memory, no more.
pub const FANOUT_BUFFER: usize = 256;

/// The most recent events kept for a client that connects late.
pub const EVENTS_KEPT: usize = 200;

/// The page, its style and its script, compiled in: it works offline and
/// asks nothing of any other host.
const PAGE_HTML: &str = include_str!("page.html");
const PAGE_CSS: &str = include_str!("page.css");
const PAGE_JS: &str = include_str!("page.js");

/// One message to the page's event stream, serialized once for every
/// client.
#[derive(Debug, Clone)]
enum Message {
    /// A [`SessionStatus`] as JSON.
    Session(Arc<str>),
    /// A [`SourceEventLine`] as JSON.
    Event(Arc<str>),
    /// The final report as JSON (`{"report": …}`).
    Report(Arc<str>),
}

impl Message {
    fn to_sse(&self) -> Event {
        let (name, data) = match self {
            Message::Session(d) => ("session", d),
            Message::Event(d) => ("event", d),
            Message::Report(d) => ("report", d),
        };
        Event::default().event(name).data(&**data)
    }
}

/// What a client joining now must be told first.
struct Latest {
    status: SessionStatus,
    status_json: Arc<str>,
    events: VecDeque<Arc<str>>,
    report: Option<Arc<str>>,
}

struct Shared {
    latest: Mutex<Latest>,
    fanout: broadcast::Sender<Message>,
}

/// The session's side of the web view: fed from `ka serve`'s callback, it
/// never blocks (a short lock, a send on a bounded channel).
#[derive(Clone)]
pub struct WebFeed {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WebFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebFeed")
    }
}

impl WebFeed {
    /// A feed whose first snapshot is `initial` (a session waiting for its
    /// nodes, until the session publishes one).
    pub fn new(initial: SessionStatus) -> WebFeed {
        let (fanout, _) = broadcast::channel(FANOUT_BUFFER);
        let status_json = json_of(&initial);
        WebFeed {
            shared: Arc::new(Shared {
                latest: Mutex::new(Latest {
                    status: initial,
                    status_json,
                    events: VecDeque::new(),
                    report: None,
                }),
                fanout,
            }),
        }
    }

    /// Publishes a snapshot of the session.
    pub fn session(&self, status: SessionStatus) {
        let json = json_of(&status);
        {
            let mut latest = self.latest();
            latest.status = status;
            latest.status_json = json.clone();
        }
        // No receiver is not an error: nobody is looking.
        let _ = self.shared.fanout.send(Message::Session(json));
    }

    /// Publishes one event, as `ka serve --json` prints it.
    pub fn event(&self, line: SourceEventLine) {
        let json = json_of(&line);
        {
            let mut latest = self.latest();
            if latest.events.len() == EVENTS_KEPT {
                latest.events.pop_front();
            }
            latest.events.push_back(json.clone());
        }
        let _ = self.shared.fanout.send(Message::Event(json));
    }

    /// Publishes the final report (`{"report": …}`, as `ka serve --json`
    /// prints it).
    pub fn report(&self, report: &serde_json::Value) {
        let json: Arc<str> = report.to_string().into();
        self.latest().report = Some(json.clone());
        let _ = self.shared.fanout.send(Message::Report(json));
    }

    /// The latest snapshot.
    pub fn status(&self) -> SessionStatus {
        self.latest().status.clone()
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, Latest> {
        // A panic elsewhere while holding it leaves plain data: go on.
        self.shared
            .latest
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// What a client that connects now is sent before live messages: the
    /// snapshot, the events kept, and the report if there is one.
    fn backlog(&self) -> Vec<Message> {
        let latest = self.latest();
        let mut out = vec![Message::Session(latest.status_json.clone())];
        out.extend(latest.events.iter().cloned().map(Message::Event));
        out.extend(latest.report.clone().map(Message::Report));
        out
    }

    fn snapshot_message(&self) -> Message {
        Message::Session(self.latest().status_json.clone())
    }
}

fn json_of(value: &impl serde::Serialize) -> Arc<str> {
    serde_json::to_string(value)
        .expect("status and event types serialize")
        .into()
}

/// A bound web server, ready to run on the session's runtime: made (and
/// its address checked) before the session starts, so a refused address
/// or a port in use fails at once.
#[derive(Clone)]
pub struct WebServer {
    listener: Arc<std::net::TcpListener>,
    token: Option<Arc<str>>,
    feed: WebFeed,
    /// The session's runtime, kept once the session ends so the page goes
    /// on being served (with its report) until [`WebServer::linger`].
    runtime: Arc<Mutex<Option<tokio::runtime::Runtime>>>,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("listener", &self.listener.local_addr().ok())
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl WebServer {
    /// Binds `addr` for `feed`. Refuses an address other than loopback
    /// without a `token`: the page names every node and its failures.
    pub fn bind(addr: SocketAddr, token: Option<String>, feed: WebFeed) -> anyhow::Result<Self> {
        if token.is_none() && !addr.ip().is_loopback() {
            anyhow::bail!(
                "--http {addr} is reachable from other machines: give --http-token-file FILE \
                 (a token is made there if missing) so only those given the token see the \
                 session, or bind loopback (--http 127.0.0.1:{})",
                addr.port()
            );
        }
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on --http {addr}: is the port in use?"))?;
        listener
            .set_nonblocking(true)
            .context("making the web listener non-blocking")?;
        Ok(WebServer {
            listener: Arc::new(listener),
            token: token.map(Into::into),
            feed,
            runtime: Arc::new(Mutex::new(None)),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The page's address, with its token when it has one (for the
    /// operator to open).
    pub fn url(&self) -> String {
        let addr = self
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        match &self.token {
            Some(t) => format!("http://{addr}/?token={t}"),
            None => format!("http://{addr}/"),
        }
    }

    /// The feed the session publishes to.
    pub fn feed(&self) -> &WebFeed {
        &self.feed
    }

    /// Serves until the runtime stops; runs on the session's runtime
    /// (spawned from inside it).
    pub async fn run(self) {
        let listener = match self
            .listener
            .try_clone()
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                crate::errln!("ka: the web page is not served: {e}");
                return;
            }
        };
        let capped = CappedListener {
            inner: listener,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        };
        if let Err(e) = axum::serve(capped, router(self.feed, self.token)).await {
            crate::errln!("ka: the web page stopped: {e}");
        }
    }

    /// Keeps `runtime` (the session's) running after the session, so the
    /// page stays served until [`WebServer::linger`].
    pub fn keep_runtime(&self, runtime: tokio::runtime::Runtime) {
        *self
            .runtime
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(runtime);
    }

    /// Serves the ended session's page for `how_long` more (so a browser
    /// gets the report), then stops it.
    pub fn linger(&self, how_long: Duration) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(rt) = runtime {
            if !how_long.is_zero() {
                crate::errln!(
                    "ka: the session is over; its web page stays up for {} (Ctrl-C to leave now)",
                    humantime::format_duration(how_long)
                );
                // The session's signal handlers still hold SIGINT and
                // SIGTERM: they must end the wait, not be swallowed by it.
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let mut term = signal(SignalKind::terminate()).ok();
                    let terminated = async {
                        match &mut term {
                            Some(t) => {
                                t.recv().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(how_long) => {}
                        _ = tokio::signal::ctrl_c() => {}
                        _ = terminated => {}
                    }
                });
            }
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }

    /// Serves on a runtime of its own, on a thread of its own: for a page
    /// fed by something else than a live session (a replay, a test of the
    /// page with a generated session of many nodes).
    pub fn serve_in_background(self) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the web page's runtime")?;
        Ok(std::thread::spawn(move || rt.block_on(self.run())))
    }
}

/// A TCP listener that holds one of [`MAX_CONNECTIONS`] slots per open
/// connection: a flood of browsers waits in the backlog instead of costing
/// the session memory and descriptors.
struct CappedListener {
    inner: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
}

/// A connection with its slot, given back when it closes.
struct CappedStream {
    stream: tokio::net::TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots are never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        CappedStream {
                            stream,
                            _slot: slot,
                        },
                        addr,
                    )
                }
                // Out of descriptors, a connection reset before accept:
                // wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for CappedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[derive(Clone)]
struct AppState {
    feed: WebFeed,
    token: Option<Arc<str>>,
}

/// The routes, behind the method and token checks.
fn router(feed: WebFeed, token: Option<Arc<str>>) -> Router {
    let state = AppState { feed, token };
    Router::new()
        .route("/", get(page))
        .route("/api/session", get(api_session))
        .route("/api/events", get(api_events))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Read-only, and only for those with the token.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            "ka's web page is read-only: only GET\n",
        )
            .into_response();
    }
    if let Some(expected) = &state.token {
        let given = token_of(request.headers(), request.uri().query());
        if !given.is_some_and(|g| token::matches(g, expected)) {
            return (
                StatusCode::UNAUTHORIZED,
                "a token is needed: open the URL ka serve printed (…?token=T), or send the header \
                 'Authorization: Bearer T' (T: the --http-token-file's contents)\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// The token a request carries: its bearer header, else its `token=`
/// query parameter.
fn token_of<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    bearer.or_else(|| {
        query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
    })
}

async fn page() -> impl IntoResponse {
    static PAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let html = PAGE.get_or_init(|| {
        PAGE_HTML
            .replace("/*KA_CSS*/", PAGE_CSS)
            .replace("/*KA_JS*/", PAGE_JS)
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing but itself: no other host is ever asked.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:",
            ),
        ],
        html.as_str(),
    )
}

async fn api_session(State(state): State<AppState>) -> impl IntoResponse {
    let json = state.feed.latest().status_json.clone();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json.to_string(),
    )
}

async fn api_events(State(state): State<AppState>) -> impl IntoResponse {
    let stream = client_stream(state.feed).map(|message| Ok::<_, Infallible>(message.to_sse()));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// What one client of `/api/events` is sent: the backlog, then every
/// message as it comes, with a snapshot in place of what it was too slow
/// to take.
fn client_stream(feed: WebFeed) -> impl futures_util::Stream<Item = Message> {
    // Subscribed before the backlog is taken: a message between the two is
    // sent twice rather than lost.
    let live = feed.shared.fanout.subscribe();
    let backlog = futures_util::stream::iter(feed.backlog());
    let live = futures_util::stream::unfold((live, feed), |(mut rx, feed)| async move {
        match rx.recv().await {
            Ok(message) => Some((message, (rx, feed))),
            // Too slow a reader: what it missed is summed up by the
            // snapshot, which tells the current state of every node.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let snapshot = feed.snapshot_message();
                Some((snapshot, (rx, feed)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    backlog.chain(live)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let status = state.feed.status();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_text(&status),
    )
}

/// Reads (or makes) the token in `path` for `--http-token-file`.
pub fn load_token(path: &Path) -> anyhow::Result<(String, bool)> {
    token::load_or_create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_comes_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h, Some("a=1&token=abc")), Some("abc"));
        assert_eq!(token_of(&h, Some("a=1")), None);
        assert_eq!(token_of(&h, None), None);
        h.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(token_of(&h, Some("token=abc")), Some("xyz"));
    }

    #[test]
    fn an_address_others_reach_needs_a_token() {
        let feed = WebFeed::new(crate::cli::status::SessionStatus::empty("lab", None));
        let err = WebServer::bind("0.0.0.0:0".parse().unwrap(), None, feed.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--http-token-file"), "{err}");
        let s = WebServer::bind("127.0.0.1:0".parse().unwrap(), None, feed.clone()).unwrap();
        assert!(s.url().starts_with("http://127.0.0.1:"), "{}", s.url());
        let s = WebServer::bind("0.0.0.0:0".parse().unwrap(), Some("t0k".into()), feed).unwrap();
        assert!(s.url().ends_with("/?token=t0k"), "{}", s.url());
    }

    #[tokio::test]
    async fn a_client_too_slow_for_the_fanout_gets_a_snapshot_not_a_backlog() {
        let feed = WebFeed::new(crate::cli::status::SessionStatus::empty("lab", None));
        let event = |size| SourceEventLine {
            event: crate::cli::events::SourceLine::ImageDone { size },
            t: 0.0,
        };
        let mut client = Box::pin(client_stream(feed.clone()));
        // The backlog: the first snapshot.
        assert!(matches!(client.next().await, Some(Message::Session(_))));
        // The session publishes far more than the client reads; it never
        // waits for it.
        for i in 0..(FANOUT_BUFFER as u64 * 4) {
            feed.event(event(i));
        }
        let mut latest = crate::cli::status::SessionStatus::empty("lab", None);
        latest.state = "streaming".into();
        feed.session(latest);
        // What it missed is replaced by the snapshot of now.
        match client.next().await {
            Some(Message::Session(json)) => assert!(json.contains("streaming"), "{json}"),
            other => panic!("{other:?}"),
        }
        // Then it goes on with what is still buffered, no more.
        let mut rest = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), client.next()).await
        {
            rest += 1;
        }
        assert!(rest <= FANOUT_BUFFER, "{rest} messages buffered");
    }

    #[test]
    fn connections_beyond_the_cap_wait_for_one_to_close() {
        use std::io::{Read, Write};
        let feed = WebFeed::new(crate::cli::status::SessionStatus::empty("lab", None));
        let server = WebServer::bind("127.0.0.1:0".parse().unwrap(), None, feed).unwrap();
        let addr = server.local_addr().unwrap();
        let _serving = server.serve_in_background().unwrap();
        let get = |timeout: Duration| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"GET /api/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        };
        assert!(get(Duration::from_secs(5))
            .unwrap()
            .starts_with("HTTP/1.1 200"));
        // Idle connections hold every slot.
        let mut idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            get(Duration::from_millis(500)).is_err(),
            "a connection beyond the cap was served"
        );
        idle.truncate(MAX_CONNECTIONS - 1);
        assert!(get(Duration::from_secs(5))
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn events_kept_for_late_clients_are_capped() {
        let feed = WebFeed::new(crate::cli::status::SessionStatus::empty("lab", None));
        for i in 0..(EVENTS_KEPT + 10) {
            feed.event(SourceEventLine {
                event: crate::cli::events::SourceLine::ImageDone { size: i as u64 },
                t: 0.0,
            });
        }
        let backlog = feed.backlog();
        assert_eq!(backlog.len(), 1 + EVENTS_KEPT);
        assert!(matches!(backlog[0], Message::Session(_)));
    }
}
