//! The REST API's OpenAPI document: served, true to the router, and a property-based
//! run (schemathesis) of every operation against a real broker with it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::Value as Json;

use crate::support::{ADMIN_KEY, TestBroker};

const METHODS: &[&str] = &["get", "post", "put", "delete", "patch"];

async fn document(broker: &TestBroker) -> Json {
    // Served without a key: it describes the API, not any tenant.
    let resp = reqwest::get(format!("{}/api/v1/openapi.json", broker.http())).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

/// `(path, methods)` of every route under `/api/v1`, read from the broker's router
/// definitions: the routers `lib.rs` builds its `api` from (`let api = api::router()
/// .merge(oauth::admin::router())…;`, nested under `/api/v1`), and the routers those
/// merge in turn (`.merge(crate::admin::router())`). Routers mounted elsewhere (the
/// OAuth endpoints at the root) are not part of it.
fn routes_in_source() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker/src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let api = lib.split("let api = ").nth(1).and_then(|r| r.split(';').next()).expect("lib.rs builds `let api = …;`");
    let mut pending: Vec<String> = routers_named(api);
    assert!(!pending.is_empty(), "no router found in lib.rs's `let api`: {api}");
    let mut seen = BTreeSet::new();
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(module) = pending.pop() {
        if !seen.insert(module.clone()) {
            continue;
        }
        let relative = module.replace("::", "/");
        let file = [src.join(format!("{relative}.rs")), src.join(format!("{relative}/mod.rs"))]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no file for the router module `{module}`"));
        let text = std::fs::read_to_string(&file).unwrap();
        let router = text.split("fn router()").nth(1).unwrap_or_else(|| panic!("{}: no fn router()", file.display()));
        let router = router.split("\n}\n").next().unwrap_or(router);
        pending.extend(routers_named(router));
        for chunk in router.split(".route(").skip(1) {
            let Some(path) = chunk.trim_start().strip_prefix('"').and_then(|r| r.split('"').next()) else { continue };
            // The handlers of this route: up to the next route or the end of the chain.
            let body = chunk.split(['\n']).take_while(|l| !l.trim_start().starts_with(".merge(")).collect::<String>();
            let body = &body[..body.find(";").unwrap_or(body.len())];
            let methods = routes.entry(path.to_owned()).or_default();
            for m in METHODS {
                if body.contains(&format!("{m}(")) || body.contains(&format!(".{m}(")) {
                    methods.insert((*m).to_owned());
                }
            }
        }
    }
    assert!(routes.len() >= 15, "the router definitions were not found: {routes:?}");
    routes
}

/// The modules whose `router()` a chain of code calls (`api::router()`,
/// `crate::admin::router()`), as paths under `broker/src`.
fn routers_named(code: &str) -> Vec<String> {
    code.split("::router()")
        .filter(|before| !before.trim().is_empty())
        .filter_map(|before| {
            let path: String = before
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let path = path.trim_start_matches("crate::").trim_start_matches(':').to_owned();
            (!path.is_empty()).then_some(path)
        })
        .collect()
}

/// A broker with sign-in on, so that the user administration operations run for real.
async fn broker() -> TestBroker {
    crate::oauth::oauth_broker().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_exactly_the_routes_the_router_serves() {
    let broker = broker().await;
    let doc = document(&broker).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeMap<String, BTreeSet<String>> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = item.as_object().unwrap().keys().filter(|k| METHODS.contains(&k.as_str())).cloned().collect();
            (path.clone(), methods)
        })
        .collect();
    assert_eq!(documented, routes_in_source(), "documented routes (left) and routes in the router (right) differ");

    // And the running broker agrees, method by method: a documented method reaches a
    // handler, any other method is 405, both in the JSON error shape when refused.
    let client = reqwest::Client::new();
    for (path, methods) in &documented {
        let concrete = path
            .replace("{agent_id}", "agt_nosuch")
            .replace("{action_id}", "act_nosuch")
            .replace("{key_id}", "key_nosuch")
            .replace("{pool}", "nosuch")
            .replace("{user_id}", "usr_nosuch")
            .replace("{grant_id}", "grt_nosuch");
        for m in METHODS {
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let resp = client
                .request(method, format!("{}/api/v1{concrete}", broker.http()))
                .bearer_auth(ADMIN_KEY)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
            let body: Json = if status == 200 || status == 201 || status == 204 {
                Json::Null
            } else {
                resp.json().await.unwrap_or_else(|e| panic!("{m} {concrete}: {status} without a JSON body: {e}"))
            };
            if methods.contains(*m) {
                assert_ne!(status, 405, "{m} {path} is documented but not served");
                assert!(
                    !(status == 404 && body["error"]["message"].as_str().unwrap_or("").starts_with("no such endpoint")),
                    "{m} {path} is documented but not served: {body}"
                );
            } else {
                assert_eq!(status, 405, "{m} {path} is served but not documented: {body}");
                let allow = allow.unwrap_or_else(|| panic!("{m} {path}: 405 without Allow"));
                for documented in methods {
                    assert!(allow.to_lowercase().contains(documented.as_str()), "{m} {path}: Allow is {allow}");
                }
            }
            if status >= 400 {
                assert!(
                    body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                    "{m} {path}: {body}"
                );
            }
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_bad_paths_and_oversized_bodies_answer_in_the_documented_error_shape() {
    let broker = TestBroker::start().await;
    let client = reqwest::Client::new();
    let base = format!("{}/api/v1", broker.http());
    let big = format!("{{\"file\": \"{}\", \"line\": 1}}", "x".repeat(300 * 1024));
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (client.get(format!("{base}/nothing/here")), 404, "not_found"),
        (client.get(format!("{base}/")), 404, "not_found"),
        (client.get(format!("{base}/agents/%FF%FE")), 400, "invalid_input"),
        (client.get(format!("{base}/actions/%C0/hits")), 400, "invalid_input"),
        (
            client.post(format!("{base}/actions")).header("content-type", "application/json").body(big.clone()),
            413,
            "invalid_input",
        ),
        (client.put(format!("{base}/redaction")).body(big.clone()), 413, "invalid_input"),
        (client.put(format!("{base}/redaction")).body(vec![0xFFu8, 0xFE, 0x00]), 400, "invalid_input"),
        (client.post(format!("{base}/keys")).header("content-type", "text/plain").body("{}"), 415, "invalid_input"),
        (client.patch(format!("{base}/actions")), 405, "invalid_input"),
        (client.get(format!("{base}/actions?status=active&status=expired")), 400, "invalid_input"),
        (client.get(format!("{base}/agents?limit=-1")), 400, "invalid_input"),
        (client.get(format!("{base}/agents?limit={}", "9".repeat(40))), 400, "invalid_input"),
    ];
    let mut wrong = Vec::new();
    for (request, status, code) in cases {
        let request = request.bearer_auth(ADMIN_KEY).build().unwrap();
        let what = format!("{} {}", request.method(), request.url());
        let resp = tokio::time::timeout(Duration::from_secs(30), client.execute(request)).await.unwrap().unwrap();
        let got = resp.status().as_u16();
        let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
        let text = resp.text().await.unwrap_or_default();
        let body: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        let shaped = ctype.starts_with("application/json")
            && body["error"]["code"] == code
            && body["error"]["message"].as_str().is_some_and(|m| !m.is_empty());
        if got != status || !shaped {
            wrong.push(format!("{what}: {got} {ctype} {}", text.chars().take(300).collect::<String>()));
        }
    }
    assert!(wrong.is_empty(), "answers not in the documented shape:\n{}", wrong.join("\n"));
    broker.stop().await;
}

/// Runs schemathesis (`PERISCOPE_PYTHON` has it; `scripts/test` installs it from
/// requirements-dev.txt) over every operation of the document against a broker started
/// here, with a company admin's key: the examples, then boundary and wrong-typed,
/// missing, empty and enormous values for every parameter and body field (its coverage
/// phase), then generated ones. Every answer must be no server error, documented, in
/// the documented shape (errors: `{"error": {"code", "message"}}`), within a bounded
/// time; invalid input must be refused. `PERISCOPE_SCHEMATHESIS_EXAMPLES` raises the
/// cases per operation for a longer run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_hang_or_undocumented_answer_in_any_operation() {
    let python = std::env::var("PERISCOPE_PYTHON").unwrap_or_else(|_| {
        panic!("PERISCOPE_PYTHON is not set: run the tests through scripts/test, which creates .venv with schemathesis")
    });
    let broker = broker().await;
    let examples = std::env::var("PERISCOPE_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "20".into());
    let report = std::env::temp_dir().join(format!("periscope-schemathesis-{}", std::process::id()));
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(&python)
            .args(["-m", "schemathesis.cli", "run"])
            .arg(format!("{}/api/v1/openapi.json", broker.http()))
            .arg("--url")
            .arg(format!("{}/api/v1", broker.http()))
            .args(["--header", &format!("Authorization: Bearer {ADMIN_KEY}")])
            .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", &examples, "--seed", "1", "--workers", "2"])
            .args(["--request-timeout", "20", "--max-response-time", "15"])
            .args(["--suppress-health-check", "all", "--no-color"])
            .arg("--report-dir")
            .arg(&report)
            .env("SCHEMATHESIS_HOOKS", "")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finishes within 10 minutes")
    .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&report);
    eprintln!("schemathesis took {:?}", started.elapsed());
    for line in stdout.lines().filter(|l| l.contains(" generated, ") || l.trim_start().starts_with("Operations:")) {
        eprintln!("schemathesis: {}", line.trim());
    }
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{}\n{}",
        stdout.chars().rev().take(20_000).collect::<String>().chars().rev().collect::<String>(),
        stderr.chars().take(4_000).collect::<String>()
    );
    broker.stop().await;
}

/// Found by schemathesis: an empty body (TOML) and an empty array (JSON) parsed as the
/// default rules and silently replaced the organization's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_does_not_reset_the_redaction_rules() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    let (status, set) = admin.put("/redaction", serde_json::json!({"key_names": ["order_ref"]})).await;
    assert_eq!(status, 200, "{set}");
    for body in ["", "  \n"] {
        let resp = admin
            .client
            .put(format!("{}/redaction", admin.base))
            .bearer_auth(ADMIN_KEY)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let err: Json = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_input", "{err}");
    }
    for body in ["[]", "[false, {}]", "\"strict\""] {
        let resp = admin
            .client
            .put(format!("{}/redaction", admin.base))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }
    let (_, now) = admin.get("/redaction").await;
    assert_eq!(now["key_names"], serde_json::json!(["order_ref"]), "{now}");
    broker.stop().await;
}
