//! People sign in through OAuth clients: the protocol as a client sees it over HTTP
//! (metadata, registration, the sign-in and consent pages with their cookies and CSRF
//! tokens, codes with PKCE, tokens, refresh, revocation), and every mistake refused
//! with the error its RFC names. The browser flow with the official MCP client is in
//! `oauth_browser.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value as Json, json};
use sha2::Digest as _;

use crate::support::{ADMIN_KEY, Api, TestBroker, audit, temp_dir, test_config};

pub const PASSWORD: &str = "correct horse battery staple";

/// A broker with sign-in enabled (and a data directory, for `periscope users`).
pub async fn oauth_broker() -> TestBroker {
    let mut config = test_config();
    config.oauth.enabled = true;
    // The cheapest hash the configuration accepts: these tests are about the protocol.
    config.oauth.password_memory_kib = 8_192;
    config.oauth.password_iterations = 1;
    let dir = temp_dir("oauth");
    config.data_dir = Some(dir.clone());
    let mut broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    broker.data_dir = Some(dir);
    broker
}

/// Creates a user through the admin REST API; returns its id.
pub async fn create_user(broker: &TestBroker, name: &str, body: Json) -> String {
    let admin = broker.api_with(ADMIN_KEY);
    let mut body = body;
    body["name"] = json!(name);
    if body.get("password").is_none() {
        body["password"] = json!(PASSWORD);
    }
    let (status, v) = admin.post("/users", body).await;
    assert_eq!(status, 201, "{v}");
    v["user"]["user_id"].as_str().unwrap().to_owned()
}

/// A browser: no redirects followed, cookies kept.
pub struct Browser {
    client: reqwest::Client,
    cookies: HashMap<String, String>,
}

pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> String {
        self.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }

    /// The value of the hidden input `name` in the first form.
    pub fn hidden(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker).unwrap_or_else(|| panic!("no `{name}` in {}", self.body)) + marker.len();
        self.body[start..].split('"').next().unwrap().to_owned()
    }
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn keep(&mut self, r: reqwest::Response) -> Page {
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let pair = v.split(';').next().unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            self.cookies.insert(k.to_owned(), val.to_owned());
        }
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Page { status, headers, body: r.text().await.unwrap() }
    }

    pub async fn get(&mut self, url: &str) -> Page {
        let r = self.client.get(url).header("cookie", self.cookie_header()).send().await.unwrap();
        self.keep(r).await
    }

    pub async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> Page {
        let body: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let r = self
            .client
            .post(url)
            .header("cookie", self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        self.keep(r).await
    }
}

/// A PKCE verifier and its S256 challenge.
pub fn pkce() -> (String, String) {
    let verifier =
        format!("v{}-{}", periscope_protocol::ActionId::generate(), periscope_protocol::ActionId::generate());
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// Registers a public client (RFC 7591); returns its id.
pub async fn register(broker: &TestBroker, redirect_uri: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/register", broker.http()))
        .json(&json!({
            "client_name": "Test Client",
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: Json = r.json().await.unwrap();
    v["client_id"].as_str().unwrap().to_owned()
}

pub struct Authorization<'a> {
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub challenge: &'a str,
    pub scope: &'a str,
    pub resource: Option<String>,
}

impl Authorization<'_> {
    pub fn url(&self, broker: &TestBroker) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", self.client_id)
            .append_pair("redirect_uri", self.redirect_uri)
            .append_pair("code_challenge", self.challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("scope", self.scope)
            .append_pair("state", "st4te")
            .append_pair("resource", &self.resource.clone().unwrap_or_else(|| format!("{}/mcp", broker.http())));
        format!("{}/oauth/authorize?{}", broker.http(), q.finish())
    }
}

/// Signs `user` in and approves `keep` of the requested scopes; returns the code (and
/// checks `state` and `iss` came back).
pub async fn authorize(
    broker: &TestBroker,
    browser: &mut Browser,
    a: &Authorization<'_>,
    user: &str,
    keep: &[&str],
) -> String {
    let page = browser.get(&a.url(broker)).await;
    assert!(page.status == 200 || page.status == 303, "{}", page.body);
    let signed_in = if page.body.contains("action=\"/oauth/sign-in\"") {
        let (request, csrf) = (page.hidden("request"), page.hidden("csrf"));
        let page = browser
            .post(
                &format!("{}/oauth/sign-in", broker.http()),
                &[("request", &request), ("csrf", &csrf), ("username", user), ("password", PASSWORD)],
            )
            .await;
        assert_eq!(page.status, 303, "{}", page.body);
        browser.get(&format!("{}{}", broker.http(), page.location())).await
    } else {
        page
    };
    let page = if signed_in.status == 303 {
        signed_in
    } else {
        assert_eq!(signed_in.status, 200, "{}", signed_in.body);
        let (request, csrf) = (signed_in.hidden("request"), signed_in.hidden("csrf"));
        let mut form = vec![("request", request.as_str()), ("csrf", csrf.as_str()), ("decision", "approve")];
        for s in keep {
            form.push(("scope", s));
        }
        browser.post(&format!("{}/oauth/consent", broker.http()), &form).await
    };
    assert_eq!(page.status, 303, "{}", page.body);
    let location = url::Url::parse(&page.location()).unwrap();
    let q: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(q.get("state").map(String::as_str), Some("st4te"));
    assert_eq!(q.get("iss"), Some(&broker.http()));
    q.get("code").unwrap_or_else(|| panic!("no code in {location}")).clone()
}

/// POSTs a form to the token endpoint.
pub async fn token(broker: &TestBroker, form: &[(&str, &str)]) -> (u16, Json) {
    let r = reqwest::Client::new().post(format!("{}/oauth/token", broker.http())).form(form).send().await.unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers().get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
    (status, r.json().await.unwrap())
}

pub async fn exchange(
    broker: &TestBroker,
    client_id: &str,
    code: &str,
    redirect_uri: &str,
    verifier: &str,
) -> (u16, Json) {
    token(
        broker,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("client_id", client_id),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
            ("resource", &format!("{}/mcp", broker.http())),
        ],
    )
    .await
}

fn bearer(broker: &TestBroker, token: &str) -> Api {
    broker.api_with(token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_through_a_registered_client_and_gets_exactly_what_they_approved() {
    let broker = oauth_broker().await;
    let http = reqwest::Client::new();
    // Discovery, as an MCP client does it after a 401.
    let r = http.get(format!("{}/mcp", broker.http())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("resource_metadata=") && challenge.contains("scope=\"mcp:system:read"), "{challenge}");
    let prm: Json = http
        .get(format!("{}/.well-known/oauth-protected-resource/mcp", broker.http()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(prm["authorization_servers"], json!([broker.http()]));
    let asm: Json = http
        .get(format!("{}/.well-known/oauth-authorization-server", broker.http()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(asm["issuer"], broker.http());
    assert_eq!(asm["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(asm["client_id_metadata_document_supported"], true);
    for k in ["authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint"] {
        assert!(asm[k].as_str().unwrap().starts_with(&broker.http()), "{k}");
    }

    let ada = create_user(&broker, "ada@example.com", json!({})).await;
    let redirect = "http://127.0.0.1/callback";
    let client_id = register(&broker, redirect).await;
    let (verifier, challenge) = pkce();
    // The client listens on whatever loopback port is free (RFC 8252).
    let redirect_port = "http://127.0.0.1:49152/callback";
    let a = Authorization {
        client_id: &client_id,
        redirect_uri: redirect_port,
        challenge: &challenge,
        scope: "mcp:system:read mcp:agents:read mcp:actions:write mcp:hits:read",
        resource: None,
    };
    let mut browser = Browser::new();
    // The person removes mcp:actions:write on the consent page.
    let code = authorize(
        &broker,
        &mut browser,
        &a,
        "ada@example.com",
        &["mcp:system:read", "mcp:agents:read", "mcp:hits:read"],
    )
    .await;
    let (status, t) = exchange(&broker, &client_id, &code, redirect_port, &verifier).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["scope"], "mcp:system:read mcp:agents:read mcp:hits:read");
    assert_eq!(t["expires_in"], 3600);
    let access = t["access_token"].as_str().unwrap().to_owned();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();

    // The token carries the person's reach and the scopes they approved.
    let api = bearer(&broker, &access);
    let (status, health) = api.get("/health").await;
    assert_eq!(status, 200, "{health}");
    let (status, v) = api.get("/agents").await;
    assert_eq!(status, 200, "{v}");
    let r = http
        .post(format!("{}/api/v1/actions", broker.http()))
        .bearer_auth(&access)
        .json(&json!({ "kind": "snapshot", "pool": "p", "file": "x.rs", "line": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"mcp:actions:write\""),
        "{challenge}"
    );
    // Administration is beyond a developer, whatever the client asks.
    assert_eq!(api.get("/users").await.0, 403);

    // Refresh: a new pair; the old access token is replaced.
    let refresh_form = |rt: &str| {
        vec![
            ("grant_type".to_owned(), "refresh_token".to_owned()),
            ("refresh_token".to_owned(), rt.to_owned()),
            ("client_id".to_owned(), client_id.clone()),
        ]
    };
    let form1 = refresh_form(&refresh);
    let form1: Vec<(&str, &str)> = form1.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let (status, t2) = token(&broker, &form1).await;
    assert_eq!(status, 200, "{t2}");
    let access2 = t2["access_token"].as_str().unwrap().to_owned();
    assert_ne!(access2, access);
    assert_eq!(bearer(&broker, &access).get("/health").await.0, 401, "the replaced access token fails");
    assert_eq!(bearer(&broker, &access2).get("/health").await.0, 200);
    // A narrowing refresh is allowed, a widening one is `invalid_scope`.
    let refresh2 = t2["refresh_token"].as_str().unwrap().to_owned();
    let mut wide = refresh_form(&refresh2);
    wide.push(("scope".into(), "mcp:actions:write".into()));
    let wide: Vec<(&str, &str)> = wide.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let (status, e) = token(&broker, &wide).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_scope")), "{e}");

    // Reuse of the first (rotated) refresh token revokes the whole grant.
    let (status, e) = token(&broker, &form1).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    assert_eq!(bearer(&broker, &access2).get("/health").await.0, 401, "the grant is revoked");
    let f2 = refresh_form(&refresh2);
    let f2: Vec<(&str, &str)> = f2.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(token(&broker, &f2).await.1["error"], "invalid_grant");

    // The audit trail names the person and the client.
    let admin = broker.api_with(ADMIN_KEY);
    let entries = audit(&admin, "").await;
    let kinds: Vec<&str> = entries.iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["user_created", "user_signed_in", "oauth_client_authorized", "oauth_grant_revoked"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let authorized = entries.iter().find(|e| e["kind"] == "oauth_client_authorized").unwrap();
    assert_eq!(authorized["actor"]["type"], "user");
    assert_eq!(authorized["actor"]["id"], ada.as_str());
    assert_eq!(authorized["actor"]["client_id"], client_id.as_str());
    assert_eq!(authorized["actor"]["client_name"], "Test Client");
    let reused = entries.iter().find(|e| e["kind"] == "oauth_grant_revoked").unwrap();
    assert_eq!(reused["data"]["reason"], "refresh_token_reused");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_protocol_mistake_is_refused_with_the_error_its_rfc_names() {
    let broker = oauth_broker().await;
    create_user(&broker, "bob", json!({})).await;
    let redirect = "http://127.0.0.1:8765/cb";
    let client_id = register(&broker, redirect).await;
    let scope = "mcp:agents:read";
    let mut browser = Browser::new();

    // Unknown redirect URI: an error page, and nothing is sent to that URI.
    let (_, challenge) = pkce();
    let evil = Authorization {
        client_id: &client_id,
        redirect_uri: "http://127.0.0.1:8765/elsewhere",
        challenge: &challenge,
        scope,
        resource: None,
    };
    let page = browser.get(&evil.url(&broker)).await;
    assert_eq!(page.status, 400);
    assert!(page.location().is_empty() && page.body.contains("not registered"), "{}", page.body);
    // Unknown client.
    let unknown = Authorization {
        client_id: "pcl_nosuchclient",
        redirect_uri: redirect,
        challenge: &challenge,
        scope,
        resource: None,
    };
    assert_eq!(browser.get(&unknown.url(&broker)).await.status, 400);
    // Errors after the redirect URI is trusted go back to the client.
    let q = |page: &crate::oauth::Page| -> HashMap<String, String> {
        url::Url::parse(&page.location()).unwrap().query_pairs().into_owned().collect()
    };
    let other_broker = Authorization {
        client_id: &client_id,
        redirect_uri: redirect,
        challenge: &challenge,
        scope,
        resource: Some("https://other-broker.example.com/mcp".into()),
    };
    let page = browser.get(&other_broker.url(&broker)).await;
    assert_eq!((page.status, q(&page)["error"].as_str()), (303, "invalid_target"));
    let bad_scope = Authorization {
        client_id: &client_id,
        redirect_uri: redirect,
        challenge: &challenge,
        scope: "mcp:everything",
        resource: None,
    };
    let page = browser.get(&bad_scope.url(&broker)).await;
    assert_eq!(q(&page)["error"], "invalid_scope");
    let plain = format!(
        "{}&code_challenge_method=plain",
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None }
            .url(&broker)
            .replace("&code_challenge_method=S256", "")
    );
    let page = browser.get(&plain).await;
    assert_eq!(q(&page)["error"], "invalid_request");

    // Wrong PKCE verifier: invalid_grant (and the code is spent).
    let (verifier, challenge) = pkce();
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let code = authorize(&broker, &mut browser, &a, "bob", &[scope]).await;
    let (wrong, _) = pkce();
    let (status, e) = exchange(&broker, &client_id, &code, redirect, &wrong).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    assert!(e["error_description"].as_str().unwrap().contains("code_verifier"), "{e}");
    let _ = verifier;

    // Reused code: invalid_grant, and the tokens of the first exchange are revoked.
    let (verifier, challenge) = pkce();
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let code = authorize(&broker, &mut browser, &a, "bob", &[scope]).await;
    let (status, first) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!(status, 200, "{first}");
    let access = first["access_token"].as_str().unwrap();
    assert_eq!(bearer(&broker, access).get("/agents").await.0, 200);
    let (status, e) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    assert_eq!(bearer(&broker, access).get("/agents").await.0, 401, "a replayed code revokes its tokens");

    // A token for another resource: invalid_target.
    let (verifier, challenge) = pkce();
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let code = authorize(&broker, &mut browser, &a, "bob", &[scope]).await;
    let (status, e) = token(
        &broker,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", &client_id),
            ("redirect_uri", redirect),
            ("code_verifier", &verifier),
            ("resource", "https://other-broker.example.com/mcp"),
        ],
    )
    .await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_target")), "{e}");

    // Another client presenting the code, unknown clients, unknown grant types.
    let (verifier, challenge) = pkce();
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let code = authorize(&broker, &mut browser, &a, "bob", &[scope]).await;
    let other = register(&broker, redirect).await;
    let (status, e) = exchange(&broker, &other, &code, redirect, &verifier).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    let (status, e) = exchange(&broker, "pcl_unknown", &code, redirect, &verifier).await;
    assert_eq!((status, e["error"].as_str()), (401, Some("invalid_client")), "{e}");
    let (status, e) = token(&broker, &[("grant_type", "password"), ("client_id", &client_id)]).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("unsupported_grant_type")), "{e}");
    let (status, e) = token(&broker, &[("grant_type", "authorization_code"), ("grant_type", "refresh_token")]).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_request")), "{e}");

    // Registration: bad metadata is named.
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/register", broker.http()))
        .json(&json!({ "redirect_uris": ["http://evil.example.com/cb"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Json>().await.unwrap()["error"], "invalid_redirect_uri");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_refuse_cross_site_forms_framing_and_password_guessing() {
    let broker = oauth_broker().await;
    let carol = create_user(&broker, "carol", json!({})).await;
    let redirect = "http://127.0.0.1:8765/cb";
    let client_id = register(&broker, redirect).await;
    let (_, challenge) = pkce();
    let a = Authorization {
        client_id: &client_id,
        redirect_uri: redirect,
        challenge: &challenge,
        scope: "mcp:agents:read",
        resource: None,
    };
    let mut browser = Browser::new();
    let page = browser.get(&a.url(&broker)).await;
    assert_eq!(page.status, 200);
    for (h, want) in [("x-frame-options", "DENY"), ("cache-control", "no-store"), ("referrer-policy", "no-referrer")] {
        assert_eq!(page.headers[h], want, "{h}");
    }
    assert!(page.headers["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    assert!(
        page.body.contains("Test Client") && page.body.contains("mcp:agents:read"),
        "the page says who asks for what"
    );
    let (request, csrf) = (page.hidden("request"), page.hidden("csrf"));

    // The same form posted from another browser (no binding cookie) or with another
    // token is refused.
    let mut other = Browser::new();
    let sign_in = format!("{}/oauth/sign-in", broker.http());
    let r = other
        .post(&sign_in, &[("request", &request), ("csrf", &csrf), ("username", "carol"), ("password", PASSWORD)])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = browser
        .post(&sign_in, &[("request", &request), ("csrf", "pcf_forged"), ("username", "carol"), ("password", PASSWORD)])
        .await;
    assert_eq!(r.status, 403);

    // Guessing: refused as wrong, then rate-limited per user; audited, aggregated.
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = browser
            .post(
                &sign_in,
                &[("request", &request), ("csrf", &csrf), ("username", "carol"), ("password", "wrong password!!")],
            )
            .await;
        statuses.push(r.status);
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(statuses[6], 429, "{statuses:?}");
    let entries = audit(&broker.api_with(ADMIN_KEY), "&kind=user_sign_in_failed").await;
    assert_eq!(entries.len(), 1, "aggregated: {entries:?}");
    assert_eq!(entries[0]["actor"]["id"], carol.as_str());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_disabling_a_user_hold_on_the_next_call() {
    let broker = oauth_broker().await;
    create_user(&broker, "dave", json!({})).await;
    let redirect = "http://127.0.0.1:8765/cb";
    let client_id = register(&broker, redirect).await;
    let scope = "mcp:agents:read mcp:hits:read";
    let mut browser = Browser::new();
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (verifier, challenge) = pkce();
        let a = Authorization {
            client_id: &client_id,
            redirect_uri: redirect,
            challenge: &challenge,
            scope,
            resource: None,
        };
        let code = authorize(&broker, &mut browser, &a, "dave", &["mcp:agents:read", "mcp:hits:read"]).await;
        let (status, t) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
        assert_eq!(status, 200, "{t}");
        tokens.push((t["access_token"].as_str().unwrap().to_owned(), t["refresh_token"].as_str().unwrap().to_owned()));
    }
    // The second sign-in in the same browser skipped the password (the session) and the
    // consent (already given for these scopes).

    // RFC 7009: the client revokes its refresh token; the access token fails next.
    let revoke = |token: String| {
        let (http, client_id) = (broker.http(), client_id.clone());
        async move {
            reqwest::Client::new()
                .post(format!("{http}/oauth/revoke"))
                .form(&[
                    ("token", token.as_str()),
                    ("client_id", client_id.as_str()),
                    ("token_type_hint", "refresh_token"),
                ])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(bearer(&broker, &tokens[0].0).get("/agents").await.0, 200);
    assert_eq!(revoke(tokens[0].1.clone()).await, 200);
    assert_eq!(bearer(&broker, &tokens[0].0).get("/agents").await.0, 401);
    assert_eq!(revoke("por_unknowntoken".into()).await, 200, "unknown tokens are answered 200");

    // `periscope users disable` runs this on its own connection to the data directory
    // (another process; cli/tests/cli.rs runs the command itself): the second token
    // fails next.
    assert_eq!(bearer(&broker, &tokens[1].0).get("/agents").await.0, 200);
    let dir = broker.data_dir.clone().unwrap();
    let disabled = std::thread::spawn(move || {
        use periscope_broker::oauth::OAuthStore as _;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = periscope_broker::oauth::sqlite::SqliteOAuthStore::open(&dir).unwrap();
            let passwords = periscope_broker::oauth::users::Passwords::new(8_192, 1).unwrap();
            let dave = store.users().await.unwrap().into_iter().find(|u| u.name == "dave").unwrap();
            let change = periscope_broker::oauth::admin::UserChange { disabled: Some(true), ..Default::default() };
            periscope_broker::oauth::admin::change(
                &store,
                &passwords,
                &dave,
                change,
                periscope_broker::audit::Actor::cli(),
                |_| Ok(()),
            )
            .await
            .unwrap()
        })
    })
    .join()
    .unwrap();
    assert!(disabled.disabled_at_ms.is_some(), "{disabled:?}");
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/agents", broker.http()))
        .bearer_auth(&tokens[1].0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    let (status, e) =
        token(&broker, &[("grant_type", "refresh_token"), ("refresh_token", &tokens[1].1), ("client_id", &client_id)])
            .await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    broker.stop().await;
}

/// Serves the document `body(port)` over HTTPS on a loopback port with a certificate
/// for `localhost` signed by a private CA; returns the port and the CA's PEM.
async fn https_document(body: impl Fn(u16) -> String) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (ca_pem, cert, key) = crate::tls::certificates();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = body(port);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_metadata_document_identifies_a_client_and_private_addresses_are_refused_unless_allowed() {
    let (port, ca_pem) = https_document(|port| {
        json!({
            "client_id": format!("https://localhost:{port}/client.json"),
            "client_name": "Metadata Client",
            "redirect_uris": ["http://127.0.0.1/cb"],
            "token_endpoint_auth_method": "none",
        })
        .to_string()
    })
    .await;
    let client_id = format!("https://localhost:{port}/client.json");
    let (verifier, challenge) = pkce();
    let redirect = "http://127.0.0.1:5555/cb";
    let a = Authorization {
        client_id: &client_id,
        redirect_uri: redirect,
        challenge: &challenge,
        scope: "mcp:agents:read",
        resource: None,
    };

    // Default: localhost is no public address, so the broker does not fetch (SSRF guard).
    let broker = oauth_broker().await;
    let page = Browser::new().get(&a.url(&broker)).await;
    assert_eq!(page.status, 400);
    assert!(page.body.contains("no public address"), "{}", page.body);
    broker.stop().await;

    // An operator who allows private addresses and trusts the company CA.
    let ca_file = temp_dir("ca").with_extension("pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let mut config = test_config();
    config.oauth.enabled = true;
    config.oauth.password_memory_kib = 8_192;
    config.oauth.password_iterations = 1;
    config.oauth.client_metadata.allow_private_addresses = true;
    config.oauth.client_metadata.extra_ca_file = Some(ca_file);
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    create_user(&broker, "erin", json!({})).await;
    let mut browser = Browser::new();
    let page = browser.get(&a.url(&broker)).await;
    assert!(page.body.contains("Metadata Client"), "{}", page.body);
    let code = authorize(&broker, &mut browser, &a, "erin", &["mcp:agents:read"]).await;
    let (status, t) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(bearer(&broker, t["access_token"].as_str().unwrap()).get("/agents").await.0, 200);
    // A redirect URI the document does not list is refused.
    let (_, c2) = pkce();
    let wrong = Authorization {
        client_id: &client_id,
        redirect_uri: "http://127.0.0.1:5555/other",
        challenge: &c2,
        scope: "mcp:agents:read",
        resource: None,
    };
    assert_eq!(browser.get(&wrong.url(&broker)).await.status, 400);
    broker.stop().await;
}

/// Signs `user` in through a new registered client; returns the access token.
async fn token_for(broker: &TestBroker, user: &str, scope: &str) -> String {
    let redirect = "http://127.0.0.1:8765/cb";
    let client_id = register(broker, redirect).await;
    let (verifier, challenge) = pkce();
    let a =
        Authorization { client_id: &client_id, redirect_uri: redirect, challenge: &challenge, scope, resource: None };
    let keep: Vec<&str> = scope.split(' ').collect();
    let code = authorize(broker, &mut Browser::new(), &a, user, &keep).await;
    let (status, t) = exchange(broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!(status, 200, "{t}");
    t["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_tokens_are_charged_audited_and_bound_to_their_sessions_like_keys() {
    let broker = oauth_broker().await;
    // An agent of the pool is online (a placement needs one).
    let agent = crate::support::TestAgent::start(&broker.ws_url(), "shop", &[]);
    crate::support::wait_online(&broker.api(), &agent.id()).await;
    let quotas = json!({ "calls_per_minute": 60, "call_burst": 4, "live_actions": 1 });
    create_user(&broker, "frank", json!({ "quotas": quotas, "pools": ["shop"] })).await;
    let scope = "mcp:system:read mcp:agents:read mcp:actions:write mcp:hits:read";
    let first = token_for(&broker, "frank", scope).await;
    let second = token_for(&broker, "frank", scope).await;

    // An action placed with a person's token is theirs, within their pools, and the
    // audit trail names them and the client.
    let api = broker.api_with(&first);
    let place =
        |pool: &str| json!({ "kind": "snapshot", "pool": pool, "file": "x.rs", "line": 7, "allow_pending": true });
    let (status, v) = api.post("/actions", place("shop")).await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = api.post("/actions", place("payments")).await;
    assert!(status == 404 || status == 403 || status == 422, "outside the person's pools: {status} {v}");
    // Quotas are the person's, across their clients: the second client shares them.
    let (status, v) = broker.api_with(&second).post("/actions", place("shop")).await;
    assert_eq!((status, v["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{v}");
    let entries = audit(&broker.api_with(ADMIN_KEY), "&kind=action_placed").await;
    let placed = entries.iter().find(|e| e["actor"]["name"] == "frank").expect("the placement is audited");
    assert_eq!(placed["actor"]["type"], "user");
    assert_eq!(placed["actor"]["client_name"], "Test Client");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(broker.api_with(&first).get("/health").await.0);
    }
    assert!(statuses.contains(&429), "the person's call rate is charged: {statuses:?}");

    // An MCP session opened through one client answers only that client.
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    // Calls refill at one a second: room for the three below.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let r = http
        .post(format!("{}/mcp", broker.http()))
        .bearer_auth(&second)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    let with = |token: &str| {
        http.post(format!("{}/mcp", broker.http()))
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", "2025-06-18")
            .json(&ping)
    };
    assert_eq!(with(&first).send().await.unwrap().status(), 404, "the same person through another client");
    assert_ne!(with(&second).send().await.unwrap().status(), 404, "the client that opened it");
    drop(agent);
    broker.stop().await;
}
