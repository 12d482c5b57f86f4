//! The sign-in, consent and error pages: plain HTML rendered on the server, no script,
//! every value escaped. Every page is sent with headers that forbid framing
//! (`X-Frame-Options: DENY`, `frame-ancestors 'none'`), caching and referrers, and a
//! content security policy that allows nothing but its own inline style and form posts
//! to the broker (and, for the consent page, the client's redirect).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::Scope;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// What each scope lets a client do, for the consent page.
pub fn describe(scope: Scope) -> &'static str {
    match scope {
        Scope::SystemRead => "See the broker's health and your quotas",
        Scope::AgentsRead => "List connected services (agents), their pools and inspectable code locations",
        Scope::ActionsWrite => "Place and remove snapshots, dynamic logs and metrics on running services",
        Scope::HitsRead => "Read what your actions captured (redacted snapshots, log lines, metric figures)",
        Scope::Admin => "Administer keys, users, groups, pools, redaction rules and read the audit trail",
    }
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}\
main{max-width:30rem;margin:3rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}\
h1{font-size:1.3rem;margin-top:0}label{display:block;margin:.8rem 0 .2rem}\
input[type=text],input[type=password]{width:100%;padding:.5rem;box-sizing:border-box;font-size:1rem}\
button{font-size:1rem;padding:.5rem 1.2rem;margin:1rem .5rem 0 0;cursor:pointer}\
.scope{display:flex;gap:.6rem;align-items:flex-start;margin:.6rem 0}.scope small{display:block;color:#566}\
.muted{color:#566;font-size:.9rem}.error{background:#fde8e8;color:#8a1c1c;padding:.6rem;border-radius:4px}\
code{background:#eef;padding:0 .2rem;border-radius:3px;word-break:break-all}";

/// A page with the protective headers. `form_target` is an extra origin forms may
/// submit to (the consent page redirects the browser to the client).
pub fn page(status: StatusCode, title: &str, body: &str, form_target: Option<&str>) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width,initial-scale=1\"><meta name=\"referrer\" content=\"no-referrer\">\
         <title>{} · Periscope</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>",
        esc(title)
    );
    let form_action = match form_target {
        Some(origin) => format!("'self' {origin}"),
        None => "'self'".into(),
    };
    let csp = format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; frame-ancestors 'none'; \
         base-uri 'none'"
    );
    let mut response = (status, html).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    response
}

/// An error page (nothing is sent to the client: its request could not be trusted).
pub fn error(status: StatusCode, title: &str, message: &str) -> Response {
    page(
        status,
        title,
        &format!(
            "<h1>{}</h1><p class=\"error\">{}</p><p class=\"muted\">You can close this window.</p>",
            esc(title),
            esc(message)
        ),
        None,
    )
}

/// Who asks, as the pages show it.
pub struct Asking<'a> {
    /// The client's name (its own claim).
    pub client_name: &'a str,
    /// The client id (a URL for metadata documents: its host is verified).
    pub client_id: &'a str,
    /// Where the browser goes after.
    pub redirect_uri: &'a str,
}

fn asking_html(a: &Asking<'_>) -> String {
    let host = reqwest::Url::parse(a.redirect_uri)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| a.redirect_uri.to_owned());
    format!(
        "<p><strong>{}</strong> wants to use Periscope on your behalf.</p><p class=\"muted\">Client \
         <code>{}</code>; you will be sent back to <code>{}</code>.</p>",
        esc(a.client_name),
        esc(a.client_id),
        esc(&host)
    )
}

/// A pending request as its forms carry it.
pub struct Pending<'a> {
    /// Who asks.
    pub asking: Asking<'a>,
    /// The request's id.
    pub request_id: &'a str,
    /// The form's CSRF token.
    pub csrf: &'a str,
    /// What is asked for.
    pub scopes: &'a [Scope],
}

/// The sign-in page.
pub fn sign_in(
    p: &Pending<'_>,
    name: &str,
    problem: Option<&str>,
    upstream: Option<&str>,
    status: StatusCode,
) -> Response {
    let (a, request_id, csrf, scopes) = (&p.asking, p.request_id, p.csrf, p.scopes);
    let problem = problem.map(|p| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(p))).unwrap_or_default();
    let asked: Vec<String> = scopes.iter().map(|s| format!("<code>{}</code>", esc(s.as_str()))).collect();
    let upstream = upstream
        .map(|label| {
            format!(
                "<form method=\"post\" action=\"/oauth/upstream\"><input type=\"hidden\" name=\"request\" value=\"{}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"upstream\" type=\"submit\">Sign in \
                 with {}</button></form><p class=\"muted\">or with a Periscope password:</p>",
                esc(request_id),
                esc(csrf),
                esc(label)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in to Periscope</h1>{}<p class=\"muted\">It asks for: {}.</p>{problem}{upstream}\
         <form method=\"post\" action=\"/oauth/sign-in\"><input type=\"hidden\" name=\"request\" value=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><label for=\"username\">User name</label>\
         <input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" required value=\"{}\">\
         <label for=\"password\">Password</label><input type=\"password\" id=\"password\" name=\"password\" \
         autocomplete=\"current-password\" required><button id=\"sign-in\" type=\"submit\">Sign in</button></form>",
        asking_html(a),
        asked.join(", "),
        esc(request_id),
        esc(csrf),
        esc(name)
    );
    page(status, "Sign in", &body, None)
}

/// The consent page: each requested scope the person holds is a checked box they may
/// clear; scopes beyond their role are listed as not grantable.
#[allow(clippy::too_many_arguments)]
pub fn consent(
    a: &Asking<'_>,
    request_id: &str,
    csrf: &str,
    user: &str,
    grantable: &[Scope],
    refused: &[Scope],
    problem: Option<&str>,
) -> Response {
    let problem = problem.map(|p| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(p))).unwrap_or_default();
    let boxes: String = grantable
        .iter()
        .map(|s| {
            format!(
                "<div class=\"scope\"><input type=\"checkbox\" name=\"scope\" id=\"scope-{0}\" value=\"{0}\" checked>\
                 <label for=\"scope-{0}\" style=\"margin:0\"><code>{0}</code><small>{1}</small></label></div>",
                esc(s.as_str()),
                esc(describe(*s))
            )
        })
        .collect();
    let refused = if refused.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = refused.iter().map(|s| format!("<code>{}</code>", esc(s.as_str()))).collect();
        format!("<p class=\"muted\">Not grantable with your role: {}.</p>", names.join(", "))
    };
    // Where the approval's redirect goes must be a form target too (browsers apply
    // `form-action` to the redirect): the origin, or for a private-use scheme the scheme.
    let origin = reqwest::Url::parse(a.redirect_uri).ok().map(|u| match u.origin() {
        o @ url::Origin::Tuple(..) => o.ascii_serialization(),
        url::Origin::Opaque(_) => format!("{}:", u.scheme()),
    });
    let body = format!(
        "<h1>Allow access?</h1>{}<p>Signed in as <strong>{}</strong>. Clear what you do not want to allow; the \
         client can do only what is checked, and only within your own access.</p>{problem}\
         <form method=\"post\" action=\"/oauth/consent\"><input type=\"hidden\" name=\"request\" value=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{boxes}{refused}\
         <button id=\"approve\" type=\"submit\" name=\"decision\" value=\"approve\">Allow</button>\
         <button id=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        asking_html(a),
        esc(user),
        esc(request_id),
        esc(csrf),
    );
    page(StatusCode::OK, "Allow access", &body, origin.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_pages_refuse_framing_and_caching() {
        assert_eq!(esc("<a href=\"x\">'&'</a>\u{0}"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        let r = error(StatusCode::BAD_REQUEST, "Bad", "<script>");
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{csp}");
    }
}
