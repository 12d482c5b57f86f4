//! The agent gateway: `GET /agents`, upgraded to a WebSocket.
//!
//! The agent key is checked on the HTTP request, before the upgrade (401 with a JSON
//! body when missing or wrong). After the upgrade the first frame must be a
//! registration, within `registration_timeout_secs`; then one task per agent owns the
//! socket and `select!`s over frames from the agent, messages queued for it, pings and
//! shutdown. A bad frame gets an error frame naming what was wrong; only protocol
//! violations that leave the session meaningless close it.

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
use crate::registry::{AGENT_QUEUE, RegisterRefusal};

/// Malformed frames tolerated per session before the broker gives up on an agent.
const MAX_BAD_FRAMES: u32 = 20;

/// `GET /agents`: authenticates the agent key and upgrades.
pub async fn agents_ws(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let Some(key) = crate::auth::bearer(&headers) else {
        return unauthorized("agents must send their agent key as `Authorization: Bearer <agent key>`");
    };
    let Some(allowed_pools) = state.agent_pools(key) else {
        return unauthorized("the agent key is not recognized");
    };
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move { session(state, socket, allowed_pools).await })
}

fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": "unauthorized", "message": message } });
    (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], axum::Json(body)).into_response()
}

async fn send(socket: &mut WebSocket, msg: &BrokerMessage) -> bool {
    socket.send(Message::text(encode(msg))).await.is_ok()
}

async fn refuse(socket: &mut WebSocket, body: ProtocolErrorBody) {
    tracing::info!(code = ?body.code, message = %body.message, "agent refused");
    let _ = send(socket, &BrokerMessage::Error(body.clone())).await;
    let reason = periscope_protocol::value::truncate_chars(&body.message, 120).to_owned();
    let _ = socket.send(Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }))).await;
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

async fn session(state: AppState, mut socket: WebSocket, allowed_pools: Vec<String>) {
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
    if !allowed_pools.iter().any(|p| p == "*" || *p == registration.pool) {
        let msg = format!("this agent key may not register into pool `{}`", registration.pool);
        return refuse(&mut socket, error_body(ProtocolErrorCode::Unauthorized, msg, true)).await;
    }
    let agent_id = registration.agent_id.clone();
    let name = registration.display_name.clone();
    let (tx, rx) = mpsc::channel(AGENT_QUEUE);
    let session_no = match state.registry.register(registration, tx) {
        Ok(s) => s,
        Err(RegisterRefusal::Duplicate) => {
            let msg = format!("agent id `{agent_id}` is already online from another process");
            return refuse(&mut socket, error_body(ProtocolErrorCode::DuplicateAgent, msg, true)).await;
        }
    };
    tracing::info!(agent = %agent_id, name = %name, "agent registered");
    let registered = BrokerMessage::Registered(Registered {
        agent_id: agent_id.clone(),
        protocol_version: PROTOCOL_VERSION,
        broker_version: env!("CARGO_PKG_VERSION").into(),
        limits: state.config.limits,
        quotas: state.config.quotas,
        heartbeat_interval_ms: settings.heartbeat_interval_secs * 1_000,
    });
    let actions = state.engine.on_agent_registered(&agent_id);
    let rules = state.engine.rules.message();
    let reason = if send(&mut socket, &registered).await
        && send(&mut socket, &rules).await
        && send(&mut socket, &BrokerMessage::ActionSync { actions }).await
    {
        run(&state, &mut socket, &agent_id, &name, rx).await
    } else {
        "the socket failed during registration".to_owned()
    };
    tracing::info!(agent = %agent_id, %reason, "agent disconnected");
    state.registry.disconnect(&agent_id, session_no, &reason);
    state.engine.on_agent_disconnected(&agent_id);
}

/// The session loop; returns why it ended.
async fn run(
    state: &AppState,
    socket: &mut WebSocket,
    agent_id: &AgentId,
    name: &str,
    mut rx: mpsc::Receiver<BrokerMessage>,
) -> String {
    let ping_every = state.config.ping_interval();
    let ping_timeout = Duration::from_secs(state.config.agents.ping_timeout_secs);
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let mut bad_frames = 0u32;
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            frame = socket.recv() => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        state.registry.touch(agent_id);
                        match decode_agent_message(text.as_str()) {
                            Ok(AgentMessage::Goodbye { reason }) => {
                                return format!("agent said goodbye: {}", periscope_protocol::value::truncate_chars(&reason, 200));
                            }
                            Ok(msg) => {
                                if let Some(err) = handle(state, agent_id, name, msg) {
                                    bad_frames += 1;
                                    if !send(socket, &BrokerMessage::Error(err)).await {
                                        return "the socket failed".into();
                                    }
                                }
                            }
                            Err(e) => {
                                bad_frames += 1;
                                tracing::debug!(agent = %agent_id, error = %e, "malformed frame from agent");
                                if !send(socket, &BrokerMessage::Error(e.to_body(false))).await {
                                    return "the socket failed".into();
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        bad_frames += 1;
                        if !send(socket, &BrokerMessage::Error(ProtocolError::BinaryFrame.to_body(false))).await {
                            return "the socket failed".into();
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return "the agent closed the connection".into(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let body = frame_error(&e);
                        let reason = body.message.clone();
                        refuse(socket, body).await;
                        return reason;
                    }
                }
                if bad_frames > MAX_BAD_FRAMES {
                    let msg = format!("more than {MAX_BAD_FRAMES} malformed frames; closing");
                    refuse(socket, error_body(ProtocolErrorCode::MalformedFrame, msg.clone(), true)).await;
                    return msg;
                }
            }
            out = rx.recv() => {
                match out {
                    Some(msg) => if !send(socket, &msg).await { return "the socket failed".into() },
                    // The registry dropped our sender: replaced by a newer session or too slow.
                    None => {
                        let _ = socket.send(Message::Close(None)).await;
                        return "replaced by a newer session or disconnected for being too slow".into();
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every + ping_timeout {
                    let _ = socket.send(Message::Close(Some(CloseFrame { code: close_code::AWAY, reason: "ping timeout".into() }))).await;
                    return format!("no answer to ping within {} s", ping_timeout.as_secs());
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return "the socket failed".into();
                }
            }
            _ = shutdown.changed() => {
                let _ = send(socket, &BrokerMessage::Goodbye { reason: "broker shutting down".into() }).await;
                let _ = socket.send(Message::Close(Some(CloseFrame { code: close_code::RESTART, reason: "broker shutting down".into() }))).await;
                return "broker shut down".into();
            }
        }
    }
}

/// Applies one message; returns an error frame for messages that are well-formed but
/// wrong in context.
fn handle(state: &AppState, agent_id: &AgentId, name: &str, msg: AgentMessage) -> Option<ProtocolErrorBody> {
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
            let ignored = state.registry.update_catalog(agent_id, update.full, update.entries);
            (ignored > 0).then(|| {
                error_body(
                    ProtocolErrorCode::RateLimited,
                    format!(
                        "catalog is full ({} entries); {ignored} new locations ignored",
                        state.config.agents.max_catalog_entries
                    ),
                    false,
                )
            })
        }
        AgentMessage::ActionStatus(update) => {
            state.engine.on_status(agent_id, &update.action_id, update.state);
            None
        }
        AgentMessage::Hit(hit) => {
            let accepted = state.engine.ingest_hit(agent_id, name, *hit);
            state.registry.count_hit(agent_id, accepted);
            None
        }
        AgentMessage::LogLines { lines } => {
            state.engine.ingest_lines(agent_id, name, lines);
            None
        }
        AgentMessage::Metrics { reports } => {
            state.engine.ingest_metrics(agent_id, reports);
            None
        }
        AgentMessage::Goodbye { .. } => None,
    }
}
