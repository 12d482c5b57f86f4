//! The official MCP conformance suite (`@modelcontextprotocol/conformance`, Node 22;
//! `scripts/test` installs both from npm) against a real broker, signed in as a person
//! through OAuth.
//!
//! The suite's server scenarios connect without credentials, so the test puts a
//! forwarding proxy in front of the broker that adds the person's access token to every
//! request (and passes `Host` and `Origin` through unchanged, so the DNS-rebinding
//! scenario still reaches the broker's own checks). The scenarios that apply are the
//! ones about the protocol itself; those written for the suite's reference server
//! (its `test_*` tools, `test://` resources and prompts, sampling and elicitation) do
//! not apply to Periscope and are not run.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::oauth::{Authorization, Browser, authorize, create_user, exchange, oauth_broker, pkce, register};

/// Every server scenario of the suite that applies to Periscope.
const SCENARIOS: &[&str] = &[
    "server-initialize",
    "ping",
    "logging-set-level",
    "completion-complete",
    "tools-list",
    "resources-list",
    "prompts-list",
    "dns-rebinding-protection",
    "server-sse-polling",
    "server-sse-multiple-streams",
];

#[derive(Clone)]
struct Upstream {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Forwards a request to the broker with the token added; streams the answer back.
async fn forward(State(up): State<Upstream>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 4 * 1024 * 1024).await else {
        return Response::builder().status(StatusCode::PAYLOAD_TOO_LARGE).body(Body::empty()).unwrap();
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = up.http.request(parts.method.clone(), format!("{}{path}", up.base)).body(body);
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "authorization" | "content-length" | "connection" | "transfer-encoding") {
            out = out.header(name, value);
        }
    }
    out = out.bearer_auth(&up.token);
    let Ok(resp) = out.send().await else {
        return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::empty()).unwrap();
    };
    let mut builder = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !matches!(name.as_str(), "content-length" | "connection" | "transfer-encoding") {
            builder = builder.header(name, value);
        }
    }
    // Server-sent events: chunk by chunk, as they come.
    let stream = futures_util::stream::unfold(resp, |mut resp| async move {
        match resp.chunk().await {
            Ok(Some(b)) => Some((Ok::<_, std::convert::Infallible>(b), resp)),
            _ => None,
        }
    });
    builder.body(Body::from_stream(stream)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_conformance_scenarios_that_apply_pass_against_a_signed_in_person() {
    let node = std::env::var("PERISCOPE_NODE").unwrap_or_else(|_| {
        panic!("PERISCOPE_NODE is not set: run the tests through scripts/test, which installs Node 22")
    });
    let suite = std::env::var("PERISCOPE_CONFORMANCE").unwrap_or_else(|_| {
        panic!("PERISCOPE_CONFORMANCE is not set: run the tests through scripts/test, which installs the suite")
    });
    let broker = oauth_broker().await;
    // The suite opens a session per scenario, quickly: room above the default rate.
    let quotas = json!({ "calls_per_minute": 60_000, "call_burst": 10_000, "mcp_sessions": 100 });
    create_user(&broker, "conformance@example.com", json!({ "quotas": quotas })).await;
    let redirect = "http://127.0.0.1:7777/cb";
    let client_id = register(&broker, redirect).await;
    let (verifier, challenge) = pkce();
    let scope = "mcp:system:read mcp:agents:read mcp:actions:write mcp:hits:read";
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let code =
        authorize(&broker, &mut Browser::new(), &a, "conformance@example.com", &scope.split(' ').collect::<Vec<_>>())
            .await;
    let (status, t) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!(status, 200, "{t}");

    let upstream = Upstream {
        base: broker.http(),
        token: t["access_token"].as_str().unwrap().to_owned(),
        http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
    };
    let app = axum::Router::new().fallback(forward).with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // PERISCOPE_CONFORMANCE_SCENARIOS=a,b,... runs others by hand (to see why one does not
    // apply).
    let chosen: Vec<String> = match std::env::var("PERISCOPE_CONFORMANCE_SCENARIOS") {
        Ok(list) => list.split(',').map(str::to_owned).collect(),
        Err(_) => SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut failed = Vec::new();
    for scenario in &chosen {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&node)
                .arg(&suite)
                .arg("server")
                .arg("--url")
                .arg(format!("http://127.0.0.1:{}/mcp", proxy.port()))
                .arg("--scenario")
                .arg(scenario)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{scenario} finishes within 60 s"))
        .expect("node runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failures = stdout.lines().filter(|l| l.contains("FAILURE")).count();
        let successes = stdout.lines().filter(|l| l.contains("SUCCESS")).count();
        eprintln!("conformance {scenario}: {successes} check(s) passed, {failures} failed");
        if !out.status.success() || failures > 0 || successes == 0 {
            failed.push(format!("{scenario}: exit {:?}\n{stdout}\n{stderr}", out.status.code()));
        }
    }
    server.abort();
    assert!(failed.is_empty(), "conformance scenarios failed:\n{}", failed.join("\n"));
    broker.stop().await;
}
