//! Sign-in delegated to an upstream OpenID Connect provider, against a real one: panva's
//! `oidc-provider` (OpenID Certified; `scripts/test` installs it with Node 22) in its own
//! process, its sign-in and consent pages posted as a browser would. The broker reads the
//! provider's discovery document, sends the person there with PKCE, exchanges the code
//! with its client secret, verifies the RS256 ID token against the provider's published
//! keys, and signs the person in as the Periscope user the token names.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncBufReadExt as _;

use crate::oauth::{Browser, Page, exchange, pkce, register};
use crate::support::{ADMIN_KEY, TestBroker, audit, test_config};

const CLIENT_SECRET: &str = "periscope-oidc-test-secret-0123456789";

/// The provider process, killed when dropped.
struct Provider {
    issuer: String,
    _child: tokio::process::Child,
}

async fn provider(broker_port: u16, client_secret: &str) -> Provider {
    let node = std::env::var("PERISCOPE_NODE").unwrap_or_else(|_| {
        panic!("PERISCOPE_NODE is not set: run the tests through scripts/test, which installs Node 22")
    });
    let modules = std::env::var("PERISCOPE_NODE_MODULES")
        .unwrap_or_else(|_| panic!("PERISCOPE_NODE_MODULES is not set: run the tests through scripts/test"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/it/oidc_provider.mjs");
    let mut child = tokio::process::Command::new(node)
        .arg(script)
        .arg(modules)
        .arg("periscope")
        .arg(client_secret)
        .arg(format!("http://127.0.0.1:{broker_port}/oauth/upstream/callback"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(p) = line.strip_prefix("listening ") {
                return p.trim().parse::<u16>().ok();
            }
        }
        None
    })
    .await
    .expect("the provider starts within 30 s")
    .expect("the provider prints its port");
    // It keeps writing notices: drain them, or a closed pipe ends it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Provider { issuer: format!("http://127.0.0.1:{port}"), _child: child }
}

/// A free loopback port for the broker (the provider needs its callback URL first).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn broker_with(port: u16, issuer: &str, secret: &str, provision: bool) -> TestBroker {
    let mut config = test_config();
    config.oauth.enabled = true;
    config.oauth.password_memory_kib = 8_192;
    config.oauth.password_iterations = 1;
    config.oauth.oidc = Some(periscope_broker::oauth::config::OidcSettings {
        issuer: issuer.to_owned(),
        client_id: "periscope".into(),
        client_secret: secret.to_owned(),
        display_name: Some("Example SSO".into()),
        username_claim: "email".into(),
        provision_role: provision.then_some(periscope_broker::auth::Role::Developer),
        provision_org: None,
        provision_group: None,
        extra_ca_file: None,
        allow_private_addresses: true,
    });
    TestBroker::start_with(config, format!("127.0.0.1:{port}").parse().unwrap()).await
}

/// Follows redirects (relative or absolute) until a page that is not one.
async fn follow(browser: &mut Browser, mut page: Page, mut origin: String) -> (Page, String) {
    for _ in 0..20 {
        if !(300..400).contains(&page.status) {
            return (page, origin);
        }
        let location = page.location();
        let url = if location.starts_with("http") { location } else { format!("{origin}{location}") };
        let parsed = url::Url::parse(&url).unwrap();
        origin = parsed.origin().ascii_serialization();
        page = browser.get(&url).await;
    }
    panic!("too many redirects");
}

/// The action of the first form on a provider page, as an absolute URL.
fn form_action(page: &Page, origin: &str) -> String {
    let start = page.body.find("action=\"").expect("a form") + 8;
    let action = page.body[start..].split('"').next().unwrap().replace("&amp;", "&");
    if action.starts_with("http") { action } else { format!("{origin}{action}") }
}

/// Signs in at the broker through the provider as `login`; returns the broker's page
/// after the provider sent the browser back.
async fn sign_in_upstream(
    broker: &TestBroker,
    browser: &mut Browser,
    client_id: &str,
    challenge: &str,
    login: &str,
) -> Page {
    let a = crate::oauth::Authorization {
        client_id,
        redirect_uri: "http://127.0.0.1:7000/cb",
        challenge,
        scope: "mcp:system:read mcp:agents:read",
        resource: None,
    };
    let page = browser.get(&a.url(broker)).await;
    assert!(page.body.contains("Sign in with Example SSO"), "{}", page.body);
    let form = [("request", page.hidden("request")), ("csrf", page.hidden("csrf"))];
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = browser.post(&format!("{}/oauth/upstream", broker.http()), &form).await;
    assert_eq!(page.status, 303, "{}", page.body);
    // The provider's own sign-in page, then its consent page.
    let (page, origin) = follow(browser, page, broker.http()).await;
    assert!(page.body.contains("name=\"login\""), "the provider's sign-in page: {}", page.body);
    let page =
        browser.post(&form_action(&page, &origin), &[("prompt", "login"), ("login", login), ("password", "any")]).await;
    let (page, origin) = follow(browser, page, origin).await;
    assert!(page.body.contains("name=\"prompt\" value=\"consent\""), "the provider's consent page: {}", page.body);
    let page = browser.post(&form_action(&page, &origin), &[("prompt", "consent")]).await;
    follow(browser, page, origin).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_with_the_company_openid_provider_and_a_wrong_secret_is_refused() {
    let port = free_port();
    let idp = provider(port, CLIENT_SECRET).await;
    let broker = broker_with(port, &idp.issuer, CLIENT_SECRET, false).await;
    // Ada exists in Periscope (no password: she signs in through the provider only).
    let admin = broker.api_with(ADMIN_KEY);
    let (status, v) = admin.post("/users", json!({ "name": "ada@example.com", "role": "developer" })).await;
    assert_eq!(status, 201, "{v}");

    let redirect = "http://127.0.0.1:7000/cb";
    let client_id = register(&broker, redirect).await;
    let (verifier, challenge) = pkce();
    let mut browser = Browser::new();
    let page = sign_in_upstream(&broker, &mut browser, &client_id, &challenge, "ada@example.com").await;
    // Back at the broker, signed in: its consent page.
    assert!(page.body.contains("Signed in as <strong>ada@example.com</strong>"), "{}", page.body);
    let form = [
        ("request", page.hidden("request")),
        ("csrf", page.hidden("csrf")),
        ("decision", "approve".to_owned()),
        ("scope", "mcp:system:read".to_owned()),
        ("scope", "mcp:agents:read".to_owned()),
    ];
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = browser.post(&format!("{}/oauth/consent", broker.http()), &form).await;
    assert_eq!(page.status, 303, "{}", page.body);
    let code =
        url::Url::parse(&page.location()).unwrap().query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let (status, t) = exchange(&broker, &client_id, &code, redirect, &verifier).await;
    assert_eq!(status, 200, "{t}");
    let (status, health) = broker.api_with(t["access_token"].as_str().unwrap()).get("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["caller"]["name"], "ada@example.com");
    let signed = audit(&admin, "&kind=user_signed_in").await;
    assert_eq!(signed[0]["data"]["method"], "oidc", "{signed:?}");

    // Someone the provider knows but Periscope does not: refused (no provisioning).
    let (_, challenge) = pkce();
    let page = sign_in_upstream(&broker, &mut Browser::new(), &client_id, &challenge, "eve@example.com").await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("no Periscope user"), "{}", page.body);
    broker.stop().await;

    // A broker whose client secret the provider does not accept gets no sign-in.
    let port = free_port();
    let idp = provider(port, CLIENT_SECRET).await;
    let broker = broker_with(port, &idp.issuer, "not-the-right-secret-0123456789", true).await;
    let client_id = register(&broker, redirect).await;
    let (_, challenge) = pkce();
    let page = sign_in_upstream(&broker, &mut Browser::new(), &client_id, &challenge, "ada@example.com").await;
    assert_eq!(page.status, 401, "{}", page.body);
    assert!(page.body.contains("refused"), "{}", page.body);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_unknown_to_periscope_is_created_at_first_sign_in_when_provisioning_is_on() {
    let port = free_port();
    let idp = provider(port, CLIENT_SECRET).await;
    let broker = broker_with(port, &idp.issuer, CLIENT_SECRET, true).await;
    let client_id = register(&broker, "http://127.0.0.1:7000/cb").await;
    let (_, challenge) = pkce();
    let page = sign_in_upstream(&broker, &mut Browser::new(), &client_id, &challenge, "new.person@example.com").await;
    assert!(page.body.contains("Signed in as <strong>new.person@example.com</strong>"), "{}", page.body);
    let (status, users) = broker.api_with(ADMIN_KEY).get("/users").await;
    assert_eq!(status, 200);
    let user =
        users["users"].as_array().unwrap().iter().find(|u| u["name"] == "new.person@example.com").cloned().unwrap();
    assert_eq!(user["role"], "developer");
    assert!(user["external_id"].as_str().unwrap().starts_with(&idp.issuer), "{user}");
    broker.stop().await;
}
