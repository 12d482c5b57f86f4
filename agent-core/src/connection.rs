//! The agent's own thread: connect, register, keep the action table in sync with the
//! broker, turn raw hits into protocol hits and send them, reconnect with backoff.
//!
//! Runs on a dedicated thread with a single-threaded tokio runtime, so the agent neither
//! needs nor disturbs the host's runtime, and a stalled broker stalls only this thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use periscope_protocol::{
    ActionId, ActionSpec, ActionStatusUpdate, AgentActionState, AgentId, AgentMessage, BrokerMessage, CaptureLimits,
    CatalogUpdate, Heartbeat, LogDestination, LogLine, MAX_FRAME_BYTES, PROTOCOL_VERSION, ProtocolErrorCode,
    Registered, Registration, messages::decode_broker_message, messages::encode,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::capture::{RawHit, client_hit};
use crate::config::AgentConfig;
use crate::guard::{CodeIndex, Guard, Verdict};
use crate::state::{Budgets, Core, Installed};
use crate::{CatalogBatch, Runtime};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The host asked the agent to stop.
    Shutdown,
    /// The connection failed or closed; retry after backoff.
    Retry(String),
    /// The broker refused us for a reason retrying soon will not fix (bad key, version);
    /// retry at the slowest backoff.
    Refused(String),
}

/// Connection state the agent thread keeps across sessions.
pub(crate) struct Runner<R: Runtime> {
    pub(crate) config: AgentConfig,
    pub(crate) agent_id: AgentId,
    /// The adapter: where actions are installed, what the catalog holds, how hits are built.
    runtime: Arc<R>,
    pub(crate) shared: Arc<Core<R::Payload>>,
    pub(crate) hits_rx: mpsc::Receiver<Box<RawHit<R::Payload>>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Live action specs, by id, as last synced from the broker.
    actions: HashMap<ActionId, Arc<Installed>>,
    limits: CaptureLimits,
    budgets: Arc<Budgets>,
    heartbeat: Duration,
    /// Which of the broker URLs to try next (a cluster's nodes, in turn).
    next_url: usize,
    /// Whether the adapter captures errors (its capabilities say `capture_errors`);
    /// error-capture actions are answered `unsupported` otherwise.
    error_capture: bool,
    /// The version and blocklist checks, and what they read.
    guard: Guard,
    /// The agent's own code, from the catalog it published.
    index: CodeIndex,
    /// What the guard made of each action at the last install.
    verdicts: HashMap<ActionId, Verdict>,
}

impl<R: Runtime> Runner<R> {
    pub(crate) fn new(
        config: AgentConfig,
        agent_id: AgentId,
        runtime: Arc<R>,
        shared: Arc<Core<R::Payload>>,
        hits_rx: mpsc::Receiver<Box<RawHit<R::Payload>>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let error_capture = runtime.identity().capabilities.iter().any(|c| c == "capture_errors");
        Runner {
            error_capture,
            agent_id,
            runtime,
            shared,
            hits_rx,
            shutdown,
            actions: HashMap::new(),
            limits: CaptureLimits::default(),
            budgets: Arc::new(Budgets::new(Default::default())),
            heartbeat: Duration::from_secs(30),
            next_url: 0,
            guard: Guard {
                service_version: config.service_version.clone(),
                build: config.build.clone(),
                pool: config.pool.clone(),
                ..Guard::default()
            },
            index: CodeIndex::default(),
            verdicts: HashMap::new(),
            config,
        }
    }

    /// Runs sessions until shutdown, backing off between failed attempts.
    pub(crate) async fn run(mut self) {
        let mut delay = self.config.reconnect_initial;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            let end = self.session().await;
            // Only a session that was up ends one: a failed attempt changes nothing the
            // adapter should hear about (each call may rebuild the host's interest caches).
            if self.shared.set_connected(false) {
                self.connection_changed(false).await;
            }
            // A session that ended moves the agent to the next node (with one URL, the
            // same one again: a load balancer picks a live node).
            let broker = self.url().to_owned();
            self.next_url = self.next_url.wrapping_add(1);
            let pause = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Retry(why) => {
                    tracing::warn!(target: "periscope_agent", %broker, reason = %why, "periscope agent disconnected; will reconnect");
                    // A session that lasted a while resets the backoff.
                    if started.elapsed() > Duration::from_secs(60) {
                        delay = self.config.reconnect_initial;
                    }
                    let d = jitter(delay);
                    delay = (delay * 2).min(self.config.reconnect_max);
                    d
                }
                SessionEnd::Refused(why) => {
                    tracing::error!(target: "periscope_agent", %broker, reason = %why, "periscope broker refused this agent");
                    delay = self.config.reconnect_max;
                    jitter(delay)
                }
            };
            self.drop_queued_while_disconnected();
            let wake_at = tokio::time::Instant::now() + pause;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake_at) => break,
                    _ = self.shutdown.changed() => return,
                    // Code that ran for the first time may match an action we hold: arm it
                    // even while the broker is away.
                    _ = self.shared.wake.notified() => {
                        if self.shared.rebuild_needed.load(Ordering::Acquire) {
                            self.install().await;
                        }
                    }
                    // Keep draining while disconnected: hold no stale hits, count them.
                    Some(raw) = self.hits_rx.recv() => self.drop_disconnected(&raw),
                }
            }
        }
    }

    /// Hits captured while no broker was there are stale by the time one is: drop and count.
    fn drop_queued_while_disconnected(&mut self) {
        while let Ok(raw) = self.hits_rx.try_recv() {
            self.drop_disconnected(&raw);
        }
    }

    /// Counts a hit lost to a missing broker and gives its slot back, so a snapshot
    /// that was waiting for that hit fires again once the broker is back.
    fn drop_disconnected(&self, raw: &RawHit<R::Payload>) {
        self.shared.counters.dropped_disconnected.fetch_add(1, Ordering::Relaxed);
        if raw.action.snapshot.is_some() {
            let _ = raw.action.taken.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1));
            raw.action.done.store(false, Ordering::Release);
        }
    }

    async fn session(&mut self) -> SessionEnd {
        let mut shutdown = self.shutdown.clone();
        let connect = tokio::time::timeout(self.config.connect_timeout, self.connect_and_register());
        let (socket, registered) = tokio::select! {
            r = connect => match r {
                Ok(Ok(pair)) => pair,
                Ok(Err(end)) => return end,
                Err(_) => return SessionEnd::Retry(format!("no registration within {:?}", self.config.connect_timeout)),
            },
            _ = shutdown.changed() => return SessionEnd::Shutdown,
        };
        tracing::info!(target: "periscope_agent", broker = %self.url(), agent_id = %self.agent_id, "periscope agent connected");
        self.limits = registered.limits;
        self.budgets = Arc::new(Budgets::new(registered.quotas));
        if self.shared.set_connected(true) {
            self.connection_changed(true).await;
        }
        self.heartbeat = Duration::from_millis(registered.heartbeat_interval_ms.clamp(1_000, 300_000));
        // Re-install what we had with the new budgets until the broker's sync arrives.
        self.reinstall().await;
        // From here the socket is read here and written by its own task, so that a write
        // waiting on a slow broker never stops the session from reading (the broker's
        // pings, action changes) or from seeing that the connection is gone.
        let (sink, mut stream) = socket.split();
        let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
        let mut writer = Writer(tokio::spawn(write_frames(sink, rx)));
        let mut socket = Outbox { tx };
        for msg in self.catalog(true) {
            if let Err(e) = send(&mut socket, &msg).await {
                return SessionEnd::Retry(e);
            }
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.tick().await;
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        loop {
            // While the writer holds all the frames it may, hits stay in their queue (which
            // then fills, and the host stops capturing: `Core::can_capture`).
            let writer_full = socket.tx.capacity() == 0;
            tokio::select! {
                frame = stream.next() => {
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            match decode_broker_message(text.as_str()) {
                                Ok(msg) => if let Some(end) = self.on_broker_message(msg, &mut socket).await {
                                    return end;
                                },
                                Err(e) => tracing::warn!(target: "periscope_agent", error = %e, "periscope agent ignored a frame it could not decode"),
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return SessionEnd::Retry(frame.map_or_else(|| "closed by broker".to_owned(), |f| format!("closed by broker: {}", f.reason)));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return SessionEnd::Retry(e.to_string()),
                        None => return SessionEnd::Retry("connection closed".into()),
                    }
                }
                () = room_in(&socket.tx), if writer_full => {}
                ended = &mut writer.0 => {
                    return SessionEnd::Retry(ended.unwrap_or_else(|e| format!("the connection's writer failed: {e}")));
                }
                Some(raw) = self.hits_rx.recv(), if !writer_full => {
                    let sent = if raw.action.log.is_some() {
                        self.send_log(&raw, &mut socket).await
                    } else {
                        self.send_hit(&raw, &mut socket).await
                    };
                    if let Err(e) = sent {
                        return SessionEnd::Retry(e);
                    }
                }
                _ = self.shared.wake.notified() => {
                    if let Err(e) = self.flush_local_changes(&mut socket).await {
                        return SessionEnd::Retry(e);
                    }
                }
                _ = heartbeat.tick() => {
                    let mut msgs = vec![AgentMessage::Heartbeat(self.heartbeat_message())];
                    msgs.extend(self.catalog(false));
                    for msg in msgs {
                        if let Err(e) = send(&mut socket, &msg).await {
                            return SessionEnd::Retry(e);
                        }
                    }
                }
                _ = housekeeping.tick() => {
                    if let Err(e) = self.flush_metrics(&mut socket, false).await {
                        return SessionEnd::Retry(e);
                    }
                    if let Err(e) = self.flush_error_counts(&mut socket, None).await {
                        return SessionEnd::Retry(e);
                    }
                    self.prune_finished().await;
                }
                _ = self.shutdown.changed() => {
                    let _ = send(&mut socket, &AgentMessage::Goodbye { reason: "host shutting down".into() }).await;
                    // The writer sends what it holds, then closes the connection.
                    drop(socket);
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer.0).await;
                    return SessionEnd::Shutdown;
                }
            }
        }
    }

    /// The broker URL this session uses.
    fn url(&self) -> &str {
        let urls = self.config.broker_urls();
        urls[self.next_url % urls.len()]
    }

    async fn connect_and_register(&self) -> Result<(Socket, Registered), SessionEnd> {
        let mut request =
            self.url().into_client_request().map_err(|e| SessionEnd::Refused(format!("bad broker URL: {e}")))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.config.agent_key))
            .map_err(|_| SessionEnd::Refused("the agent key contains characters not allowed in a header".into()))?;
        request.headers_mut().insert("authorization", auth);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(4 * MAX_FRAME_BYTES)
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let connector = if self.url().starts_with("wss://") {
            let tls = crate::tls::client_config(self.config.ca_cert.as_deref()).map_err(SessionEnd::Refused)?;
            Some(tokio_tungstenite::Connector::Rustls(tls))
        } else {
            None
        };
        let (mut socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, connector).await.map_err(
                |e| match e {
                    tungstenite::Error::Http(resp) if resp.status() == 401 || resp.status() == 403 => {
                        let body =
                            resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                        SessionEnd::Refused(format!("agent key rejected ({}): {body}", resp.status()))
                    }
                    other => SessionEnd::Retry(other.to_string()),
                },
            )?;
        let registration = self.registration();
        send_direct(&mut socket, &AgentMessage::Register(Box::new(registration))).await.map_err(SessionEnd::Retry)?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match decode_broker_message(text.as_str()) {
                    Ok(BrokerMessage::Registered(r)) => return Ok((socket, r)),
                    Ok(BrokerMessage::Error(err)) => {
                        let text = format!("{:?}: {}", err.code, err.message);
                        return Err(match err.code {
                            ProtocolErrorCode::UnsupportedVersion
                            | ProtocolErrorCode::Unauthorized
                            | ProtocolErrorCode::InvalidRegistration
                            | ProtocolErrorCode::IdentityBound => SessionEnd::Refused(text),
                            _ => SessionEnd::Retry(text),
                        });
                    }
                    Ok(other) => {
                        tracing::debug!(target: "periscope_agent", kind = ?other, "unexpected message before registration")
                    }
                    Err(e) => return Err(SessionEnd::Retry(e.to_string())),
                },
                Some(Ok(Message::Close(f))) => {
                    return Err(SessionEnd::Retry(f.map_or_else(|| "closed".into(), |f| f.reason.to_string())));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(SessionEnd::Retry(e.to_string())),
                None => return Err(SessionEnd::Retry("closed during registration".into())),
            }
        }
    }

    fn registration(&self) -> Registration {
        let host = hostname();
        let pid = std::process::id();
        let identity = self.runtime.identity();
        Registration {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            display_name: self.config.display_name.clone().unwrap_or_else(|| {
                // A derived name is clipped (in bytes) to what the broker accepts.
                let mut name = format!("{}@{host}#{pid}", self.config.service);
                let mut end = name.len().min(periscope_protocol::messages::registration_bounds::MAX_NAME_LEN);
                while !name.is_char_boundary(end) {
                    end -= 1;
                }
                name.truncate(end);
                name
            }),
            pool: self.config.pool.clone(),
            tags: self.config.tags.clone(),
            service: self.config.service.clone(),
            service_version: self.config.service_version.clone(),
            build: self.config.build.clone(),
            language: identity.language,
            runtime: identity.runtime,
            host,
            pid,
            agent_version: identity.agent_version,
            capabilities: identity.capabilities,
        }
    }

    async fn on_broker_message(&mut self, msg: BrokerMessage, socket: &mut Outbox) -> Option<SessionEnd> {
        match msg {
            BrokerMessage::ActionSync { actions } => {
                let keep: HashMap<ActionId, ActionSpec> = actions.into_iter().map(|a| (a.id.clone(), a)).collect();
                self.actions.retain(|id, _| keep.contains_key(id));
                for (id, spec) in keep {
                    // Keep the running state (hit slots) of actions we already run.
                    let unchanged = self.actions.get(&id).is_some_and(|a| a.spec == spec);
                    if !unchanged {
                        self.actions.insert(id, Arc::new(Installed::new(spec, &self.budgets.quotas)));
                    }
                }
                self.install_and_report(socket, None).await
            }
            BrokerMessage::ActionAdd { action } => {
                let id = action.id.clone();
                self.actions.insert(id.clone(), Arc::new(Installed::new(action, &self.budgets.quotas)));
                self.install_and_report(socket, Some(&id)).await
            }
            BrokerMessage::ActionRemove { action_id, reason } => {
                tracing::debug!(target: "periscope_agent", action = %action_id, %reason, "action removed");
                if let Some(action) = self.actions.remove(&action_id) {
                    // So do the errors it counted since its last report.
                    if let Err(e) = self.flush_error_counts(socket, Some(&action)).await {
                        return Some(SessionEnd::Retry(e));
                    }
                    // A metric's last partial interval still counts.
                    if let Some(report) = metric_report(&action, crate::unix_ms(), true)
                        && let Err(e) = send(socket, &AgentMessage::Metrics { reports: vec![report] }).await
                    {
                        return Some(SessionEnd::Retry(e));
                    }
                    self.install().await;
                }
                None
            }
            BrokerMessage::Error(err) => {
                tracing::warn!(target: "periscope_agent", code = ?err.code, message = %err.message, "periscope broker reported an error");
                err.fatal.then_some(SessionEnd::Retry(err.message))
            }
            BrokerMessage::RedactionRules { version, config } => {
                let built = serde_json::from_value::<periscope_redaction::RedactionConfig>(config)
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.version = version;
                        periscope_redaction::Redactor::new(&c).map_err(|e| e.to_string())
                    });
                match built {
                    Ok(r) => {
                        self.shared.set_redactor(r);
                        // Expressions on the host's threads read through the table's rules.
                        self.install().await;
                    }
                    // Keep the rules we have (never fewer than the built-ins) and say why.
                    Err(e) => {
                        tracing::warn!(target: "periscope_agent", version, error = %e, "periscope agent kept its redaction rules: the new ones do not build")
                    }
                }
                None
            }
            BrokerMessage::Blocklist { version, rules } => {
                if version < self.guard.rules_version {
                    return None;
                }
                tracing::info!(target: "periscope_agent", version, rules = rules.len(), "periscope agent received its blocklist");
                self.guard.rules = rules;
                self.guard.rules_version = version;
                // Every action is checked again: one now covered is dropped (and says
                // why), one no longer covered runs.
                self.install_and_report(socket, None).await
            }
            BrokerMessage::Goodbye { reason } => Some(SessionEnd::Retry(format!("broker said goodbye: {reason}"))),
            BrokerMessage::Registered(_) => None,
        }
    }

    /// Installs the current action set and reports each action's state (all of them, or
    /// only `only`).
    async fn install_and_report(&mut self, socket: &mut Outbox, only: Option<&ActionId>) -> Option<SessionEnd> {
        let matched = self.install().await;
        for (action, callsites) in matched {
            if only.is_some_and(|id| *id != action.spec.id) {
                continue;
            }
            let state = status_of(&action, callsites, self.supports(&action), self.verdicts.get(&action.spec.id));
            let msg = AgentMessage::ActionStatus(ActionStatusUpdate { action_id: action.spec.id.clone(), state });
            if let Err(e) = send(socket, &msg).await {
                return Some(SessionEnd::Retry(e));
            }
        }
        None
    }

    async fn reinstall(&mut self) {
        let quotas = self.budgets.quotas;
        self.actions = self
            .actions
            .drain()
            .map(|(id, a)| {
                let fresh = Installed::new(a.spec.clone(), &quotas);
                fresh.taken.store(a.taken.load(Ordering::Relaxed), Ordering::Relaxed);
                fresh.seq.store(a.seq.load(Ordering::Relaxed), Ordering::Relaxed);
                (id, Arc::new(fresh))
            })
            .collect();
        self.install().await;
    }

    /// Tells the adapter a session began or ended, off the runtime (it may take the
    /// host's locks, as installing does).
    async fn connection_changed(&self, connected: bool) {
        let runtime = Arc::clone(&self.runtime);
        let _ = tokio::task::spawn_blocking(move || runtime.connection_changed(connected)).await;
    }

    /// Hands the current actions to the adapter to install; returns, per action, how
    /// many locations it matched (when the adapter knows at once).
    async fn install(&mut self) -> Vec<(Arc<Installed>, u32)> {
        // Cleared before the adapter reads its locations: one that appears from here on
        // sets it again and gets its own rebuild.
        self.shared.rebuild_needed.store(false, Ordering::Release);
        self.verdicts = self
            .actions
            .iter()
            .map(|(id, a)| {
                a.no_capture.store(self.guard.no_capture(&a.spec, &self.index), Ordering::Relaxed);
                (id.clone(), self.guard.verdict(&a.spec, &self.index))
            })
            .collect();
        let verdicts = &self.verdicts;
        let allowed = |a: &Installed| verdicts.get(&a.spec.id).is_none_or(|v| *v == Verdict::Run);
        let runnable: Vec<Arc<Installed>> = self
            .actions
            .values()
            .filter(|a| !a.done.load(Ordering::Relaxed) && a.runnable() && allowed(a) && self.supports(a))
            .cloned()
            .collect();
        // Installing may take locks the host's threads take too (tracing's callsite
        // registry, an interpreter's lock): off the runtime, so that a host thread
        // waiting on them never waits on our runtime.
        let (runtime, budgets, limits) = (Arc::clone(&self.runtime), Arc::clone(&self.budgets), self.limits);
        let installed = tokio::task::spawn_blocking(move || runtime.install(runnable, budgets, limits)).await;
        let installed = installed.unwrap_or_default();
        // An adapter that installs later reports its runnable actions itself.
        let deferred = installed.is_none();
        let mut matched = installed.unwrap_or_default();
        // Report every action, including the ones not installed (for their error status).
        for action in self.actions.values() {
            let reported_later = deferred && action.runnable() && allowed(action) && self.supports(action);
            if !reported_later && !matched.iter().any(|(a, _)| a.spec.id == action.spec.id) {
                matched.push((Arc::clone(action), 0));
            }
        }
        matched
    }

    /// Statuses and completions raised on application threads; new callsites that
    /// match pending actions.
    async fn flush_local_changes(&mut self, socket: &mut Outbox) -> Result<(), String> {
        let statuses = self.shared.take_statuses();
        let mut completed = false;
        for (action_id, state) in statuses {
            if matches!(state, AgentActionState::Completed) {
                completed = true;
            }
            send(socket, &AgentMessage::ActionStatus(ActionStatusUpdate { action_id, state })).await?;
        }
        if completed {
            self.prune_finished().await;
        }
        if self.shared.rebuild_needed.load(Ordering::Acquire) {
            let matched = self.install().await;
            for (action, callsites) in matched {
                if callsites > 0 && action.runnable() && self.supports(&action) {
                    let state = AgentActionState::Installed { callsites };
                    send(
                        socket,
                        &AgentMessage::ActionStatus(ActionStatusUpdate { action_id: action.spec.id.clone(), state }),
                    )
                    .await?;
                }
            }
        }
        for msg in self.catalog(false) {
            send(socket, &msg).await?;
        }
        if self.waiting_on_code()
            && let Some(end) = self.install_and_report(socket, None).await
        {
            return Err(match end {
                SessionEnd::Retry(e) | SessionEnd::Refused(e) => e,
                SessionEnd::Shutdown => "shutting down".to_owned(),
            });
        }
        Ok(())
    }

    /// The adapter's catalog changes as frames, learned first (file hashes, modules,
    /// functions) for the guard's checks.
    fn catalog(&mut self, full: bool) -> Vec<AgentMessage> {
        let batch = self.runtime.catalog(full);
        if self.index.learn(&batch, full) && self.verdicts.values().any(|v| *v == Verdict::Wait) {
            // An action waiting on a file's hash is checked again now.
            self.shared.rebuild_needed.store(true, Ordering::Release);
            self.shared.wake.notify_one();
        }
        catalog_frames(batch, full)
    }

    /// Whether an action waits on code the agent has not seen and the catalog since
    /// grew (`rebuild_needed` set by [`Runner::catalog`]).
    fn waiting_on_code(&self) -> bool {
        self.shared.rebuild_needed.load(Ordering::Acquire) && self.verdicts.values().any(|v| *v == Verdict::Wait)
    }

    /// Drops actions that completed or expired locally.
    async fn prune_finished(&mut self) {
        let now = crate::unix_ms();
        let before = self.actions.len();
        self.actions.retain(|_, a| !a.done.load(Ordering::Relaxed) && a.spec.expires_at_ms > now);
        if self.actions.len() != before {
            self.install().await;
        }
    }

    /// Whether the adapter can run this kind of action at all.
    fn supports(&self, action: &Installed) -> bool {
        action.errors.is_none() || self.error_capture
    }

    /// Sends how often each distinct error happened since the last report (of every
    /// error-capture action, or of `only`), messages redacted.
    async fn flush_error_counts(&mut self, socket: &mut Outbox, only: Option<&Installed>) -> Result<(), String> {
        let now = self.shared.clock.now();
        let mut reports = Vec::new();
        match only {
            Some(action) => {
                if let Some(errors) = &action.errors {
                    reports = errors.take_counts(&action.spec.id, now);
                }
            }
            None => {
                for action in self.actions.values() {
                    if let Some(errors) = &action.errors {
                        reports.extend(errors.take_counts(&action.spec.id, now));
                    }
                }
            }
        }
        if reports.is_empty() {
            return Ok(());
        }
        let redactor = self.shared.redactor();
        let mut report = periscope_redaction::Report::new();
        for r in &mut reports {
            let message = redactor.redact_text(&r.message, "error.message", &mut report).into_owned();
            r.message = message;
            r.clip();
        }
        for chunk in reports.chunks(periscope_protocol::errors::MAX_ERROR_COUNTS_PER_FRAME) {
            send(socket, &AgentMessage::ErrorCounts { reports: chunk.to_vec() }).await?;
        }
        Ok(())
    }

    /// Sends the aggregates of metrics whose interval is over (all of them when `all`).
    async fn flush_metrics(&mut self, socket: &mut Outbox, all: bool) -> Result<(), String> {
        let now = crate::unix_ms();
        let reports: Vec<_> = self.actions.values().filter_map(|a| metric_report(a, now, all)).collect();
        for chunk in reports.chunks(periscope_protocol::telemetry::MAX_METRIC_REPORTS_PER_FRAME) {
            send(socket, &AgentMessage::Metrics { reports: chunk.to_vec() }).await?;
        }
        Ok(())
    }

    /// Renders a dynamic log line off the host's thread, charges its bytes, and sends
    /// it to the broker and/or the service's own log.
    async fn send_log(&mut self, raw: &RawHit<R::Payload>, socket: &mut Outbox) -> Result<(), String> {
        let (Some(log), Some(template)) = (&raw.action.log, &raw.action.exprs.template) else { return Ok(()) };
        let redactor = self.shared.redactor();
        // Placeholders read what a client would see (redacted, cut), whatever the
        // expression does with a value; each placeholder's result is then redacted again
        // by its own name below.
        let mut hit = client_hit(&*self.runtime, raw, &self.limits, &redactor);
        // A function's log line is written at the call's end: `{duration_ms}` reads how
        // long it took (beside its arguments and `return`).
        if let Some(call) = raw.call
            && !hit.fields.iter().any(|f| f.name == "duration_ms")
        {
            hit.fields.push(periscope_protocol::Field::new(
                "duration_ms",
                periscope_protocol::Value::Float(call.duration_ms),
            ));
        }
        let mut steps = periscope_protocol::Budget::default();
        let mut report = periscope_redaction::Report::new();
        // Each placeholder's value is redacted (by its field name too) before it is text.
        let rendered = match template.render(&hit, &mut steps, |i, expr, value| {
            redactor.redact_field(expr.field_name().unwrap_or(""), value, &format!("placeholders[{i}]"), &mut report);
        }) {
            Ok(r) => r,
            Err(e) => {
                return report_eval_error(socket, &raw.action, "template", &e).await;
            }
        };
        for failed in &rendered.errors {
            let context = format!("template placeholder {}", failed.index);
            report_eval_error(socket, &raw.action, &context, &failed.error).await?;
        }
        let bytes = rendered.text.len() as u64;
        let now = self.shared.clock.now();
        if !log.byte_rate.try_take(now, bytes) || !self.budgets.log_bytes.try_take(now, bytes) {
            let pause = self.budgets.quotas.pause_millis.max(100) * 1_000_000;
            log.paused_until.store(now + pause, Ordering::Relaxed);
            self.shared.counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
            if raw.action.pause(periscope_protocol::PauseReason::QuotaLog) {
                let state = AgentActionState::Paused {
                    reason: periscope_protocol::PauseReason::QuotaLog,
                    message: format!(
                        "dynamic log byte budget reached ({} bytes/s, burst x{}); lines are dropped until it recovers",
                        self.budgets.quotas.log_bytes_per_sec, self.budgets.quotas.log_burst_factor
                    ),
                };
                send(
                    socket,
                    &AgentMessage::ActionStatus(ActionStatusUpdate { action_id: raw.action.spec.id.clone(), state }),
                )
                .await?;
            }
            return Ok(());
        }
        let spec = &log.spec;
        if matches!(spec.destination, LogDestination::App | LogDestination::Both) {
            self.runtime.emit_app_log(spec.level, &raw.action.spec.id, &rendered.text);
        }
        if matches!(spec.destination, LogDestination::Broker | LogDestination::Both) {
            let line = LogLine {
                action_id: raw.action.spec.id.clone(),
                seq: raw.seq,
                time_ms: raw.time_ms,
                level: spec.level,
                text: rendered.text,
                thread: raw.thread.name.clone().or_else(|| Some(raw.thread.id.clone())),
                redactions: line_findings(&hit, template, report),
                rules_version: redactor.version(),
            };
            send(socket, &AgentMessage::LogLines { lines: vec![line] }).await?;
        }
        Ok(())
    }

    async fn send_hit(&mut self, raw: &RawHit<R::Payload>, socket: &mut Outbox) -> Result<(), String> {
        // Watches read the hit exactly as a client will see it: strings kept longer than
        // the limit until redaction has seen them whole (so a secret straddling the cut
        // is still recognized), redacted, then cut. An expression (`len(user.password)`,
        // `user.password + "x"`) cannot carry a secret out from under its name.
        let redactor = self.shared.redactor();
        let mut hit = client_hit(&*self.runtime, raw, &self.limits, &redactor);
        if let Some(occurrence) = &raw.error {
            // An error capture is located where the failure happened, and says what it was.
            hit.location.file.clone_from(&occurrence.file);
            hit.location.line = occurrence.line;
            if occurrence.module.is_some() {
                hit.location.module.clone_from(&occurrence.module);
            }
            let mut report = periscope_redaction::Report::new();
            let mut error = occurrence.error.clone();
            error.message = redactor.redact_text(&error.message, "error.message", &mut report).into_owned();
            hit.redactions.extend(report.into_findings().into_iter().map(Into::into));
            hit.error = Some(error);
        }
        // Watches are evaluated here, off the host's thread.
        let mut watches = Vec::with_capacity(raw.action.exprs.watches.len());
        for (i, w) in raw.action.exprs.watches.iter().enumerate() {
            let mut budget = periscope_protocol::Budget::default();
            let result = match w.eval(&hit, &mut budget) {
                Ok(value) => periscope_protocol::WatchResult {
                    expression: w.source().to_owned(),
                    value: Some(value),
                    error: None,
                },
                Err(e) => {
                    report_eval_error(socket, &raw.action, &format!("watch[{i}]"), &e).await?;
                    periscope_protocol::WatchResult {
                        expression: w.source().to_owned(),
                        value: None,
                        error: Some(e.to_string()),
                    }
                }
            };
            watches.push(result);
        }
        hit.watches = watches;
        // Again, for the watch values (a second pass leaves the fields as they are).
        redactor.redact_hit(&mut hit);
        hit.enforce_limits(&self.limits);
        send(socket, &AgentMessage::Hit(Box::new(hit))).await?;
        self.shared.counters.hits_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn heartbeat_message(&self) -> Heartbeat {
        let c = &self.shared.counters;
        Heartbeat {
            hits_sent: c.hits_sent.load(Ordering::Relaxed),
            hits_dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            hits_dropped_rate: c.dropped_rate.load(Ordering::Relaxed),
            hits_dropped_disconnected: c.dropped_disconnected.load(Ordering::Relaxed),
            queue_len: self.hits_rx.len() as u64,
            actions: self.actions.len() as u64,
            calls_dropped_open: c.dropped_open_calls.load(Ordering::Relaxed),
        }
    }
}

/// Frames the session hands its writer task ahead of the socket (the agent's own queue
/// of raw hits is where a stalled broker backs up to, not here).
const OUTBOX_FRAMES: usize = 16;

/// The session's sending half: frames for the writer task.
struct Outbox {
    tx: mpsc::Sender<Message>,
}

/// Waits until the writer can take another frame.
async fn room_in(tx: &mpsc::Sender<Message>) {
    let _ = tx.reserve().await;
}

/// The writer task, stopped when its session ends (what it still held is lost, as the
/// connection is).
struct Writer(tokio::task::JoinHandle<String>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the session's frames in order until the session drops its [`Outbox`] (then
/// closes the connection) or a write fails; returns why it stopped.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Message>,
) -> String {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = sink.send(frame).await {
            return e.to_string();
        }
    }
    let _ = sink.close().await;
    "the session closed the connection".into()
}

async fn send(socket: &mut Outbox, msg: &AgentMessage) -> Result<(), String> {
    let text = encode(msg);
    if text.len() > MAX_FRAME_BYTES {
        // enforce_limits keeps hits far below this; anything else this large is a bug.
        tracing::warn!(target: "periscope_agent", kind = msg.type_name(), bytes = text.len(), "periscope agent dropped an oversized frame");
        return Ok(());
    }
    socket.tx.send(Message::text(text)).await.map_err(|_| "the connection's writer stopped".to_owned())
}

/// Sends on the socket itself, before the session splits it (registration).
async fn send_direct(socket: &mut Socket, msg: &AgentMessage) -> Result<(), String> {
    socket.send(Message::text(encode(msg))).await.map_err(|e| e.to_string())
}

/// A catalog update as frames: the first one marked `full` when it is the whole
/// catalog, split to what one frame may carry and kept small
/// ([`CatalogUpdate::frames`]: the broker's buffer for this session stays that size).
fn catalog_frames(batch: CatalogBatch, full: bool) -> Vec<AgentMessage> {
    CatalogUpdate::frames(batch.entries, batch.files, full).into_iter().map(AgentMessage::Catalog).collect()
}

/// The metric's report when its interval is over (or always, when `force`), with
/// the aggregate reset.
fn metric_report(action: &Installed, now_ms: u64, force: bool) -> Option<periscope_protocol::MetricReport> {
    let metric = action.metric.as_ref()?;
    let start = metric.window_start();
    if !force && now_ms.saturating_sub(start) < metric.spec.report_interval_ms.clamp(1_000, 3_600_000) {
        return None;
    }
    Some(metric.take(&action.spec.id, now_ms))
}

/// A log line's findings: the placeholders' own, plus what the first pass redacted in
/// the fields and spans the template reads (so a value redacted before a placeholder
/// transformed it is still reported).
fn line_findings(
    hit: &periscope_protocol::Hit,
    template: &periscope_protocol::Template,
    report: periscope_redaction::Report,
) -> Vec<periscope_protocol::RedactionFinding> {
    let roots = template.roots();
    let mut out: Vec<periscope_protocol::RedactionFinding> =
        report.into_findings().into_iter().map(Into::into).collect();
    for f in &hit.redactions {
        let read = f
            .path
            .strip_prefix("fields.")
            .map(|rest| rest.split(['.', '[']).next().is_some_and(|root| roots.reads_field(root)))
            .unwrap_or_else(|| f.path.starts_with("spans[") && roots.uses_spans());
        if read && !out.contains(f) {
            out.push(f.clone());
        }
    }
    out.truncate(periscope_protocol::hit::MAX_FINDINGS_PER_HIT);
    out
}

/// Reports an evaluation error as the action's status, once per action and kind.
async fn report_eval_error(
    socket: &mut Outbox,
    action: &Installed,
    context: &str,
    error: &periscope_protocol::EvalError,
) -> Result<(), String> {
    match action.eval_error_status(context, error) {
        Some(state) => {
            let update = ActionStatusUpdate { action_id: action.spec.id.clone(), state };
            send(socket, &AgentMessage::ActionStatus(update)).await
        }
        None => Ok(()),
    }
}

/// What to report for an action after installing it.
fn status_of(action: &Installed, callsites: u32, supported: bool, verdict: Option<&Verdict>) -> AgentActionState {
    if let Some(Verdict::Refuse(reason)) = verdict {
        return AgentActionState::Error { reason: reason.clone() };
    }
    if let Some(e) = &action.compile_error {
        return AgentActionState::Error { reason: format!("this agent cannot run the action: {e}") };
    }
    if !action.runnable() || !supported {
        return AgentActionState::Error {
            reason: format!("this agent does not support `{}` actions", action.spec.kind.name()),
        };
    }
    if callsites > 0 { AgentActionState::Installed { callsites } } else { AgentActionState::Pending }
}

/// Full jitter in [d/2, d]: spreads a fleet's reconnects after a broker restart.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() { u16::from_le_bytes(b) } else { 0x8000 };
    let frac = 0.5 + f64::from(r) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(frac)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}
