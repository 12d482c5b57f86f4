//! The audit trail: who did what, when, to which target, with what result.
//!
//! Every placement, removal, completion and expiry of an action, every quota pause
//! (one entry per action, reason and episode), every key change, redaction-rules
//! change, group or pool change, and every agent-key misuse becomes an [`AuditEntry`]
//! in the `audit` table of the store. Entries name locations, expressions, hit counts
//! and which redaction rules fired (rule ids and counts), never a captured value.
//!
//! Entries are written in the same transaction as the change they record when the
//! change itself is synchronous (keys, groups, pools: [`insert`]), and through the
//! store's writer thread otherwise (action events: [`AuditEntry::row`]). Reading is
//! [`query`] (a page after a cursor, for the REST endpoint and the `query_audit` tool)
//! and [`export`] (every matching entry as JSON lines, for `GET /api/v1/audit/export`
//! and `periscope audit export`). Each entry belongs to one organization and queries
//! are always filtered by it.

use std::collections::BTreeMap;

use periscope_protocol::Location;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::store::{AuditRow, to_i64, to_u64};

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Actor {
    /// A caller with an API key.
    Key {
        /// The key's id (`key_…`), its public half.
        id: String,
        /// The key's name.
        name: String,
    },
    /// An agent (misuse of an agent key, flooding).
    Agent {
        /// The agent id it claimed.
        id: String,
        /// The agent key it used.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
    /// A person signed in through an OAuth client.
    User {
        /// The user's id (`usr_…`).
        id: String,
        /// The user's sign-in name.
        name: String,
        /// The client they signed in through (absent for the sign-in itself).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// The client's name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_name: Option<String>,
    },
    /// The broker itself (expiry, completion, quota pauses).
    System,
    /// An operator running `periscope` on the data directory.
    Cli {
        /// The operating-system user, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
}

impl Actor {
    /// The value of the indexed `actor` column: a key id, `agent:<id>`, `system` or
    /// `cli`.
    pub fn column(&self) -> String {
        match self {
            Actor::Key { id, .. } | Actor::User { id, .. } => id.clone(),
            Actor::Agent { id, .. } => format!("agent:{id}"),
            Actor::System => "system".into(),
            Actor::Cli { .. } => "cli".into(),
        }
    }

    /// A name for people: the key's name, `agent:<id>`, `system`, `cli (user)`.
    pub fn name(&self) -> String {
        match self {
            Actor::Key { name, .. } => name.clone(),
            Actor::User { name, client_name: Some(c), .. } => format!("{name} (via {c})"),
            Actor::User { name, .. } => name.clone(),
            Actor::Agent { id, .. } => format!("agent:{id}"),
            Actor::System => "system".into(),
            Actor::Cli { user: Some(u) } => format!("cli ({u})"),
            Actor::Cli { user: None } => "cli".into(),
        }
    }

    /// The operator running this process, for CLI changes.
    pub fn cli() -> Actor {
        Actor::Cli { user: std::env::var("USER").ok().filter(|u| !u.is_empty() && u.len() <= 64) }
    }
}

/// What happened. The names are a stable contract (filters, exports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditKind {
    /// An action was placed.
    ActionPlaced,
    /// A caller removed an action.
    ActionRemoved,
    /// An action collected all its hits (or lines).
    ActionCompleted,
    /// An action reached its expiry.
    ActionExpired,
    /// An action was paused by a quota (first pause of an episode).
    ActionPaused,
    /// An API or agent key was created.
    KeyCreated,
    /// An API or agent key was revoked.
    KeyRevoked,
    /// The redaction rules were replaced.
    RedactionRulesChanged,
    /// A group was created.
    GroupCreated,
    /// A pool was assigned to a group.
    PoolAssigned,
    /// An agent tried to register into a pool its key does not allow.
    AgentRefused,
    /// An agent tried to take an agent id held by another process or organization.
    AgentImpersonation,
    /// An agent was disconnected for sending more than its budget.
    AgentFlooding,
    /// A key presented the id of an MCP session another key created, and was answered
    /// as if the session did not exist (repeats aggregated).
    McpSessionRefused,
    /// An expression of an action (condition, metric value, watch, template) tried to
    /// read a value that redaction hides, and the agent refused it; once per action,
    /// attributed to the key that placed it.
    RedactedReadRefused,
    /// A user was created.
    UserCreated,
    /// A user was changed (role, reach, password) or disabled or enabled.
    UserChanged,
    /// A person signed in to the broker's pages (password or OpenID provider).
    UserSignedIn,
    /// A sign-in failed (wrong password, disabled user, refused by the provider);
    /// repeats aggregated.
    UserSignInFailed,
    /// A client registered itself (RFC 7591).
    OauthClientRegistered,
    /// A person authorized a client: a grant with its tokens was issued.
    OauthClientAuthorized,
    /// A grant was revoked (by its client, by an administrator, or by replay of a rotated
    /// refresh token or of a used code).
    OauthGrantRevoked,
    /// An organization's blocklist (where no action may run or no value be captured)
    /// was replaced.
    BlocklistChanged,
    /// A company administrator paused every action of a pool or of the organization.
    ActionsPausedByOperator,
    /// A company administrator resumed them.
    ActionsResumedByOperator,
    /// A placement was refused by a blocklist rule.
    PlacementBlocked,
}

impl AuditKind {
    /// Every kind, for error messages.
    pub const ALL: [AuditKind; 26] = [
        AuditKind::ActionPlaced,
        AuditKind::ActionRemoved,
        AuditKind::ActionCompleted,
        AuditKind::ActionExpired,
        AuditKind::ActionPaused,
        AuditKind::KeyCreated,
        AuditKind::KeyRevoked,
        AuditKind::RedactionRulesChanged,
        AuditKind::GroupCreated,
        AuditKind::PoolAssigned,
        AuditKind::AgentRefused,
        AuditKind::AgentImpersonation,
        AuditKind::AgentFlooding,
        AuditKind::McpSessionRefused,
        AuditKind::RedactedReadRefused,
        AuditKind::UserCreated,
        AuditKind::UserChanged,
        AuditKind::UserSignedIn,
        AuditKind::UserSignInFailed,
        AuditKind::OauthClientRegistered,
        AuditKind::OauthClientAuthorized,
        AuditKind::OauthGrantRevoked,
        AuditKind::BlocklistChanged,
        AuditKind::ActionsPausedByOperator,
        AuditKind::ActionsResumedByOperator,
        AuditKind::PlacementBlocked,
    ];

    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuditKind::ActionPlaced => "action_placed",
            AuditKind::ActionRemoved => "action_removed",
            AuditKind::ActionCompleted => "action_completed",
            AuditKind::ActionExpired => "action_expired",
            AuditKind::ActionPaused => "action_paused",
            AuditKind::KeyCreated => "key_created",
            AuditKind::KeyRevoked => "key_revoked",
            AuditKind::RedactionRulesChanged => "redaction_rules_changed",
            AuditKind::GroupCreated => "group_created",
            AuditKind::PoolAssigned => "pool_assigned",
            AuditKind::AgentRefused => "agent_refused",
            AuditKind::AgentImpersonation => "agent_impersonation",
            AuditKind::AgentFlooding => "agent_flooding",
            AuditKind::McpSessionRefused => "mcp_session_refused",
            AuditKind::RedactedReadRefused => "redacted_read_refused",
            AuditKind::UserCreated => "user_created",
            AuditKind::UserChanged => "user_changed",
            AuditKind::UserSignedIn => "user_signed_in",
            AuditKind::UserSignInFailed => "user_sign_in_failed",
            AuditKind::OauthClientRegistered => "oauth_client_registered",
            AuditKind::OauthClientAuthorized => "oauth_client_authorized",
            AuditKind::OauthGrantRevoked => "oauth_grant_revoked",
            AuditKind::BlocklistChanged => "blocklist_changed",
            AuditKind::ActionsPausedByOperator => "actions_paused_by_operator",
            AuditKind::ActionsResumedByOperator => "actions_resumed_by_operator",
            AuditKind::PlacementBlocked => "placement_blocked",
        }
    }

    /// Parses a kind filter.
    pub fn parse(s: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == s.trim())
    }
}

/// The expressions of an action, as placed (sources, never values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expressions {
    /// The condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Watch expressions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// A log's template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A value metric's expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

impl Expressions {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Expressions::default()
    }
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `aud_…`.
    pub id: String,
    /// Position in the trail; pass as `cursor` to read what follows. Assigned by the
    /// store (0 before it is written).
    #[serde(default)]
    pub seq: u64,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The organization it belongs to.
    pub org: String,
    /// Who did it.
    pub actor: Actor,
    /// What happened.
    pub kind: AuditKind,
    /// What it was done to: an action's target, a key id, a pool, a group.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub target: serde_json::Value,
    /// The action concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    /// The action's kind (`snapshot`, `log`, `metric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_kind: Option<String>,
    /// The action's location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// The action's expressions.
    #[serde(default, skip_serializing_if = "Expressions::is_empty")]
    pub expressions: Expressions,
    /// Hits collected (snapshots) when the action ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<u64>,
    /// Lines collected (logs) when the action ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
    /// Redaction rules that fired in what the action collected, with how many times
    /// (rule ids only, never values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redaction_rules: BTreeMap<String, u64>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Anything else worth keeping (a key's role and scopes, a pause reason, quota
    /// pauses per reason).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl AuditEntry {
    /// A new entry stamped now, with a fresh id.
    pub fn new(org: impl Into<String>, actor: Actor, kind: AuditKind) -> AuditEntry {
        AuditEntry {
            id: new_id(),
            seq: 0,
            at_ms: crate::time::now_ms(),
            org: org.into(),
            actor,
            kind,
            target: serde_json::Value::Null,
            action_id: None,
            action_kind: None,
            location: None,
            expressions: Expressions::default(),
            hits: None,
            lines: None,
            redaction_rules: BTreeMap::new(),
            detail: String::new(),
            data: serde_json::Value::Null,
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: serde_json::Value) -> Self {
        self.target = target;
        self
    }

    /// Sets the sentence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Sets extra data.
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }

    /// The row the store writes.
    pub fn row(&self) -> AuditRow {
        AuditRow {
            id: self.id.clone(),
            at_ms: self.at_ms,
            org: self.org.clone(),
            actor: self.actor.column(),
            actor_name: self.actor.name(),
            kind: self.kind.as_str().to_owned(),
            action_id: self.action_id.clone(),
            body: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}

/// A fresh `aud_…` id (100 random bits, like every other id).
fn new_id() -> String {
    let key = periscope_protocol::KeyId::generate();
    format!("aud_{}", key.as_str().trim_start_matches(periscope_protocol::KeyId::PREFIX))
}

/// Writes an entry inside the caller's transaction (changes recorded atomically with
/// the entry that describes them).
pub fn insert(tx: &rusqlite::Transaction<'_>, entry: &AuditEntry) -> rusqlite::Result<()> {
    let r = entry.row();
    tx.execute(
        "INSERT INTO audit (id, at_ms, org, actor, actor_name, kind, action_id, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![r.id, to_i64(r.at_ms), r.org, r.actor, r.actor_name, r.kind, r.action_id, r.body],
    )?;
    Ok(())
}

/// Filters of an audit query. `org` is not a caller's choice: it is the caller's own
/// organization.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// The organization (always set by the broker from the caller's key).
    pub org: Option<String>,
    /// Entries at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Entries before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// Only this actor: a key id, a key name, `agent:<id>`, `system` or `cli`.
    pub actor: Option<String>,
    /// Only this kind.
    pub kind: Option<AuditKind>,
    /// Only entries about this action.
    pub action_id: Option<String>,
    /// Only entries after this position (`next_cursor` of the previous page).
    pub after_seq: u64,
    /// Most entries per page.
    pub limit: usize,
}

/// A page of audit entries, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    /// The entries.
    pub items: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Whether more entries match after this page.
    pub has_more: bool,
}

/// Most entries per page.
pub const MAX_PAGE: usize = 500;
/// Entries per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;

fn select(conn: &Connection, q: &AuditQuery, after: u64, limit: usize) -> rusqlite::Result<Vec<(u64, String)>> {
    let mut stmt = conn.prepare(
        "SELECT seq, body FROM audit WHERE seq > ?1 \
         AND (?2 IS NULL OR org = ?2) \
         AND (?3 IS NULL OR at_ms >= ?3) \
         AND (?4 IS NULL OR at_ms < ?4) \
         AND (?5 IS NULL OR actor = ?5 OR actor_name = ?5) \
         AND (?6 IS NULL OR kind = ?6) \
         AND (?7 IS NULL OR action_id = ?7) \
         ORDER BY seq LIMIT ?8",
    )?;
    let rows = stmt.query_map(
        params![
            to_i64(after),
            q.org,
            q.since_ms.map(to_i64),
            q.until_ms.map(to_i64),
            q.actor,
            q.kind.map(|k| k.as_str()),
            q.action_id,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| Ok((to_u64(r.get(0)?), r.get::<_, String>(1)?)),
    )?;
    rows.collect()
}

fn decode(seq: u64, body: &str) -> Option<AuditEntry> {
    match serde_json::from_str::<AuditEntry>(body) {
        Ok(mut e) => {
            e.seq = seq;
            Some(e)
        }
        Err(e) => {
            tracing::warn!(seq, error = %e, "skipping an audit entry that does not decode");
            None
        }
    }
}

/// One page of matching entries after `q.after_seq`.
pub fn query(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<AuditPage> {
    let limit = q.limit.clamp(1, MAX_PAGE);
    let mut rows = select(conn, q, q.after_seq, limit + 1)?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let last = rows.last().map(|(seq, _)| *seq);
    let items = rows.iter().filter_map(|(seq, body)| decode(*seq, body)).collect();
    Ok(AuditPage { items, next_cursor: if has_more { last.map(|s| s.to_string()) } else { None }, has_more })
}

/// Every matching entry, oldest first, as one JSON object per line, handed to `line`
/// in chunks (so an export of millions of entries never sits in memory). Stops at the
/// first error `line` returns.
pub fn export<E>(
    conn: &Connection,
    q: &AuditQuery,
    mut line: impl FnMut(String) -> Result<(), E>,
) -> Result<u64, ExportError<E>> {
    let mut after = q.after_seq;
    let mut n = 0u64;
    loop {
        let rows = select(conn, q, after, 1_000).map_err(ExportError::Sqlite)?;
        let Some((last, _)) = rows.last() else { return Ok(n) };
        after = *last;
        for (seq, body) in rows {
            if let Some(e) = decode(seq, &body) {
                let mut text = serde_json::to_string(&e).unwrap_or_default();
                text.push('\n');
                line(text).map_err(ExportError::Sink)?;
                n += 1;
            }
        }
    }
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError<E> {
    /// Reading the store failed.
    #[error("reading the audit trail: {0}")]
    Sqlite(rusqlite::Error),
    /// The destination refused a line.
    #[error("writing the export")]
    Sink(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_pages_follow_their_cursor() {
        let dir = crate::store::ScratchDir::new().unwrap();
        let mut conn = crate::store::open_connection(dir.path()).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..5u64 {
            let mut e = AuditEntry::new(
                if i == 2 { "other" } else { "default" },
                Actor::Key { id: "key_a".into(), name: "alice".into() },
                AuditKind::ActionPlaced,
            )
            .detail(format!("n{i}"));
            e.redaction_rules.insert("email".into(), i);
            insert(&tx, &e).unwrap();
        }
        tx.commit().unwrap();
        let q = AuditQuery { org: Some("default".into()), limit: 2, ..Default::default() };
        let page = query(&conn, &q).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(page.has_more);
        assert_eq!(page.items[0].detail, "n0");
        let after = page.next_cursor.unwrap().parse().unwrap();
        let page = query(&conn, &AuditQuery { after_seq: after, ..q.clone() }).unwrap();
        assert_eq!(page.items.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(), ["n3", "n4"]);
        assert!(!page.has_more);
        let by_name = AuditQuery { actor: Some("alice".into()), limit: 10, ..q.clone() };
        assert_eq!(query(&conn, &by_name).unwrap().items.len(), 4, "the other org's entry is not listed");
        let mut lines = Vec::new();
        let n = export(&conn, &AuditQuery { limit: 10, ..q }, |l| {
            lines.push(l);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(n, 4);
        assert!(lines.iter().all(|l| l.ends_with('\n') && l.contains("\"kind\":\"action_placed\"")));
    }
}
