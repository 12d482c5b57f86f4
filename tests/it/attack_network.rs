//! Attacks from the network on the listener and the MCP endpoint, over real TCP: slow and
//! silent connections, floods from one address, request bodies that never finish, and
//! MCP session ids presented with another key. Each test is named as the attack and
//! asserts that it fails, and that legitimate clients are still served.
//!
//! Attackers connect from other loopback addresses (`127.0.0.2` and up) so that the
//! per-address caps they hit do not touch the test's own clients on `127.0.0.1`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use periscope_broker::auth::Role;
use periscope_broker::config::ApiKeyConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{
    ADMIN_KEY, AGENT_KEY, API_KEY, HostLog, TestAgent, TestBroker, audit, eventually, polling_quotas, test_config,
    wait_online,
};

/// A TCP connection to `to` from the loopback address `127.0.0.<host>`.
async fn connect_from(host: u8, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, host], 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// How an attacking connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// The broker answered with this status, then closed.
    Answered(u16),
    /// The broker closed it without an answer.
    Closed,
}

fn ended(received: &[u8]) -> Ended {
    let text = String::from_utf8_lossy(received);
    match text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|s| s.parse().ok()) {
        Some(status) => Ended::Answered(status),
        None => Ended::Closed,
    }
}

/// Sends `head`, then one more byte of `drip` every `every` for as long as the broker
/// keeps the connection; returns how it ended and what the broker sent.
async fn trickle(stream: TcpStream, head: Vec<u8>, drip: u8, every: Duration) -> (Ended, String) {
    let (mut rd, mut wr) = stream.into_split();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    if wr.write_all(&head).await.is_ok() {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                read = rd.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                },
                _ = tick.tick() => {
                    if wr.write_all(&[drip]).await.is_err() {
                        // Anything the broker sent before closing is still readable.
                        let _ = tokio::time::timeout(Duration::from_secs(1), rd.read_to_end(&mut received)).await;
                        break;
                    }
                }
            }
        }
    }
    (ended(&received), String::from_utf8_lossy(&received).into_owned())
}

/// One whole request on its own connection from `127.0.0.<host>`; the status line and
/// body.
async fn request_from(host: u8, to: SocketAddr, request: &str) -> (Ended, String) {
    let mut stream = connect_from(host, to).await;
    let _ = stream.write_all(request.as_bytes()).await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    (ended(&received), String::from_utf8_lossy(&received).into_owned())
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_trickling_header_bytes_are_closed_while_a_legitimate_client_is_served() {
    let mut config = test_config();
    config.http.header_read_timeout_secs = 2;
    config.http.max_connections_per_ip = 64;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let stream = connect_from(2, broker.addr).await;
        let head = b"GET /api/v1/agents HTTP/1.1\r\nHost: localhost\r\nX-Pad: ".to_vec();
        attackers.spawn(trickle(stream, head, b'a', Duration::from_millis(200)));
    }

    // While they trickle, a client from another address is served.
    let (status, agents) = broker.api().get("/agents").await;
    assert_eq!(status, 200, "{agents}");

    // Every trickling connection ends: the ones over the address's cap are refused at
    // once, the others are closed when their head is late. None is held.
    let outcomes = tokio::time::timeout(Duration::from_secs(60), attackers.join_all())
        .await
        .expect("every trickling connection is closed by the broker within 60 s");
    let refused = outcomes.iter().filter(|(e, _)| *e == Ended::Answered(429)).count();
    let closed = outcomes.iter().filter(|(e, _)| *e == Ended::Closed).count();
    assert_eq!(refused + closed, 200, "{:?}", outcomes.iter().find(|(e, _)| !matches!(e, Ended::Closed)));
    assert!(refused > 0, "connections over http.max_connections_per_ip are answered 429");
    let answer = &outcomes.iter().find(|(e, _)| *e == Ended::Answered(429)).unwrap().1;
    assert!(answer.contains("quota_exceeded") && answer.contains("http.max_connections_per_ip"), "{answer}");

    // Their slots were given back: the same address is served again.
    let (status, body) = request_from(2, broker.addr, HEALTHZ).await;
    assert_eq!(status, Ended::Answered(200), "{body}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_caps_are_refused_with_429_or_503_until_others_close() {
    let mut config = test_config();
    config.http.max_connections = 16;
    config.http.max_connections_per_ip = 8;
    config.http.header_read_timeout_secs = 120;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;

    // Eight silent connections fill the address's share; the ninth is refused.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(3, broker.addr).await);
    }
    let (status, body) = request_from(3, broker.addr, HEALTHZ).await;
    assert_eq!(status, Ended::Answered(429), "{body}");
    assert!(body.contains("\"code\":\"quota_exceeded\"") && body.contains("retry-after: 1"), "{body}");
    // Other addresses are still served.
    assert_eq!(request_from(1, broker.addr, HEALTHZ).await.0, Ended::Answered(200));

    // Eight more from another address fill the broker: everyone is refused, with 503.
    for _ in 0..8 {
        held.push(connect_from(4, broker.addr).await);
    }
    let (status, body) = request_from(5, broker.addr, HEALTHZ).await;
    assert_eq!(status, Ended::Answered(503), "{body}");
    assert!(body.contains("http.max_connections"), "{body}");

    // Once they close, their slots are free again.
    drop(held);
    let to = broker.addr;
    eventually(Duration::from_secs(10), "the address served again once its connections closed", || async move {
        (request_from(3, to, HEALTHZ).await.0 == Ended::Answered(200)).then_some(())
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut config = test_config();
    config.http.idle_timeout_secs = 1;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let mut stream = connect_from(6, broker.addr).await;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer, then nothing: the broker closes the connection (EOF) on its own.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection is closed within 30 s");
    assert_eq!(ended(&received), Ended::Answered(200), "{}", String::from_utf8_lossy(&received));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_trickled_past_its_deadline_is_refused_with_a_specific_error() {
    let mut config = test_config();
    config.http.body_read_timeout_secs = 1;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    for (path, status) in [("/api/v1/actions", 400), ("/mcp", 408)] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
             Content-Length: 100000\r\n\r\n{{"
        );
        let stream = connect_from(7, broker.addr).await;
        let (end, answer) = tokio::time::timeout(
            Duration::from_secs(60),
            trickle(stream, head.into_bytes(), b' ', Duration::from_millis(200)),
        )
        .await
        .expect("the broker answers a trickled body within 60 s");
        assert_eq!(end, Ended::Answered(status), "{path}: {answer}");
        assert!(answer.contains("http.body_read_timeout_secs") && answer.contains("invalid_input"), "{answer}");
    }
    broker.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// An agent WebSocket from `127.0.0.<host>`, or the HTTP status that refused it.
async fn websocket_from(host: u8, broker: &TestBroker) -> Result<Ws, u16> {
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {AGENT_KEY}").parse().unwrap());
    let stream = connect_from(host, broker.addr).await;
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket from 127.0.0.{host}: {e}"),
    }
}

fn registration(agent_id: &str) -> String {
    json!({
        "type": "register", "protocol_version": 1, "agent_id": agent_id, "display_name": "raw",
        "pool": "raw", "tags": [], "service": "raw", "language": "test", "agent_version": "0"
    })
    .to_string()
}

/// The next text frame as JSON (skipping pings), or None once the socket closed.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a frame within 30 s") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).ok(),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_websockets_count_against_the_caps_and_outlive_the_idle_timeout_only_once_registered() {
    let mut config = test_config();
    config.http.idle_timeout_secs = 1;
    config.http.header_read_timeout_secs = 1;
    config.http.max_connections_per_ip = 2;
    config.agents.registration_timeout_secs = 1;
    // Heartbeats rarely, pings every 2 s: gaps longer than the idle timeout.
    config.agents.heartbeat_interval_secs = 30;
    config.agents.ping_interval_secs = 2;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();

    // Upgraded sockets keep their slots: two registered agents from one address fill it.
    let mut first = websocket_from(8, &broker).await.unwrap();
    first.send(Message::text(registration("agt_capone"))).await.unwrap();
    assert_eq!(next_json(&mut first).await.unwrap()["type"], "registered");
    let mut second = websocket_from(8, &broker).await.unwrap();
    second.send(Message::text(registration("agt_captwo"))).await.unwrap();
    assert_eq!(next_json(&mut second).await.unwrap()["type"], "registered");
    assert_eq!(websocket_from(8, &broker).await.err(), Some(429), "a third socket from the address is refused");
    drop(first);
    eventually(Duration::from_secs(10), "a slot freed by a closed socket", || async {
        websocket_from(8, &broker).await.ok()
    })
    .await;

    // A socket that never registers is closed, with the reason.
    let mut silent = websocket_from(9, &broker).await.unwrap();
    let refusal = next_json(&mut silent).await.expect("an error frame before the close");
    assert_eq!(refusal["code"], "registration_timeout", "{refusal}");
    assert!(next_json(&mut silent).await.is_none(), "then the socket is closed");

    // A healthy agent stays connected across many idle timeouts: one session throughout.
    let agent = TestAgent::start(&broker.ws_url(), "idle", &[]);
    wait_online(&api, &agent.id()).await;
    let (_, before) = api.get(&format!("/agents/{}", agent.id())).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A new client: the broker closed the first one's idle connection long ago, and a
    // request sent on it just as the close arrives fails (a race of every keep-alive).
    let (_, after) = broker.api().get(&format!("/agents/{}", agent.id())).await;
    assert_eq!(after["status"], "online", "{after}");
    assert_eq!(before["connected_at_ms"], after["connected_at_ms"], "the agent never reconnected: {after}");
    drop(second);
    broker.stop().await;
}

/// A developer of another organization, and a second developer of `default`.
const OTHER_ORG_KEY: &str = "test-globex-key-0123456789";
const OTHER_ORG_ADMIN: &str = "test-globex-admin-0123456789";
const COLLEAGUE_KEY: &str = "test-colleague-key-0123456789";

fn session_config() -> periscope_broker::BrokerConfig {
    let mut config = test_config();
    let globex = |k: ApiKeyConfig| ApiKeyConfig { org: Some("globex".into()), quotas: polling_quotas(), ..k };
    config.api_keys.push(globex(ApiKeyConfig::new("mallory", OTHER_ORG_KEY)));
    config.api_keys.push(globex(ApiKeyConfig::new("globex-admin", OTHER_ORG_ADMIN).with_role(Role::CompanyAdmin)));
    config.api_keys.push(ApiKeyConfig { quotas: polling_quotas(), ..ApiKeyConfig::new("colleague", COLLEAGUE_KEY) });
    config
}

/// Raw streamable HTTP to `/mcp`, so that a test controls every header.
struct Mcp {
    http: reqwest::Client,
    url: String,
}

impl Mcp {
    fn new(broker: &TestBroker) -> Mcp {
        Mcp { http: reqwest::Client::new(), url: format!("{}/mcp", broker.http()) }
    }

    fn request(&self, method: reqwest::Method, key: &str, session: Option<&str>) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, &self.url)
            .bearer_auth(key)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        r
    }

    /// Opens a session for `key`; its id.
    async fn open(&self, key: &str) -> String {
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
        let resp = self.request(reqwest::Method::POST, key, None).json(&init).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let session = resp.headers()["mcp-session-id"].to_str().unwrap().to_owned();
        let _ = resp.text().await;
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let resp = self.request(reqwest::Method::POST, key, Some(&session)).json(&initialized).send().await.unwrap();
        assert_eq!(resp.status(), 202);
        session
    }

    /// A tool call in a session: the HTTP status and the SSE text.
    async fn call(&self, key: &str, session: &str, id: u64, tool: &str) -> (u16, String) {
        let call =
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}});
        let resp = self.request(reqwest::Method::POST, key, Some(session)).json(&call).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    }

    /// Resumes a session's stream after `last_event_id`: the HTTP status and what came.
    async fn resume(&self, key: &str, session: &str, last_event_id: &str) -> (u16, String) {
        let resp = self
            .request(reqwest::Method::GET, key, Some(session))
            .header("last-event-id", last_event_id)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = tokio::time::timeout(Duration::from_secs(5), resp.text()).await.ok().and_then(Result::ok);
        (status, text.unwrap_or_default())
    }

    async fn delete(&self, key: &str, session: &str) -> (u16, String) {
        let resp = self.request(reqwest::Method::DELETE, key, Some(session)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    }
}

/// The id of the first SSE event of `sse` that carries a JSON-RPC message.
fn first_event_id(sse: &str) -> String {
    let mut id = None;
    for line in sse.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_owned());
        }
        if line.starts_with("data:") && line.contains("jsonrpc") {
            break;
        }
    }
    id.unwrap_or_else(|| panic!("no event id in {sse}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_presenting_a_session_id_cannot_resume_read_or_end_it_and_is_audited_once() {
    let broker = TestBroker::start_with(session_config(), "127.0.0.1:0".parse().unwrap()).await;
    let mcp = Mcp::new(&broker);
    let session = mcp.open(API_KEY).await;
    let (status, result) = mcp.call(API_KEY, &session, 2, "system_health").await;
    assert_eq!(status, 200, "{result}");
    assert!(result.contains("tester"), "the owner's result names the owner: {result}");
    let event = first_event_id(&result);
    // Its owner may resume the session's streams (an attacker would take over a stream
    // still in progress, and its result, this way).
    assert_eq!(mcp.resume(API_KEY, &session, &event).await.0, 200);

    // What an unknown session gets, for comparison.
    let unknown = "0b7c0e3e-6a4d-4c1e-9f55-0a5e3f1d2c7b";
    let not_found = mcp.resume(API_KEY, unknown, &event).await;
    assert_eq!(not_found.0, 404, "{}", not_found.1);

    // Another organization's key, and a colleague's, get exactly that, three times each.
    for key in [OTHER_ORG_KEY, COLLEAGUE_KEY] {
        assert_eq!(mcp.resume(key, &session, &event).await, not_found, "{key}: resume");
        let (status, body) = mcp.call(key, &session, 3, "system_health").await;
        assert_eq!((status, body.as_str()), (404, not_found.1.as_str()), "{key}: post into the session");
        assert_eq!(mcp.delete(key, &session).await, not_found, "{key}: delete");
    }
    // Nothing of the owner's leaked, and the session survived the attempts to end it.
    let (status, again) = mcp.call(API_KEY, &session, 4, "system_health").await;
    assert_eq!(status, 200, "the owner's session still works: {again}");

    // Audited where an operator looks, once per key and session rather than per attempt.
    let admin = broker.api_with(ADMIN_KEY);
    let globex_admin = broker.api_with(OTHER_ORG_ADMIN);
    let (ours, theirs) = eventually(Duration::from_secs(10), "the refusals audited", || {
        let (admin, globex_admin) = (admin.clone(), globex_admin.clone());
        async move {
            let ours = audit(&admin, "&kind=mcp_session_refused").await;
            let theirs = audit(&globex_admin, "&kind=mcp_session_refused").await;
            (ours.len() == 2 && theirs.len() == 1).then_some((ours, theirs))
        }
    })
    .await;
    let colleague = ours.iter().find(|e| e["actor"]["name"] == "colleague").expect("the colleague's attempts");
    assert_eq!(colleague["data"]["attempts"], 1, "{colleague}");
    let foreign = ours.iter().find(|e| e["actor"]["type"] == "system").expect("the other organization's attempts");
    assert!(foreign["detail"].as_str().unwrap().contains("another organization"), "{foreign}");
    assert!(!foreign.to_string().contains("mallory"), "the victim's trail does not name the other org's key");
    assert_eq!(theirs[0]["actor"]["name"], "mallory");
    assert!(!theirs[0].to_string().contains("tester"), "the attacker's trail does not name the victim's key");
    for entry in ours.iter().chain(&theirs) {
        assert!(!entry.to_string().contains(&session), "the audit trail never holds a session id: {entry}");
    }

    // The owner ends it; then it is gone for the owner too.
    assert_eq!(mcp.delete(API_KEY, &session).await.0, 202);
    assert_eq!(mcp.resume(API_KEY, &session, &event).await.0, 404);
    broker.stop().await;
}

#[test]
fn session_ids_never_appear_in_the_brokers_info_logs() {
    use tracing_subscriber::prelude::*;
    // Everything the broker and the client do runs on this thread, where the subscriber
    // is the default: the broker's own filter at info, as `periscope serve` sets it up.
    let run = |filter: tracing_subscriber::EnvFilter| -> (String, String) {
        let log = HostLog::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(log.clone()).with_filter(filter));
        let _default = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let session = runtime.block_on(async {
            let broker = TestBroker::start_with(session_config(), "127.0.0.1:0".parse().unwrap()).await;
            let mcp = Mcp::new(&broker);
            let session = mcp.open(API_KEY).await;
            let (_, result) = mcp.call(API_KEY, &session, 2, "system_health").await;
            let event = first_event_id(&result);
            mcp.resume(API_KEY, &session, &event).await;
            mcp.resume(OTHER_ORG_KEY, &session, &event).await;
            mcp.delete(API_KEY, &session).await;
            broker.stop().await;
            session
        });
        (session, log.text())
    };

    let (session, text) = run(periscope_broker::logging::filter_from(None, "info"));
    assert!(text.contains("mcp tool call"), "the broker's info lines were captured: {text}");
    assert!(text.contains("mcp_session_refused"), "the audit line was captured: {text}");
    assert!(!text.contains(&session), "a session id was logged:\n{text}");

    // Without the broker's filter, the MCP library logs the id at info: the filter is
    // what keeps it out (if this fails, rmcp stopped logging session ids).
    let (session, text) = run(tracing_subscriber::EnvFilter::new("info"));
    assert!(text.contains(&session), "rmcp no longer logs session ids at info:\n{text}");
}
