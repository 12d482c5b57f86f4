//! The agent gateway: `GET /agents`, upgraded to a WebSocket.
//!
//! The agent key is checked on the HTTP request, before the upgrade (401 with a JSON
//! body when missing, wrong, revoked or expired). After the upgrade the session holds
//! one of its key's session slots ([`crate::agent_limits`]); the first frame must be a
//! registration, within `registration_timeout_secs`, into a pool the key allows, from
//! a key (and organization) not cooling down after a flood, under an agent id bound to
//! this key and pool or to nobody yet ([`crate::identity`]) and held by no other live
//! process. Each refusal says why and is audited (repeats aggregated per key and
//! reason). Then one task per agent owns the socket and `select!`s over frames from the
//! agent, messages queued for it, pings, key changes and shutdown. A bad frame gets an
//! error frame naming what was wrong; only protocol violations that leave the session
//! meaningless close it.
//!
//! Every frame is charged, before it is decoded, to the session's, its key's and its
//! organization's byte budgets (and, once decoded as a hit, their hit budgets). What
//! exceeds one is dropped and counted; the agent gets a `rate_limited` warning (at
//! most one a second); an agent still flooding after `ingest.flood_warnings` warnings
//! is disconnected, audited, and its id and key refused for
//! `ingest.flood_cooldown_secs`. Other keys never notice. When the agent's key is
//! revoked or expires, its session ends.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use periscope_protocol::messages::{decode_agent_message, encode};
use periscope_protocol::{
    AgentId, AgentMessage, BrokerMessage, MAX_FRAME_BYTES, PROTOCOL_VERSION, ProtocolError, ProtocolErrorBody,
    ProtocolErrorCode, Registered, Registration,
};
use tokio::sync::mpsc;

use crate::AppState;
use crate::agent_limits::{Cooling, Over, SessionBudget, Verdict};
use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::AuthFailure;
use crate::engine::{Ingested, Sender};
use crate::identity::Mismatch;
use crate::keys::AgentCredentials;
use crate::registry::{AGENT_QUEUE, DropReason, RegisterRefusal};

/// Malformed frames tolerated per session before the broker gives up on an agent.
const MAX_BAD_FRAMES: u32 = 20;

/// Most hits read from a session's waiting frames and stored together.
const MAX_HIT_BATCH: usize = 64;

/// Most bytes of hit frames stored together (a bound on one call to the store).
const MAX_HIT_BATCH_BYTES: usize = 1 << 20;

/// What a session's WebSocket reads at a time and its read buffer starts at.
const READ_BUFFER: usize = 2 * 1024;

/// `GET /agents`: authenticates the agent key and upgrades.
pub async fn agents_ws(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let Some(key) = crate::auth::bearer(&headers) else {
        return unauthorized("agents must send their agent key as `Authorization: Bearer <agent key>`");
    };
    let credentials = match state.keys.authenticate_agent(key).await {
        Ok(c) => c,
        Err(AuthFailure::Revoked) => return unauthorized("the agent key has been revoked"),
        Err(AuthFailure::Expired) => return unauthorized("the agent key has expired"),
        Err(AuthFailure::Unavailable) => {
            let body = serde_json::json!({ "error": { "code": "internal", "message": "the key store cannot be read right now" } });
            return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "5")], axum::Json(body)).into_response();
        }
        Err(_) => return unauthorized("the agent key is not recognized"),
    };
    // The read buffer grows to hold the largest frame read and keeps that size; it
    // starts (and reads) at 2 KiB, so a session that takes in hits of about 2 KB and
    // catalogs in frames of `CATALOG_FRAME_BYTES` holds about 5 KiB (8 KiB reads, as
    // before, left 32 KiB per session after such frames).
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move { session(state, socket, credentials).await })
}

fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": "unauthorized", "message": message } });
    (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], axum::Json(body)).into_response()
}

/// Longest a write to an agent may wait. An agent that stops reading (a stalled
/// process, a dead network path the kernel has not noticed) otherwise holds its session's
/// task in a write for as long as TCP keeps trying, and with it the ping check that would
/// have closed the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session ended when a write did not go through.
const WRITE_FAILED: &str = "a write to the agent failed or waited 30 s (the agent reads nothing)";

/// Writes one frame; false when the socket failed or the write waited [`WRITE_TIMEOUT`].
async fn write(socket: &mut WebSocket, frame: Message) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, socket.send(frame)).await, Ok(Ok(())))
}

async fn send(socket: &mut WebSocket, msg: &BrokerMessage) -> bool {
    write(socket, Message::text(encode(msg))).await
}

async fn refuse(socket: &mut WebSocket, body: ProtocolErrorBody) {
    // Debug only: refusals are audited (aggregated), and a log line each would let a
    // misbehaving agent fill the log.
    tracing::debug!(code = ?body.code, message = %body.message, "agent refused");
    let _ = send(socket, &BrokerMessage::Error(body.clone())).await;
    let reason = periscope_protocol::value::truncate_chars(&body.message, 120).to_owned();
    let _ = write(socket, Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }))).await;
}

fn error_body(code: ProtocolErrorCode, message: impl Into<String>, fatal: bool) -> ProtocolErrorBody {
    ProtocolErrorBody { code, message: message.into(), fatal, supported_versions: Vec::new() }
}

/// Reads frames until the registration (or a reason to refuse).
async fn read_registration(socket: &mut WebSocket) -> Result<Registration, Option<ProtocolErrorBody>> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Text(text))) => {
                return match decode_agent_message(text.as_str()) {
                    Ok(AgentMessage::Register(reg)) => Ok(*reg),
                    Ok(other) => Err(Some(error_body(
                        ProtocolErrorCode::UnexpectedMessage,
                        format!("the first frame must be `register`, got `{}`", other.type_name()),
                        true,
                    ))),
                    Err(e) => {
                        // A registration from a newer agent may fail to decode; look for its
                        // version so the refusal can say which versions we speak.
                        let version = serde_json::from_str::<serde_json::Value>(text.as_str())
                            .ok()
                            .and_then(|v| v.get("protocol_version").and_then(|p| p.as_u64()));
                        match version {
                            Some(v) if v != u64::from(PROTOCOL_VERSION) => Err(Some(
                                ProtocolError::UnsupportedVersion { got: u32::try_from(v).unwrap_or(u32::MAX) }
                                    .to_body(true),
                            )),
                            _ => Err(Some(e.to_body(true))),
                        }
                    }
                };
            }
            Some(Ok(Message::Binary(_))) => return Err(Some(ProtocolError::BinaryFrame.to_body(true))),
            Some(Ok(Message::Close(_))) | None => return Err(None),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Some(frame_error(&e))),
        }
    }
}

/// Turns a socket read error into the error frame that explains it.
fn frame_error(e: &axum::Error) -> ProtocolErrorBody {
    let text = e.to_string();
    if text.contains("Message too long") || text.contains("message too long") || text.contains("Space limit exceeded") {
        error_body(
            ProtocolErrorCode::FrameTooLarge,
            format!("a frame exceeded the {MAX_FRAME_BYTES}-byte limit ({text}); the session is closed"),
            true,
        )
    } else {
        error_body(ProtocolErrorCode::MalformedFrame, format!("unreadable WebSocket frame: {text}"), true)
    }
}

fn agent_actor(agent_id: &AgentId, credentials: &AgentCredentials) -> Actor {
    Actor::Agent { id: agent_id.to_string(), key_id: Some(credentials.key_id.clone()) }
}

/// Audits a refused registration (aggregated per key and reason: an agent key retrying
/// in a loop writes one entry and, a minute later, a count).
fn audit_refusal(
    state: &AppState,
    credentials: &AgentCredentials,
    actor: Actor,
    kind: AuditKind,
    reason: &'static str,
    target: serde_json::Value,
    detail: String,
) {
    let entry = AuditEntry::new(credentials.org.clone(), actor, kind).target(target).detail(detail);
    state.engine.audit_repeated(entry, &credentials.key_id, reason);
}

/// Refuses a registration for an identity conflict: audited (in both organizations when
/// another one holds the id; neither learns the other's name) and answered
/// `identity_bound`.
async fn refuse_bound(
    state: &AppState,
    socket: &mut WebSocket,
    credentials: &AgentCredentials,
    registration: &Registration,
    mismatch: Mismatch,
) {
    let agent_id = &registration.agent_id;
    let target = serde_json::json!({ "agent_id": agent_id, "pool": registration.pool });
    let (detail, msg) = match &mismatch {
        Mismatch::OtherOrg(_) => (
            format!(
                "an agent of this organization tried to register as `{agent_id}`, an id another organization holds"
            ),
            format!("agent id `{agent_id}` belongs to another agent; each agent generates its own id"),
        ),
        Mismatch::OtherKey => (
            format!(
                "an agent tried to register as `{agent_id}`, an id bound to another agent key of this organization"
            ),
            format!(
                "agent id `{agent_id}` is bound to the agent key that registered it first; each agent generates its \
                 own id"
            ),
        ),
        Mismatch::OtherPool(bound) => (
            format!(
                "an agent tried to register `{agent_id}` into pool `{}`; the id is bound to pool `{bound}`",
                registration.pool
            ),
            format!("agent id `{agent_id}` is bound to pool `{bound}`, where it registered first"),
        ),
    };
    audit_refusal(
        state,
        credentials,
        agent_actor(agent_id, credentials),
        AuditKind::AgentImpersonation,
        mismatch.reason(),
        target,
        detail,
    );
    if let Mismatch::OtherOrg(owner) = mismatch {
        let entry = AuditEntry::new(
            owner,
            Actor::Agent { id: agent_id.to_string(), key_id: None },
            AuditKind::AgentImpersonation,
        )
        .target(serde_json::json!({ "agent_id": agent_id }))
        .detail(format!("a process with another organization's agent key tried to register as `{agent_id}`"));
        // Aggregated under the intruding key, in the owner's trail.
        state.engine.audit_repeated(entry, &credentials.key_id, "claimed_by_other_organization");
    }
    refuse(socket, error_body(ProtocolErrorCode::IdentityBound, msg, true)).await;
}

async fn session(state: AppState, mut socket: WebSocket, credentials: AgentCredentials) {
    // One of the key's session slots, from the upgrade on: a key cannot hold more
    // sockets than `agents.max_sessions_per_key`, registered or not.
    let mut budget = match state.agent_limits.open_session(&credentials.key_id, &credentials.org) {
        Ok(b) => b,
        Err(body) => {
            let actor = Actor::Agent { id: "unregistered".into(), key_id: Some(credentials.key_id.clone()) };
            let detail = format!("an agent key over its session limit: {}", body.message);
            audit_refusal(
                &state,
                &credentials,
                actor,
                AuditKind::AgentRefused,
                "sessions_per_key",
                serde_json::Value::Null,
                detail,
            );
            return refuse(&mut socket, body).await;
        }
    };
    let settings = state.config.agents.clone();
    let timeout = Duration::from_secs(settings.registration_timeout_secs);
    let registration = match tokio::time::timeout(timeout, read_registration(&mut socket)).await {
        Err(_) => {
            let msg = format!("no registration within {} s; closing", settings.registration_timeout_secs);
            refuse(&mut socket, error_body(ProtocolErrorCode::RegistrationTimeout, msg, true)).await;
            return;
        }
        Ok(Err(Some(body))) => return refuse(&mut socket, body).await,
        Ok(Err(None)) => return,
        Ok(Ok(r)) => r,
    };
    if let Err(e) = registration.validate() {
        return refuse(&mut socket, e.to_body(true)).await;
    }
    let agent_id = registration.agent_id.clone();
    let target = serde_json::json!({ "pool": registration.pool, "agent_id": agent_id });
    if !credentials.allows_pool(&registration.pool) {
        let msg = format!("this agent key may not register into pool `{}`", registration.pool);
        let detail = format!(
            "an agent key for pools {:?} was used to register into pool `{}`",
            credentials.pools.clone().unwrap_or_default(),
            registration.pool
        );
        let actor = agent_actor(&agent_id, &credentials);
        audit_refusal(&state, &credentials, actor, AuditKind::AgentRefused, "pool_not_allowed", target, detail);
        return refuse(&mut socket, error_body(ProtocolErrorCode::Unauthorized, msg, true)).await;
    }
    // A flood cools down the key (and with enough flooding keys, the organization), not
    // only the id the flooding agent chose.
    if let Some(cooling) = state.agent_limits.cooling_down(&credentials.key_id, &credentials.org) {
        let (whose, until, reason) = match cooling {
            Cooling::Key(t) => ("this agent key", t, "key_cooling_down"),
            Cooling::Org(t) => ("this organization's agents", t, "org_cooling_down"),
        };
        let secs = until.saturating_sub(crate::time::now_ms()).div_ceil(1_000).max(1);
        let msg = format!("{whose} flooded the broker and may not register for {secs} s more; retry then");
        let actor = agent_actor(&agent_id, &credentials);
        audit_refusal(&state, &credentials, actor, AuditKind::AgentRefused, reason, target, msg.clone());
        return refuse(&mut socket, error_body(ProtocolErrorCode::RateLimited, msg, true)).await;
    }
    let identities = Arc::clone(state.registry.identities());
    let mut claim = match identities.claim(&agent_id, &credentials.org, &credentials.key_id, &registration.pool) {
        Ok(c) => c,
        Err(mismatch) => return refuse_bound(&state, &mut socket, &credentials, &registration, mismatch).await,
    };
    let name = registration.display_name.clone();
    let (pool, host, pid) = (registration.pool.clone(), registration.host.clone(), registration.pid);
    let (tx, rx) = mpsc::channel(AGENT_QUEUE);
    let session_no = match state.registry.register(registration.clone(), &credentials.org, &credentials.key_id, tx) {
        Ok(s) => s,
        Err(RegisterRefusal::Duplicate) => {
            let msg = format!("agent id `{agent_id}` is already online from another process");
            let detail = format!("a second process tried to register as the online agent `{agent_id}`");
            let target = serde_json::json!({ "agent_id": agent_id, "pool": pool, "host": host, "pid": pid });
            let actor = agent_actor(&agent_id, &credentials);
            audit_refusal(&state, &credentials, actor, AuditKind::AgentImpersonation, "duplicate", target, detail);
            return refuse(&mut socket, error_body(ProtocolErrorCode::DuplicateAgent, msg, true)).await;
        }
        Err(RegisterRefusal::Bound(mismatch)) => {
            return refuse_bound(&state, &mut socket, &credentials, &registration, mismatch).await;
        }
        Err(RegisterRefusal::Full(max)) => {
            let msg = format!(
                "this organization already has {max} agents listed, all online (agents.max_agents_per_org); \
                 retry when one goes away"
            );
            let actor = agent_actor(&agent_id, &credentials);
            audit_refusal(&state, &credentials, actor, AuditKind::AgentRefused, "org_full", target, msg.clone());
            return refuse(&mut socket, error_body(ProtocolErrorCode::RateLimited, msg, true)).await;
        }
        Err(RegisterRefusal::CoolingDown(until)) => {
            let secs = until.saturating_sub(crate::time::now_ms()).div_ceil(1_000).max(1);
            let msg =
                format!("agent `{agent_id}` was disconnected for sending more than its budget; retry in {secs} s");
            let actor = agent_actor(&agent_id, &credentials);
            audit_refusal(
                &state,
                &credentials,
                actor,
                AuditKind::AgentRefused,
                "agent_cooling_down",
                target,
                msg.clone(),
            );
            return refuse(&mut socket, error_body(ProtocolErrorCode::RateLimited, msg, true)).await;
        }
    };
    // The id's lease: one node holds an agent at a time, and what it writes for the
    // agent carries the lease's epoch (a node the agent left can write no more).
    let epoch = match state.directory.acquire(&agent_id, &host, pid).await {
        Ok(Ok(epoch)) => epoch,
        Ok(Err(held)) => {
            state.registry.lease_lost(&agent_id);
            let msg = format!("agent id `{agent_id}` is already online from another process");
            let detail = format!(
                "a second process tried to register as the online agent `{agent_id}` (held by node `{}`)",
                held.node
            );
            let target = serde_json::json!({ "agent_id": agent_id, "pool": pool, "host": host, "pid": pid });
            let actor = agent_actor(&agent_id, &credentials);
            audit_refusal(&state, &credentials, actor, AuditKind::AgentImpersonation, "duplicate", target, detail);
            return refuse(&mut socket, error_body(ProtocolErrorCode::DuplicateAgent, msg, true)).await;
        }
        Err(e) => {
            state.registry.lease_lost(&agent_id);
            tracing::warn!(agent = %agent_id, error = %e, "cannot take an agent's lease; refusing its registration");
            let msg = "the broker cannot reach its shared state right now; retry shortly".to_owned();
            return refuse(&mut socket, error_body(ProtocolErrorCode::RateLimited, msg, false)).await;
        }
    };
    state.registry.set_epoch(&agent_id, session_no, epoch);
    claim.registered();
    tracing::info!(agent = %agent_id, name = %name, epoch, "agent registered");
    let registered = BrokerMessage::Registered(Registered {
        agent_id: agent_id.clone(),
        protocol_version: PROTOCOL_VERSION,
        broker_version: env!("CARGO_PKG_VERSION").into(),
        limits: state.config.limits,
        quotas: state.config.quotas,
        heartbeat_interval_ms: settings.heartbeat_interval_secs * 1_000,
    });
    let actions = state.engine.on_agent_registered(&agent_id).await;
    let rules = state.engine.rules.message(&credentials.org);
    let blocklist = state.engine.safety.message(&credentials.org, &pool);
    let sender =
        Sender { id: agent_id.clone(), name: name.clone(), org: credentials.org.clone(), pool: pool.clone(), epoch: 0 };
    let reason = if send(&mut socket, &registered).await
        && send(&mut socket, &rules).await
        && send(&mut socket, &blocklist).await
        && send(&mut socket, &BrokerMessage::ActionSync { actions }).await
    {
        run(&state, &mut socket, &sender, &credentials, rx, &mut budget).await
    } else {
        "the socket failed during registration".to_owned()
    };
    tracing::info!(agent = %agent_id, %reason, "agent disconnected");
    // The key's session slot and the id's claim are released before the agent shows
    // offline: whoever sees it offline may take its place.
    drop((budget, claim));
    state.registry.disconnect(&agent_id, session_no, &reason);
    if let Err(e) = state.directory.release(&agent_id, epoch).await {
        tracing::debug!(agent = %agent_id, error = %e, "cannot release an agent's lease (it expires by itself)");
    }
    // An agent that moved to another node is online there: its actions stay as they are.
    if state.registry.with(&agent_id, |r| r.remote.is_none()).unwrap_or(true) {
        state.engine.on_agent_disconnected(&sender).await;
    }
}

/// The session loop; returns why it ended.
async fn run(
    state: &AppState,
    socket: &mut WebSocket,
    sender: &Sender,
    credentials: &AgentCredentials,
    mut rx: mpsc::Receiver<crate::registry::Queued>,
    budget: &mut SessionBudget,
) -> String {
    let agent_id = &sender.id;
    let ping_every = state.config.ping_interval();
    let ping_timeout = Duration::from_secs(state.config.agents.ping_timeout_secs);
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let mut bad_frames = 0u32;
    let mut shutdown = state.shutdown.clone();
    let mut key_changes = state.keys.subscribe();
    loop {
        tokio::select! {
            frame = socket.recv() => {
                // Frames already waiting are read too, so that the hits among them are
                // stored in one round trip to the store (each still charged and checked
                // on its own); whatever ends the session stores the hits read before it.
                let mut frame = frame;
                let mut hits: Vec<periscope_protocol::Hit> = Vec::new();
                let mut batched = 0usize;
                let mut catalog = false;
                let end: Option<String> = 'frames: loop {
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            state.registry.touch(agent_id);
                            // Charged before decoding: a flood costs the broker a length check.
                            let size = u32::try_from(text.len()).unwrap_or(u32::MAX);
                            let mut verdict = None;
                            if let Err(over) = budget.charge_bytes(size) {
                                verdict = Some(dropped(state, budget, agent_id, over, DropReason::BytesRate, "bytes"));
                            } else {
                                match decode_agent_message(text.as_str()) {
                                    Ok(AgentMessage::Goodbye { reason }) => {
                                        let mut reason = reason;
                                        periscope_protocol::value::clip_printable(&mut reason, 200);
                                        break 'frames Some(format!("agent said goodbye: {reason}"));
                                    }
                                    Ok(msg) => {
                                        let over = matches!(msg, AgentMessage::Hit(_)).then(|| budget.charge_hit().err()).flatten();
                                        if let Some(over) = over {
                                            verdict = Some(dropped(state, budget, agent_id, over, DropReason::HitsRate, "hits"));
                                        } else if let AgentMessage::Hit(hit) = msg {
                                            batched += size as usize;
                                            hits.push(*hit);
                                        } else if let Some(err) = {
                                            catalog |= matches!(msg, AgentMessage::Catalog(_));
                                            // What came before it is stored first.
                                            // Boxed: the session task stays small between frames.
                                            Box::pin(flush_hits(state, sender, &mut hits, &mut batched)).await;
                                            Box::pin(handle(state, sender, msg, size as usize)).await
                                        } {
                                            bad_frames += 1;
                                            state.registry.count_drop(agent_id, DropReason::BadFrame, 1);
                                            if !send(socket, &BrokerMessage::Error(err)).await {
                                                break 'frames Some(WRITE_FAILED.into());
                                            }
                                        }
                                    }
                                    Err(e) => {
                                        bad_frames += 1;
                                        state.registry.count_drop(agent_id, DropReason::BadFrame, 1);
                                        tracing::debug!(agent = %agent_id, error = %e, "malformed frame from agent");
                                        if !send(socket, &BrokerMessage::Error(e.to_body(false))).await {
                                            break 'frames Some(WRITE_FAILED.into());
                                        }
                                    }
                                }
                            }
                            match verdict {
                                None | Some(Verdict::Quiet) => {}
                                Some(Verdict::Warn(body)) => {
                                    state.registry.count_warning(agent_id);
                                    tracing::warn!(agent = %agent_id, "agent over its budget: {}", body.message);
                                    if !send(socket, &BrokerMessage::Error(body)).await {
                                        break 'frames Some(WRITE_FAILED.into());
                                    }
                                }
                                Some(Verdict::Disconnect(body)) => {
                                    let reason = format!("disconnected for flooding: {}", body.message);
                                    let cooldown = state.config.ingest.flood_cooldown_secs * 1_000;
                                    state.registry.cool_down(agent_id, crate::time::now_ms() + cooldown);
                                    let org_too = state.agent_limits.flooded(&credentials.key_id, &credentials.org);
                                    let dropped = state.registry.with(agent_id, |a| a.dropped).unwrap_or_default();
                                    let mut data = serde_json::to_value(dropped).unwrap_or_default();
                                    data["key_cooling_down_secs"] = state.config.ingest.flood_cooldown_secs.into();
                                    data["organization_cooling_down"] = org_too.into();
                                    state.engine.audit_repeated(
                                        AuditEntry::new(sender.org.clone(), agent_actor(agent_id, credentials), AuditKind::AgentFlooding)
                                            .target(serde_json::json!({ "agent_id": agent_id }))
                                            .detail(reason.clone())
                                            .data(data),
                                        &credentials.key_id,
                                        "flooding",
                                    );
                                    refuse(socket, body).await;
                                    break 'frames Some(reason);
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            bad_frames += 1;
                            state.registry.count_drop(agent_id, DropReason::BadFrame, 1);
                            if !send(socket, &BrokerMessage::Error(ProtocolError::BinaryFrame.to_body(false))).await {
                                break 'frames Some(WRITE_FAILED.into());
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => break 'frames Some("the agent closed the connection".into()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            state.registry.count_drop(agent_id, DropReason::ProtocolError, 1);
                            let body = frame_error(&e);
                            let reason = body.message.clone();
                            refuse(socket, body).await;
                            break 'frames Some(reason);
                        }
                    }
                    if bad_frames > MAX_BAD_FRAMES {
                        let msg = format!("more than {MAX_BAD_FRAMES} malformed frames; closing");
                        refuse(socket, error_body(ProtocolErrorCode::MalformedFrame, msg.clone(), true)).await;
                        break 'frames Some(msg);
                    }
                    if hits.len() >= MAX_HIT_BATCH || batched >= MAX_HIT_BATCH_BYTES {
                        break 'frames None;
                    }
                    match futures_util::FutureExt::now_or_never(socket.recv()) {
                        Some(next) => frame = next,
                        None => break 'frames None,
                    }
                };
                Box::pin(flush_hits(state, sender, &mut hits, &mut batched)).await;
                // Heard now: time spent waiting on the store is not the agent's silence.
                last_heard = tokio::time::Instant::now();
                // Its catalog frames have stopped coming (for now): shared from here on.
                if catalog {
                    state.registry.settle_catalog(agent_id);
                }
                if let Some(reason) = end {
                    return reason;
                }
            }
            out = rx.recv() => {
                match out {
                    Some(msg) => {
                        // Everything already queued goes out now: one message per turn of
                        // this loop drained the queue slower than a busy broker filled it
                        // (sessions busy taking in hits were closed as "too slow").
                        let mut msg = msg;
                        for _ in 0..AGENT_QUEUE {
                            if !send(socket, &msg).await {
                                return WRITE_FAILED.into();
                            }
                            match rx.try_recv() {
                                Ok(next) => msg = next,
                                Err(_) => break,
                            }
                        }
                    }
                    // The registry dropped our sender: replaced by a newer session, or the
                    // agent stopped reading and its queue filled up. It is told which.
                    None => {
                        let replaced = state.registry.with(agent_id, |r| r.conn.is_some()).unwrap_or(false);
                        let msg = if replaced {
                            "replaced by a newer session of this agent id".to_owned()
                        } else {
                            format!(
                                "too slow: the agent read none of its last {AGENT_QUEUE} messages from the broker \
                                 (outbound_queue_full); it reconnects and resyncs"
                            )
                        };
                        refuse(socket, error_body(ProtocolErrorCode::RateLimited, msg.clone(), true)).await;
                        return msg;
                    }
                }
            }
            _ = key_changes.changed() => {
                if !state.keys.key_active(&credentials.key_id) {
                    let msg = "the agent key was revoked or expired; the session is closed".to_owned();
                    refuse(socket, error_body(ProtocolErrorCode::Unauthorized, msg.clone(), true)).await;
                    return msg;
                }
            }
            _ = ping.tick() => {
                if !state.keys.key_active(&credentials.key_id) {
                    let msg = "the agent key was revoked or expired; the session is closed".to_owned();
                    refuse(socket, error_body(ProtocolErrorCode::Unauthorized, msg.clone(), true)).await;
                    return msg;
                }
                if last_heard.elapsed() > ping_every + ping_timeout {
                    state.registry.count_drop(agent_id, DropReason::PingTimeout, 1);
                    let _ = write(socket, Message::Close(Some(CloseFrame { code: close_code::AWAY, reason: "ping timeout".into() }))).await;
                    return format!("no answer to ping within {} s", ping_timeout.as_secs());
                }
                if !write(socket, Message::Ping(Default::default())).await {
                    return WRITE_FAILED.into();
                }
            }
            _ = shutdown.changed() => {
                let _ = send(socket, &BrokerMessage::Goodbye { reason: "broker shutting down".into() }).await;
                let _ = write(socket, Message::Close(Some(CloseFrame { code: close_code::RESTART, reason: "broker shutting down".into() }))).await;
                return "broker shut down".into();
            }
        }
    }
}

/// Counts a dropped frame (under `own` when it was over the session's own budget, else
/// under the key's or the organization's) and says what to do about it.
fn dropped(
    state: &AppState,
    budget: &mut SessionBudget,
    agent_id: &AgentId,
    over: Over,
    own: DropReason,
    what: &str,
) -> Verdict {
    let reason = match over {
        Over::Agent => own,
        Over::Key => DropReason::KeyRate,
        Over::Org => DropReason::OrgRate,
    };
    state.registry.count_drop(agent_id, reason, 1);
    budget.dropped(&state.config.ingest, over, what)
}

/// Stores the hits read together (`bytes` of frames, one call to the store) and counts
/// what became of each. Waits first for room in the store's queue: while the writer is
/// behind, the session reads nothing more and TCP pushes back to the agent.
async fn flush_hits(state: &AppState, from: &Sender, hits: &mut Vec<periscope_protocol::Hit>, bytes: &mut usize) {
    if hits.is_empty() {
        return;
    }
    let permit = state.engine.reserve_ingest(std::mem::take(bytes), hits.len()).await;
    for outcome in state.engine.ingest_hits(from, std::mem::take(hits)).await {
        count_hit(state, &from.id, outcome);
    }
    state.engine.ingest_queued(permit);
}

/// Counts what became of a hit on the agent's record.
fn count_hit(state: &AppState, agent_id: &periscope_protocol::AgentId, outcome: Ingested) {
    match outcome {
        Ingested::Accepted => state.registry.count_hit(agent_id, true),
        Ingested::Refused => state.registry.count_hit(agent_id, false),
        Ingested::RateLimited => state.registry.count_drop(agent_id, DropReason::ActionRate, 1),
        Ingested::Unavailable => state.registry.count_drop(agent_id, DropReason::Unavailable, 1),
        Ingested::LeaseLost => state.registry.count_drop(agent_id, DropReason::LeaseLost, 1),
    }
}

/// Applies one message (a frame of `size` bytes); returns an error frame for messages
/// that are well-formed but wrong in context.
async fn handle(state: &AppState, from: &Sender, msg: AgentMessage, size: usize) -> Option<ProtocolErrorBody> {
    let agent_id = &from.id;
    match msg {
        AgentMessage::Register(_) => Some(error_body(
            ProtocolErrorCode::UnexpectedMessage,
            "already registered; `register` is only valid as the first frame",
            false,
        )),
        AgentMessage::Heartbeat(hb) => {
            state.registry.heartbeat(agent_id, hb);
            None
        }
        AgentMessage::Catalog(update) => {
            let outcome = state.registry.update_catalog(agent_id, update.full, update.entries, update.files);
            (outcome.ignored > 0).then(|| {
                let a = &state.config.agents;
                error_body(
                    ProtocolErrorCode::RateLimited,
                    format!(
                        "catalog is full ({} entries or {} bytes at most, {} entries and {} files per frame); {} \
                         new locations ignored",
                        a.max_catalog_entries,
                        a.max_catalog_bytes,
                        periscope_protocol::messages::MAX_CATALOG_ENTRIES_PER_FRAME,
                        periscope_protocol::messages::MAX_CATALOG_FILES_PER_FRAME,
                        outcome.ignored
                    ),
                    false,
                )
            })
        }
        AgentMessage::ActionStatus(update) => {
            state.engine.on_status(from, &update.action_id, update.state).await;
            None
        }
        AgentMessage::Hit(hit) => {
            let permit = state.engine.reserve_ingest(size, 1).await;
            count_hit(state, agent_id, state.engine.ingest_hit(from, *hit).await);
            state.engine.ingest_queued(permit);
            None
        }
        AgentMessage::LogLines { lines } => {
            let permit = state.engine.reserve_ingest(size, lines.len()).await;
            let outcome = state.engine.ingest_lines(from, lines).await;
            state.engine.ingest_queued(permit);
            if outcome.rate_limited > 0 {
                state.registry.count_drop(agent_id, DropReason::LogRate, outcome.rate_limited as u64);
            }
            None
        }
        AgentMessage::Metrics { reports } => {
            let permit = state.engine.reserve_ingest(size, reports.len()).await;
            state.engine.ingest_metrics(from, reports).await;
            state.engine.ingest_queued(permit);
            None
        }
        AgentMessage::ErrorCounts { reports } => {
            state.engine.ingest_error_counts(from, reports).await;
            None
        }
        AgentMessage::Goodbye { .. } => None,
    }
}
