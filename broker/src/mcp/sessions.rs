//! Who owns each MCP session.
//!
//! rmcp keeps the sessions (`LocalSessionManager`) and serves any request that carries a
//! known `Mcp-Session-Id`: posting into the session, resuming its streams (`GET` with
//! `Last-Event-ID`, which replays the results cached for it) and ending it (`DELETE`).
//! The id alone would be enough, whoever's key came with it. So every session is bound
//! to the key that created it (its id and organization, taken from the `initialize`
//! response as it passes, before the client has the id), and [`bind_sessions`] answers
//! a request bearing a session id from any other key exactly as rmcp answers an unknown
//! session: 404, same body. Such attempts are audited in both organizations,
//! aggregated: one entry per key and session when it starts, then one a minute with the
//! count while it goes on ([`SessionOwners::flush`]).
//!
//! A binding lasts as long as its session: [`OwnedSessions`] wraps rmcp's session
//! manager, and every way a session ends (`DELETE`, idle expiry, shutdown) passes
//! through its `close_session`.
//!
//! Session ids are bearer secrets: they are never logged (rmcp's own logs that name
//! them are kept below the broker's info level, see [`crate::logging`]), and the audit
//! trail names a session by a fingerprint that cannot be turned back into its id.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use dashmap::DashMap;
use futures_util::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::common::http_header::HEADER_SESSION_ID;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{EventStore, RestoreOutcome, ServerSseMessage};
use rmcp::transport::streamable_http_server::{SessionId, SessionManager};
use sha2::Digest as _;
use tokio::time::Instant;

use crate::AppState;
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::Principal;
use crate::engine::Engine;

/// How long repeated attempts by one key on one session are summed into one entry.
const AUDIT_WINDOW: Duration = Duration::from_secs(60);
/// Key-and-session pairs whose attempts are being summed; beyond, new pairs are counted
/// in the log only.
const MAX_TRACKED_ATTEMPTS: usize = 10_000;

/// The key a session belongs to.
#[derive(Debug, Clone)]
struct Owner {
    /// What a request must present to use the session ([`Principal::session_owner`]).
    binding: String,
    key_id: String,
    key_name: String,
    org: String,
    /// The session's place in its key's and organization's `mcp_sessions` quotas, freed
    /// when the binding is forgotten (the session ended).
    _slot: Option<Arc<crate::quota::SessionSlot>>,
}

/// Attempts by one key on another's session, not yet in the audit trail.
#[derive(Debug)]
struct Attempts {
    attacker: Owner,
    owner: Owner,
    session: String,
    /// When the last entry was written.
    written: Instant,
    /// Attempts since that entry.
    pending: u64,
    /// Every attempt so far.
    total: u64,
    methods: BTreeSet<String>,
}

/// Sessions and their owners, and the attempts on them by other keys.
#[derive(Debug, Default)]
pub struct SessionOwners {
    owners: DashMap<SessionId, Owner>,
    attempts: Mutex<HashMap<(String, String), Attempts>>,
}

/// A session's name in the audit trail: the start of the SHA-256 of its id.
fn fingerprint(id: &str) -> String {
    let digest = sha2::Sha256::digest(id.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// What rmcp answers for a session it does not know, byte for byte (no content type).
fn unknown_session() -> Response {
    let mut response = Response::new(axum::body::Body::from("Not Found: Session not found"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

impl SessionOwners {
    fn bind(&self, id: SessionId, principal: &Principal, slot: crate::quota::SessionSlot) {
        let owner = Owner {
            binding: principal.session_owner(),
            key_id: principal.key_id.clone(),
            key_name: principal.name.clone(),
            org: principal.org().to_owned(),
            _slot: Some(Arc::new(slot)),
        };
        self.owners.insert(id, owner);
    }

    fn forget(&self, id: &str) {
        self.owners.remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Attempts>> {
        // Short sections that cannot panic; a poisoned map still holds usable counts.
        self.attempts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an attempt by `by` on `owner`'s session `id` at `now`; returns the entries
    /// to write: the first attempt of a run at once, the rest by [`Self::due`].
    fn attempted(&self, by: &Principal, id: &str, owner: Owner, method: &Method, now: Instant) -> Vec<AuditEntry> {
        let session = fingerprint(id);
        let key = (by.session_owner(), session.clone());
        let mut attempts = self.lock();
        if let Some(a) = attempts.get_mut(&key) {
            a.pending += 1;
            a.total += 1;
            if a.methods.len() < 8 {
                a.methods.insert(method.as_str().to_owned());
            }
            return Vec::new();
        }
        if attempts.len() >= MAX_TRACKED_ATTEMPTS {
            tracing::warn!(key = %by.key_id, "a key presented another key's MCP session id (too many to audit each pair)");
            return Vec::new();
        }
        let attacker = Owner {
            binding: by.session_owner(),
            key_id: by.key_id.clone(),
            key_name: by.name.clone(),
            org: by.org().to_owned(),
            _slot: None,
        };
        let mut a = Attempts {
            attacker,
            owner,
            session,
            written: now,
            pending: 1,
            total: 1,
            methods: BTreeSet::from([method.as_str().to_owned()]),
        };
        let entries = entries(&mut a, now);
        attempts.insert(key, a);
        entries
    }

    /// The entries for attempts summed over a window that has ended by `now`; runs that
    /// ended are forgotten.
    fn due(&self, now: Instant) -> Vec<AuditEntry> {
        let mut out = Vec::new();
        self.lock().retain(|_, a| {
            if now.saturating_duration_since(a.written) < AUDIT_WINDOW {
                return true;
            }
            if a.pending == 0 {
                return false;
            }
            out.extend(entries(a, now));
            true
        });
        out
    }

    /// Writes the attempts summed over the last window. Called by the broker's
    /// housekeeping.
    pub fn flush(&self, engine: &Engine) {
        for entry in self.due(Instant::now()) {
            engine.audit(entry);
        }
    }
}

/// The entries for the pending attempts of `a`, in both organizations (one entry when
/// they are the same), each naming only its own key; `a` then starts a new window.
fn entries(a: &mut Attempts, now: Instant) -> Vec<AuditEntry> {
    let methods: Vec<&str> = a.methods.iter().map(String::as_str).collect();
    let data = serde_json::json!({ "attempts": a.pending, "attempts_total": a.total, "methods": methods });
    let target = serde_json::json!({ "session": a.session, "owner_key_id": a.owner.key_id });
    let attacker = Actor::Key { id: a.attacker.key_id.clone(), name: a.attacker.key_name.clone() };
    let out = if a.attacker.org == a.owner.org {
        vec![
            AuditEntry::new(a.attacker.org.clone(), attacker, AuditKind::McpSessionRefused)
                .target(target)
                .detail(format!(
                    "key `{}` presented the id of an MCP session of key `{}` ({} time(s): {}); answered as unknown. \
                     The session id has leaked: end the session and find where it was exposed",
                    a.attacker.key_name,
                    a.owner.key_name,
                    a.pending,
                    methods.join(", ")
                ))
                .data(data),
        ]
    } else {
        vec![
            AuditEntry::new(a.attacker.org.clone(), attacker, AuditKind::McpSessionRefused)
                .target(serde_json::json!({ "session": a.session }))
                .detail(format!(
                    "key `{}` presented the id of an MCP session of another organization ({} time(s): {}); answered \
                     as unknown",
                    a.attacker.key_name,
                    a.pending,
                    methods.join(", ")
                ))
                .data(data.clone()),
            AuditEntry::new(a.owner.org.clone(), Actor::System, AuditKind::McpSessionRefused)
                .target(target)
                .detail(format!(
                    "a key of another organization presented the id of an MCP session of key `{}` ({} time(s): {}); \
                     answered as unknown. The session id has leaked: end the session and find where it was exposed",
                    a.owner.key_name,
                    a.pending,
                    methods.join(", ")
                ))
                .data(data),
        ]
    };
    a.pending = 0;
    a.written = now;
    out
}

/// Middleware on `/mcp`, inside the authentication: lets a request that names a session
/// through only when its key created that session, and binds new sessions to the key
/// whose `initialize` created them.
pub async fn bind_sessions(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return unknown_session();
    };
    let owners = &state.mcp_sessions;
    // rmcp reads the header the same way: one that is not text is no session id.
    let presented = req.headers().get(HEADER_SESSION_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let Some(id) = presented else {
        // A request without a session may open one: it takes a place in the key's and the
        // organization's session quotas first, kept by the binding if a session results.
        let slot = match state.callers.begin_session(&principal) {
            Ok(slot) => slot,
            Err(e) => return axum::response::IntoResponse::into_response(e),
        };
        let response = next.run(req).await;
        if let Some(id) = response.headers().get(HEADER_SESSION_ID).and_then(|v| v.to_str().ok()) {
            owners.bind(id.into(), &principal, slot);
        }
        return response;
    };
    let owner = owners.owners.get(id.as_str()).map(|o| o.clone());
    match owner {
        Some(owner) if owner.binding == principal.session_owner() => next.run(req).await,
        Some(owner) => {
            for entry in owners.attempted(&principal, &id, owner, req.method(), Instant::now()) {
                state.engine.audit(entry);
            }
            unknown_session()
        }
        None => unknown_session(),
    }
}

/// rmcp's in-memory session manager, telling [`SessionOwners`] when a session ends.
#[derive(Debug)]
pub struct OwnedSessions {
    inner: LocalSessionManager,
    owners: Arc<SessionOwners>,
}

impl OwnedSessions {
    /// Wraps `inner`; sessions it closes are forgotten by `owners`.
    pub fn new(inner: LocalSessionManager, owners: Arc<SessionOwners>) -> OwnedSessions {
        OwnedSessions { inner, owners }
    }
}

impl SessionManager for OwnedSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    fn create_session(&self) -> impl Future<Output = Result<(SessionId, Self::Transport), Self::Error>> + Send {
        self.inner.create_session()
    }

    fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<ServerJsonRpcMessage, Self::Error>> + Send {
        self.inner.initialize_session(id, message)
    }

    fn has_session(&self, id: &SessionId) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        self.inner.has_session(id)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.owners.forget(id);
        self.inner.close_session(id).await
    }

    fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>> + Send
    {
        self.inner.create_stream(id, message)
    }

    fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.accept_message(id, message)
    }

    fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>> + Send
    {
        self.inner.create_standalone_stream(id)
    }

    fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> impl Future<Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>> + Send
    {
        self.inner.resume(id, last_event_id)
    }

    fn restore_session(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<RestoreOutcome<Self::Transport>, Self::Error>> + Send {
        self.inner.restore_session(id)
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(key_id: &str, name: &str, org: &str) -> Principal {
        Principal {
            key_id: key_id.into(),
            name: name.into(),
            role: crate::auth::Role::Developer,
            scopes: crate::auth::Scope::DEFAULT.to_vec(),
            reach: crate::auth::Reach::org(org),
            quotas: crate::quota::CallerQuotas::default(),
            tenancy: Arc::default(),
            via: None,
        }
    }

    fn owner(p: &Principal) -> Owner {
        Owner {
            binding: p.session_owner(),
            key_id: p.key_id.clone(),
            key_name: p.name.clone(),
            org: p.org().to_owned(),
            _slot: None,
        }
    }

    #[test]
    fn repeated_attempts_are_one_entry_then_one_a_minute_with_their_count() {
        let sessions = SessionOwners::default();
        let alice = principal("key_alice", "alice", "default");
        let bob = principal("key_bob", "bob", "default");
        let id = "5b0e7c3a-8d2f-4c61-a9e4-0f3b2d1c7e68";
        let t0 = Instant::now();
        let first = sessions.attempted(&bob, id, owner(&alice), &Method::GET, t0);
        assert_eq!(first.len(), 1, "one organization: one entry");
        assert_eq!(first[0].data["attempts"], 1);
        assert!(first[0].detail.contains("bob") && first[0].detail.contains("alice"), "{}", first[0].detail);
        assert!(!serde_json::to_string(&first[0]).unwrap().contains(id), "never the session id");
        for method in [Method::POST, Method::DELETE] {
            assert!(sessions.attempted(&bob, id, owner(&alice), &method, t0 + Duration::from_secs(1)).is_empty());
        }
        assert!(sessions.due(t0 + Duration::from_secs(30)).is_empty(), "within the window");
        let later = sessions.due(t0 + AUDIT_WINDOW + Duration::from_secs(1));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].data["attempts"], 2);
        assert_eq!(later[0].data["attempts_total"], 3);
        assert_eq!(later[0].data["methods"], serde_json::json!(["DELETE", "GET", "POST"]));
        // A quiet window ends the run; the next attempt starts a new one, audited at once.
        assert!(sessions.due(t0 + 2 * AUDIT_WINDOW + Duration::from_secs(2)).is_empty());
        assert!(sessions.lock().is_empty());
        let again = sessions.attempted(&bob, id, owner(&alice), &Method::GET, t0 + 3 * AUDIT_WINDOW);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn each_organization_learns_of_an_attempt_without_the_other_ones_key_name() {
        let sessions = SessionOwners::default();
        let alice = principal("key_alice", "alice", "default");
        let mallory = principal("key_mallory", "mallory", "globex");
        let entries = sessions.attempted(&mallory, "0c5d-not-a-real-id", owner(&alice), &Method::GET, Instant::now());
        let (theirs, ours) = (&entries[0], &entries[1]);
        assert_eq!((theirs.org.as_str(), ours.org.as_str()), ("globex", "default"));
        assert_eq!(ours.actor, Actor::System);
        assert!(!serde_json::to_string(ours).unwrap().contains("mallory"));
        assert!(!serde_json::to_string(theirs).unwrap().contains("alice"));
        assert_eq!(ours.target["owner_key_id"], "key_alice");
    }

    #[test]
    fn a_fingerprint_names_a_session_without_revealing_its_id() {
        let id = "3f2b8c1e-0d7a-4a51-9b6e-2c4f1a7d9e03";
        let f = fingerprint(id);
        assert_eq!(f.len(), 12);
        assert_eq!(f, fingerprint(id));
        assert_ne!(f, fingerprint("3f2b8c1e-0d7a-4a51-9b6e-2c4f1a7d9e04"));
        assert!(!id.contains(&f));
    }
}
