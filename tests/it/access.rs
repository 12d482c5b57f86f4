//! Who may do what: each role and narrowed key against each tool (over MCP and REST),
//! pools outside a key's reach answering exactly like pools that do not exist, group
//! admins managing their group and nothing else, and organizations that see nothing of
//! each other.

use std::collections::BTreeSet;

use futures_util::{SinkExt, StreamExt};
use periscope_broker::auth::Role;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::mcp::{body, call, code, connect_with, text};
use crate::support::{
    ADMIN_KEY, Api, TestAgent, TestBroker, audit, create_key, polling_quotas, test_config, wait_online,
};

/// What a call should come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Succeeds.
    Ok,
    /// `insufficient_scope` naming this scope.
    Scope(&'static str),
    /// `insufficient_scope` naming this role (with `mcp:admin`).
    Role(&'static str),
    /// `not_found`, as if it did not exist.
    NotFound,
}

fn check_error(who: &str, what: &str, want: Want, status: Option<u16>, err: &Value) {
    let code = err["error"]["code"].as_str();
    match want {
        Want::Ok => panic!("{who}: {what} should succeed, got {status:?} {err}"),
        Want::Scope(scope) => {
            assert_eq!(code, Some("insufficient_scope"), "{who}: {what}: {err}");
            assert_eq!(err["error"]["details"]["required_scope"], scope, "{who}: {what}: {err}");
            assert!(err["error"]["message"].as_str().unwrap().contains(scope), "{who}: {what}: {err}");
            assert!(status.is_none_or(|s| s == 403), "{who}: {what}: status {status:?}");
        }
        Want::Role(role) => {
            assert_eq!(code, Some("insufficient_scope"), "{who}: {what}: {err}");
            assert_eq!(err["error"]["details"]["required_role"], role, "{who}: {what}: {err}");
            assert!(status.is_none_or(|s| s == 403), "{who}: {what}: status {status:?}");
        }
        Want::NotFound => {
            assert_eq!(code, Some("not_found"), "{who}: {what}: {err}");
            assert!(status.is_none_or(|s| s == 404), "{who}: {what}: status {status:?}");
        }
    }
}

async fn rest(api: &Api, who: &str, method: &str, path: &str, payload: Value, want: Want) -> Value {
    let (status, v) = match method {
        "GET" => api.get(path).await,
        "POST" => api.post(path, payload).await,
        "PUT" => api.put(path, payload).await,
        "DELETE" => api.delete(path).await,
        other => panic!("{other}"),
    };
    if want == Want::Ok {
        assert!((200..300).contains(&status), "{who}: {method} {path} should succeed, got {status} {v}");
    } else {
        check_error(who, &format!("{method} {path}"), want, Some(status), &v);
    }
    v
}

fn pools_of(agents: &Value) -> BTreeSet<String> {
    agents["items"].as_array().unwrap().iter().map(|a| a["pool"].as_str().unwrap().to_owned()).collect()
}

fn snapshot(pool: &str) -> Value {
    json!({"pool": pool, "file": "it/access.rs", "line": 1, "allow_pending": true, "expire_seconds": 600})
}

struct Caller {
    name: &'static str,
    key: String,
    pools: &'static [&'static str],
    health: Want,
    place_shop: Want,
    place_pay: Want,
    read_shop: Want,
    read_pay: Want,
    audit: Want,
    keys: Want,
    redaction: Want,
    groups: Want,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_and_narrowed_key_gets_exactly_its_tools_and_pools_over_mcp_and_rest() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    rest(&admin, "admin", "POST", "/groups", json!({"name": "payments"}), Want::Ok).await;
    rest(&admin, "admin", "PUT", "/pools/pay", json!({"group": "payments"}), Want::Ok).await;
    let shop = TestAgent::start(&broker.ws_url(), "shop", &[]);
    let pay = TestAgent::start(&broker.ws_url(), "pay", &[]);
    wait_online(&admin, &shop.id()).await;
    wait_online(&admin, &pay.id()).await;
    // Room for this test's ~40 calls per key (the call rate has its own test).
    let quotas = json!({"calls_per_minute": 6000, "call_burst": 1000});
    let (dev, _) = create_key(&admin, json!({"name": "dev", "role": "developer", "quotas": quotas})).await;
    let (gadmin, _) =
        create_key(&admin, json!({"name": "gadmin", "role": "group_admin", "group": "payments", "quotas": quotas}))
            .await;
    let (narrow, _) =
        create_key(&admin, json!({"name": "narrow", "scopes": ["mcp:agents:read", "mcp:hits:read"], "quotas": quotas}))
            .await;
    let (shop_only, _) = create_key(&admin, json!({"name": "shop-only", "pools": ["shop"], "quotas": quotas})).await;
    let action_in = |pool: &'static str| {
        let admin = admin.clone();
        async move {
            let v = rest(&admin, "admin", "POST", "/actions", snapshot(pool), Want::Ok).await;
            v["action_id"].as_str().unwrap().to_owned()
        }
    };
    let (in_shop, in_pay) = (action_in("shop").await, action_in("pay").await);

    use Want::*;
    let callers = [
        Caller {
            name: "company_admin",
            key: ADMIN_KEY.into(),
            pools: &["pay", "shop"],
            health: Ok,
            place_shop: Ok,
            place_pay: Ok,
            read_shop: Ok,
            read_pay: Ok,
            audit: Ok,
            keys: Ok,
            redaction: Ok,
            groups: Ok,
        },
        Caller {
            name: "developer",
            key: dev,
            pools: &["pay", "shop"],
            health: Ok,
            place_shop: Ok,
            place_pay: Ok,
            read_shop: Ok,
            read_pay: Ok,
            audit: Scope("mcp:admin"),
            keys: Scope("mcp:admin"),
            redaction: Scope("mcp:admin"),
            groups: Scope("mcp:admin"),
        },
        Caller {
            name: "group_admin of payments",
            key: gadmin,
            pools: &["pay"],
            health: Ok,
            place_shop: NotFound,
            place_pay: Ok,
            read_shop: NotFound,
            read_pay: Ok,
            audit: Role("company_admin"),
            keys: Ok,
            redaction: Role("company_admin"),
            groups: Role("company_admin"),
        },
        Caller {
            name: "narrowed to agents:read and hits:read",
            key: narrow,
            pools: &["pay", "shop"],
            health: Scope("mcp:system:read"),
            place_shop: Scope("mcp:actions:write"),
            place_pay: Scope("mcp:actions:write"),
            read_shop: Ok,
            read_pay: Ok,
            audit: Scope("mcp:admin"),
            keys: Scope("mcp:admin"),
            redaction: Scope("mcp:admin"),
            groups: Scope("mcp:admin"),
        },
        Caller {
            name: "restricted to pool shop",
            key: shop_only,
            pools: &["shop"],
            health: Ok,
            place_shop: Ok,
            place_pay: NotFound,
            read_shop: Ok,
            read_pay: NotFound,
            audit: Scope("mcp:admin"),
            keys: Scope("mcp:admin"),
            redaction: Scope("mcp:admin"),
            groups: Scope("mcp:admin"),
        },
    ];

    for c in &callers {
        let who = c.name;
        let want_pools: BTreeSet<String> = c.pools.iter().map(|p| (*p).to_owned()).collect();

        // --- MCP, one call per tool ---
        let client = connect_with(&broker, &c.key).await.expect("connects");
        let mcp = |tool: &'static str, args: Value, want: Want| {
            let client = &client;
            async move {
                let r = call(client, tool, args).await;
                if want == Want::Ok {
                    assert_eq!(code(&r), None, "{who}: {tool}: {}", text(&r));
                } else {
                    check_error(who, tool, want, None, &body(&r));
                }
                body(&r)
            }
        };
        let h = mcp("system_health", json!({}), c.health).await;
        if c.health == Ok {
            assert_eq!(h["caller"]["org"], "default", "{who}: {h}");
        }
        let agents = mcp("list_agents", json!({}), Ok).await;
        assert_eq!(pools_of(&agents), want_pools, "{who}: list_agents");
        let sources = mcp("list_sources", json!({"include_offline": true}), Ok).await;
        assert!(sources["items"].is_array(), "{who}: {sources}");
        let mut args = snapshot("shop");
        args["wait"] = json!(false);
        args["timeout_seconds"] = json!(300);
        args.as_object_mut().unwrap().remove("expire_seconds");
        mcp("place_snapshot", args.clone(), c.place_shop).await;
        args["pool"] = json!("pay");
        mcp("place_snapshot", args, c.place_pay).await;
        let mut log = snapshot("pay");
        log["template"] = json!("t");
        mcp("place_log", log, c.place_pay).await;
        let mut metric = snapshot("shop");
        metric["kind"] = json!("counter");
        mcp("place_metric", metric, c.place_shop).await;
        mcp("get_action", json!({"action_id": in_shop}), c.read_shop).await;
        mcp("get_action", json!({"action_id": in_pay}), c.read_pay).await;
        let listed = mcp("list_actions", json!({"limit": 200}), Ok).await;
        let ids: Vec<&str> =
            listed["items"].as_array().unwrap().iter().map(|a| a["action_id"].as_str().unwrap()).collect();
        assert_eq!(ids.contains(&in_shop.as_str()), c.read_shop == Ok, "{who}: list_actions {ids:?}");
        assert_eq!(ids.contains(&in_pay.as_str()), c.read_pay == Ok, "{who}: list_actions {ids:?}");
        mcp("query_audit", json!({"limit": 5}), c.audit).await;
        // Removing is placing's scope, on actions the key can see.
        let (remove_shop, remove_pay) = match c.place_shop {
            Scope(s) => (Scope(s), Scope(s)),
            _ => (c.read_shop, c.read_pay),
        };
        let removable = action_in("shop").await;
        mcp("remove_action", json!({"action_id": removable}), remove_shop).await;
        let removable = action_in("pay").await;
        mcp("remove_action", json!({"action_id": removable}), remove_pay).await;
        client.cancel().await.unwrap();

        // --- REST, the same decisions ---
        let api = broker.api_with(&c.key);
        rest(&api, who, "GET", "/health", Value::Null, c.health).await;
        let agents = rest(&api, who, "GET", "/agents", Value::Null, Ok).await;
        assert_eq!(pools_of(&agents), want_pools, "{who}: GET /agents");
        rest(&api, who, "GET", &format!("/agents/{}", pay.id()), Value::Null, c.read_pay).await;
        rest(&api, who, "POST", "/actions", snapshot("shop"), c.place_shop).await;
        rest(&api, who, "POST", "/actions", snapshot("pay"), c.place_pay).await;
        let by_id = json!({"agent_ids": [pay.id()], "file": "it/access.rs", "line": 1, "allow_pending": true});
        rest(&api, who, "POST", "/actions", by_id, c.place_pay).await;
        rest(&api, who, "GET", &format!("/actions/{in_shop}"), Value::Null, c.read_shop).await;
        rest(&api, who, "GET", &format!("/actions/{in_pay}/hits"), Value::Null, c.read_pay).await;
        rest(&api, who, "GET", &format!("/actions/{in_pay}/hits?wait_seconds=1"), Value::Null, c.read_pay).await;
        rest(&api, who, "GET", "/audit", Value::Null, c.audit).await;
        rest(&api, who, "GET", "/audit/export", Value::Null, c.audit).await;
        rest(&api, who, "GET", "/keys", Value::Null, c.keys).await;
        rest(&api, who, "GET", "/redaction", Value::Null, c.redaction).await;
        rest(&api, who, "POST", "/groups", json!({"name": format!("g-{}", who.len())}), c.groups).await;
    }

    // What each caller did is in the trail, under its key.
    let entries = audit(&admin, "&kind=action_placed").await;
    let by: BTreeSet<&str> = entries.iter().filter_map(|e| e["actor"]["name"].as_str()).collect();
    for name in ["admin", "dev", "gadmin", "shop-only"] {
        assert!(by.contains(name), "{name} placed actions: {by:?}");
    }
    assert!(!by.contains("narrow"), "a refused call places nothing");
    shop.shutdown();
    pay.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_admin_manages_its_group_and_nothing_else() {
    let broker = TestBroker::start().await;
    let admin = broker.api_with(ADMIN_KEY);
    for g in ["payments", "search"] {
        rest(&admin, "admin", "POST", "/groups", json!({"name": g}), Want::Ok).await;
    }
    rest(&admin, "admin", "PUT", "/pools/pay", json!({"group": "payments"}), Want::Ok).await;
    rest(&admin, "admin", "PUT", "/pools/find", json!({"group": "search"}), Want::Ok).await;
    let (_, outsider) = create_key(&admin, json!({"name": "outsider"})).await;
    let (gadmin, gadmin_id) =
        create_key(&admin, json!({"name": "pay-lead", "role": "group_admin", "group": "payments"})).await;
    let g = broker.api_with(&gadmin);

    // Keys of its own group only, never more than it holds.
    let (dev, dev_id) = create_key(&g, json!({"name": "pay-dev"})).await;
    let (_, dev_key) = g.get(&format!("/keys/{dev_id}")).await;
    assert_eq!(dev_key["group"], "payments", "the group admin's group by default: {dev_key}");
    assert_eq!(dev_key["created_by"], "pay-lead");
    let (status, err) = g.post("/keys", json!({"name": "x", "role": "company_admin"})).await;
    assert_eq!((status, err["error"]["code"].as_str()), (403, Some("insufficient_scope")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("company_admin"), "{err}");
    let (status, err) = g.post("/keys", json!({"name": "x", "group": "search"})).await;
    assert_eq!((status, err["error"]["code"].as_str()), (403, Some("insufficient_scope")), "{err}");
    let (status, err) = g.post("/keys", json!({"name": "x", "quotas": {"calls_per_minute": 60000}})).await;
    assert_eq!(status, 403, "quota overrides are for company admins: {err}");
    let (status, _) = g.post("/keys", json!({"kind": "agent", "name": "pay agents", "pools": ["pay"]})).await;
    assert_eq!(status, 201);
    let (status, err) = g.post("/keys", json!({"kind": "agent", "name": "find agents", "pools": ["find"]})).await;
    assert_eq!(status, 403, "{err}");

    // Pools: take an unassigned one, give it back; never another group's.
    rest(&g, "gadmin", "PUT", "/pools/newpool", json!({"group": "payments"}), Want::Ok).await;
    let (status, err) = g.put("/pools/find", json!({"group": "payments"})).await;
    assert_eq!(status, 403, "{err}");
    let (status, _) = g.put("/pools/newpool", json!({"group": "default"})).await;
    assert_eq!(status, 200);

    // It sees its group's keys only; others are not found.
    let (_, keys) = g.get("/keys").await;
    let names: BTreeSet<&str> = keys["items"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pay agents", "pay-dev", "pay-lead"].into_iter().collect(), "{keys}");
    rest(&g, "gadmin", "DELETE", &format!("/keys/{outsider}"), Value::Null, Want::NotFound).await;
    rest(&g, "gadmin", "DELETE", &format!("/keys/{dev_id}"), Value::Null, Want::Ok).await;
    assert_eq!(broker.api_with(&dev).get("/agents").await.0, 401, "revoked by its group admin");

    // The company admin sees all of it in the trail, with who did it.
    let created = audit(&admin, &format!("&actor={gadmin_id}")).await;
    let kinds: Vec<&str> = created.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"key_created") && kinds.contains(&"key_revoked") && kinds.contains(&"pool_assigned"),
        "{kinds:?}"
    );
    broker.stop().await;
}

const ACME_KEY: &str = "acme-admin-key-0123456789";
const ACME_AGENT_KEY: &str = "acme-agent-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_organizations_see_nothing_of_each_other() {
    let mut config = test_config();
    config.api_keys.push(ApiKeyConfig {
        org: Some("acme".into()),
        quotas: polling_quotas(),
        ..ApiKeyConfig::new("acme-admin", ACME_KEY).with_role(Role::CompanyAdmin)
    });
    config.agent_keys.push(AgentKeyConfig { org: Some("acme".into()), ..AgentKeyConfig::any_pool(ACME_AGENT_KEY) });
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let ours = broker.api_with(ADMIN_KEY);
    let theirs = broker.api_with(ACME_KEY);
    // Both organizations have a pool called `shop`.
    let our_agent = TestAgent::start(&broker.ws_url(), "shop", &[]);
    let their_agent = TestAgent::start_with_key(&broker.ws_url(), ACME_AGENT_KEY, "shop", &[]);
    wait_online(&ours, &our_agent.id()).await;
    wait_online(&theirs, &their_agent.id()).await;

    for (api, mine, other) in [(&ours, &our_agent, &their_agent), (&theirs, &their_agent, &our_agent)] {
        let (_, agents) = api.get("/agents").await;
        let ids: Vec<&str> =
            agents["items"].as_array().unwrap().iter().map(|a| a["agent_id"].as_str().unwrap()).collect();
        assert_eq!(ids, [mine.id()], "{agents}");
        assert_eq!(api.get(&format!("/agents/{}", other.id())).await.0, 404);
        let (status, _) = api.post("/actions", json!({"agent_ids": [other.id()], "file": "x.rs", "line": 1})).await;
        assert_eq!(status, 404);
    }
    let (_, our_action) = ours.post("/actions", snapshot("shop")).await;
    let (_, their_action) = theirs.post("/actions", snapshot("shop")).await;
    let reached = |a: &Value| -> Vec<String> {
        a["agents"].as_array().unwrap().iter().map(|x| x["agent_id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(reached(&our_action), [our_agent.id()], "pool `shop` of our organization only");
    assert_eq!(reached(&their_action), [their_agent.id()]);
    let theirs_id = their_action["action_id"].as_str().unwrap();
    for path in
        [format!("/actions/{theirs_id}"), format!("/actions/{theirs_id}/hits"), format!("/actions/{theirs_id}/lines")]
    {
        let (status, err) = ours.get(&path).await;
        assert_eq!((status, err["error"]["code"].as_str()), (404, Some("not_found")), "{path}: {err}");
    }
    assert_eq!(ours.delete(&format!("/actions/{theirs_id}")).await.0, 404);
    let (_, listed) = ours.get("/actions").await;
    assert!(!listed.to_string().contains(theirs_id));
    let client = connect_with(&broker, ADMIN_KEY).await.unwrap();
    let r = call(&client, "get_action", json!({"action_id": theirs_id})).await;
    assert_eq!(code(&r).as_deref(), Some("not_found"));
    let h = body(&call(&client, "system_health", json!({})).await);
    assert_eq!((h["agents_online"].as_u64(), h["actions_live"].as_u64()), (Some(1), Some(1)), "{h}");
    client.cancel().await.unwrap();

    // Redaction rules are per organization.
    let (status, _) = theirs.put("/redaction", json!({"builtins": {"disabled": ["email"]}})).await;
    assert_eq!(status, 200);
    let (_, our_rules) = ours.get("/redaction").await;
    assert_eq!(our_rules["builtins"]["disabled"], json!([]), "{our_rules}");

    // An agent of theirs claiming our agent's id is refused, and both trails say so.
    let mut req = broker.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ACME_AGENT_KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let register = json!({"type": "register", "protocol_version": 1, "agent_id": our_agent.id(), "display_name": "x",
                          "pool": "shop", "tags": [], "service": "x", "language": "test", "agent_version": "0"});
    ws.send(Message::text(register.to_string())).await.unwrap();
    let refusal = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("no refusal: {other:?}"),
        }
    };
    // The id is bound to our agent key: another organization's key is told so, without
    // learning whose it is.
    assert_eq!(refusal["code"], "identity_bound", "{refusal}");
    assert!(!refusal.to_string().contains("default"), "{refusal}");
    let (_, agent) = ours.get(&format!("/agents/{}", our_agent.id())).await;
    assert_eq!(agent["status"], "online", "our agent was not displaced");

    // Each trail holds its own organization's entries only.
    let our_trail = audit(&ours, "").await;
    let their_trail = audit(&theirs, "").await;
    assert!(our_trail.iter().all(|e| e["org"] == "default") && their_trail.iter().all(|e| e["org"] == "acme"));
    assert!(!serde_json::to_string(&our_trail).unwrap().contains(theirs_id));
    for trail in [&our_trail, &their_trail] {
        assert!(trail.iter().any(|e| e["kind"] == "agent_impersonation"), "both organizations learn of it");
    }
    assert!(their_trail.iter().any(|e| e["kind"] == "redaction_rules_changed"));
    assert!(!our_trail.iter().any(|e| e["kind"] == "redaction_rules_changed"));

    // `/metrics` shows each organization its own agents.
    let metrics = |key: &'static str| {
        let http = broker.http();
        async move {
            reqwest::Client::new()
                .get(format!("{http}/metrics"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let (m_ours, m_theirs) = (metrics(ADMIN_KEY).await, metrics(ACME_KEY).await);
    assert!(m_ours.contains(&our_agent.id()) && !m_ours.contains(&their_agent.id()));
    assert!(m_theirs.contains(&their_agent.id()) && !m_theirs.contains(&our_agent.id()));
    our_agent.shutdown();
    their_agent.shutdown();
    broker.stop().await;
}
