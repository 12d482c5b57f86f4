//! Each tool's `outputSchema`: the shape of the `structuredContent` of its successful
//! results (the same JSON views the REST API returns). Error results carry the REST
//! error body instead (`{"error": {"code", "message", "details"}}`, see `reply.rs`) and
//! are marked `isError`, which clients do not validate against the output schema.
//!
//! The schemas require what a client can rely on and leave objects open: a view may
//! gain fields without breaking a client that validates. `tests/it/mcp_python_client.py`
//! validates every tool's results against them with the reference JSON Schema
//! implementation (`jsonschema`).

use std::sync::Arc;

use rmcp::model::JsonObject;
use serde_json::{Value, json};

fn object(v: Value) -> Arc<JsonObject> {
    Arc::new(v.as_object().cloned().unwrap_or_default())
}

/// An action as `get_action` and the REST API show it.
fn action() -> Value {
    json!({
        "type": "object",
        "description": "An action: what was placed, where, its state and counts.",
        "required": ["action_id", "kind", "status", "location", "target", "agents", "hits", "lines",
                     "created_by", "created_at_ms", "expires_at_ms"],
        "properties": {
            "action_id": { "type": "string", "pattern": "^act_" },
            "kind": { "type": "string", "enum": ["snapshot", "log", "metric", "capture_errors"] },
            "status": { "type": "string" },
            "location": { "type": "object", "required": ["file", "line"],
                          "properties": { "file": { "type": "string" }, "line": { "type": "integer" } } },
            "function": { "type": "object", "required": ["name"],
                          "description": "A function probe's target: the function or span, its module, min_duration_ms.",
                          "properties": { "name": { "type": "string" }, "module": { "type": "string" },
                                          "min_duration_ms": { "type": "integer", "minimum": 0 } } },
            "target": { "type": "object" },
            "agents": { "type": "array", "items": { "type": "object" } },
            "hits": { "type": "integer", "minimum": 0 },
            "lines": { "type": "integer", "minimum": 0 },
            "max_hits": { "type": "integer" },
            "created_by": { "type": "string" },
            "created_at_ms": { "type": "integer" },
            "expires_at_ms": { "type": "integer" },
            "ended_at_ms": { "type": "integer" },
            "end_reason": { "type": "string" },
            "figures": { "type": "object" }
        }
    })
}

fn hit() -> Value {
    json!({
        "type": "object",
        "description": "One hit: the captured fields, span stack and watches (truncated, redacted).",
        "required": ["index", "agent_id", "received_at_ms"],
        "properties": {
            "index": { "type": "integer" },
            "agent_id": { "type": "string", "pattern": "^agt_" },
            "agent_name": { "type": "string" },
            "received_at_ms": { "type": "integer" }
        }
    })
}

fn line() -> Value {
    json!({
        "type": "object",
        "description": "One dynamic log line.",
        "required": ["index", "agent_id", "received_at_ms"],
        "properties": {
            "index": { "type": "integer" },
            "agent_id": { "type": "string", "pattern": "^agt_" },
            "received_at_ms": { "type": "integer" }
        }
    })
}

/// A page of `items` with a string cursor.
fn page(items: Value, nullable_cursor: bool) -> Value {
    let cursor = if nullable_cursor { json!({ "type": ["string", "null"] }) } else { json!({ "type": "string" }) };
    json!({
        "type": "object",
        "required": ["items", "has_more"],
        "properties": {
            "items": { "type": "array", "items": items },
            "next_cursor": cursor,
            "has_more": { "type": "boolean" },
            "total": { "type": "integer", "minimum": 0 }
        }
    })
}

/// `system_health`.
pub fn system_health() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["status", "caller", "quotas", "agents_online", "actions_live"],
        "properties": {
            "status": { "type": "string" },
            "caller": { "type": "object", "required": ["name", "role", "scopes"],
                        "properties": { "name": { "type": "string" }, "role": { "type": "string" },
                                        "scopes": { "type": "array", "items": { "type": "string" } } } },
            "quotas": { "type": "object" },
            "agents_online": { "type": "integer", "minimum": 0 },
            "actions_live": { "type": "integer", "minimum": 0 },
            "paused_actions": { "type": "array" }
        }
    }))
}

/// `list_agents`.
pub fn list_agents() -> Arc<JsonObject> {
    object(page(
        json!({ "type": "object", "required": ["agent_id", "pool", "status"],
                "properties": { "agent_id": { "type": "string", "pattern": "^agt_" }, "pool": { "type": "string" },
                                "tags": { "type": "array", "items": { "type": "string" } },
                                "status": { "type": "string" } } }),
        false,
    ))
}

/// `list_sources`.
pub fn list_sources() -> Arc<JsonObject> {
    object(page(
        json!({ "type": "object", "required": ["file", "line", "name", "fields", "hits"],
                "properties": { "file": { "type": "string" }, "line": { "type": "integer" },
                                "name": { "type": "string" },
                                "function": { "type": "string",
                                              "description": "For a span or function: the `function` argument that probes it whole." },
                                "fields": { "type": "array", "items": { "type": "string" } },
                                "hits": { "type": "integer" } } }),
        false,
    ))
}

/// `place_snapshot` and `get_action` of a snapshot: the action with a page of hits.
pub fn action_with_hits() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["action", "hits", "next_cursor", "has_more"],
        "properties": {
            "action": action(),
            "hits": { "type": "array", "items": hit() },
            "next_cursor": { "type": "integer", "minimum": 0 },
            "has_more": { "type": "boolean" }
        }
    }))
}

/// `place_log`: the action, and its lines so far (none).
pub fn action_with_lines() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["action", "lines", "next_cursor", "has_more"],
        "properties": {
            "action": action(),
            "lines": { "type": "array", "items": line() },
            "next_cursor": { "type": "integer", "minimum": 0 },
            "has_more": { "type": "boolean" }
        }
    }))
}

/// `get_action`: the action, with its hits (snapshots), lines (logs) or figures
/// (metrics, in the action).
pub fn get_action() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["action"],
        "properties": {
            "action": action(),
            "hits": { "type": "array", "items": hit() },
            "lines": { "type": "array", "items": line() },
            "next_cursor": { "type": "integer", "minimum": 0 },
            "has_more": { "type": "boolean" },
            "dropped": { "type": "integer", "minimum": 0 }
        }
    }))
}

/// `place_metric` and `remove_action`: the action.
pub fn action_only() -> Arc<JsonObject> {
    object(json!({ "type": "object", "required": ["action"], "properties": { "action": action() } }))
}

/// `list_errors`: the distinct errors, newest first.
pub fn list_errors() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["errors", "count"],
        "properties": {
            "count": { "type": "integer", "minimum": 0 },
            "errors": { "type": "array", "items": {
                "type": "object",
                "description": "One distinct error (location, kind, type) across the agents it happened on.",
                "required": ["file", "line", "kind", "error_type", "message", "count", "captured", "uncaptured",
                             "first_seen_ms", "last_seen_ms", "agents", "agent_count", "pools"],
                "properties": {
                    "file": { "type": "string" },
                    "line": { "type": "integer", "minimum": 0 },
                    "kind": { "type": "string", "enum": ["panic", "event", "exception", "other"] },
                    "error_type": { "type": "string" },
                    "message": { "type": "string" },
                    "count": { "type": "integer", "minimum": 0 },
                    "captured": { "type": "integer", "minimum": 0 },
                    "uncaptured": { "type": "integer", "minimum": 0 },
                    "first_seen_ms": { "type": "integer" },
                    "last_seen_ms": { "type": "integer" },
                    "agents": { "type": "array", "items": { "type": "string" } },
                    "agent_count": { "type": "integer", "minimum": 0 },
                    "pools": { "type": "array", "items": { "type": "string" } },
                    "services": { "type": "array", "items": { "type": "string" } },
                    "hit": { "type": "object", "required": ["action_id", "index"] },
                    "snapshot": hit()
                }
            } }
        }
    }))
}

/// `list_actions`.
pub fn list_actions() -> Arc<JsonObject> {
    object(page(action(), true))
}

/// `remove_all_actions`.
pub fn remove_all_actions() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["removed", "count", "scope"],
        "properties": {
            "removed": { "type": "array", "items": action() },
            "count": { "type": "integer", "minimum": 0 },
            "scope": { "type": "string", "enum": ["mine", "pool"] },
            "pool": { "type": "string" }
        }
    }))
}

/// `pause_actions` and `resume_actions`.
pub fn pause_outcome() -> Arc<JsonObject> {
    object(json!({
        "type": "object",
        "required": ["pauses", "actions", "agents", "changed"],
        "properties": {
            "pauses": { "type": "array", "items": { "type": "object", "required": ["by", "at_ms"],
                        "properties": { "pool": { "type": "string" }, "by": { "type": "string" },
                                        "at_ms": { "type": "integer" }, "reason": { "type": "string" } } } },
            "actions": { "type": "integer", "minimum": 0 },
            "agents": { "type": "integer", "minimum": 0 },
            "changed": { "type": "boolean" }
        }
    }))
}

/// `get_blocklist` and `set_blocklist`.
pub fn blocklist() -> Arc<JsonObject> {
    let rule = json!({ "type": "object", "required": ["name", "effect"],
                       "properties": { "name": { "type": "string" },
                                       "effect": { "type": "string", "enum": ["no_actions", "no_capture"] } } });
    object(json!({
        "type": "object",
        "required": ["version", "rules", "config_rules"],
        "properties": {
            "version": { "type": "integer", "minimum": 0 },
            "rules": { "type": "array", "items": rule.clone() },
            "config_rules": { "type": "array", "items": rule }
        }
    }))
}

/// `query_audit`.
pub fn query_audit() -> Arc<JsonObject> {
    object(page(
        json!({ "type": "object", "required": ["id", "at_ms", "org", "actor", "kind"],
                "properties": { "id": { "type": "string", "pattern": "^aud_" }, "at_ms": { "type": "integer" },
                                "org": { "type": "string" }, "actor": { "type": "object" },
                                "kind": { "type": "string" } } }),
        false,
    ))
}
