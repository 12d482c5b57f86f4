//! Durable state: one embedded SQLite database (`periscope.db`) under the data
//! directory holding actions, hits, log lines, metric figures, settings (redaction
//! rules), the audit trail, and the key directory (API and agent keys, organizations,
//! groups, pool assignments), so a broker restart loses none of them (live actions are
//! re-sent to agents when they reconnect).
//!
//! Action data and audit entries go through a channel to one writer thread that batches
//! them into transactions: the async request path never waits on the disk. What agents
//! send is bounded on its way in ([`IngestGate`]): a session reserves room before its
//! hits, lines or figures are taken in, and the room comes back only once the writer has
//! committed them, so a writer that falls behind slows the agents' sessions (and TCP
//! pushes back to the agents, whose own bounded queues drop and count) instead of
//! queuing without bound; nothing acknowledged is ever dropped. Reads of
//! action data happen once, at start, to rebuild the in-memory book. The key directory
//! ([`crate::keys`]) and audit queries ([`crate::audit`]) use connections of their own;
//! WAL mode lets them read while the writer writes, and lets `periscope keys` change
//! keys from another process while the broker runs.
//!
//! Without `--data-dir` the same database lives in a private scratch directory that is
//! removed when the broker stops ([`ScratchDir`]): one code path, nothing survives.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite refused.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A stored row does not decode (written by an incompatible version?).
    #[error("database {path}: a stored {what} does not decode: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which kind of row.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
}

/// The database file inside a data directory.
pub fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

/// Name of the database file in the data directory.
pub const DB_FILE: &str = "periscope.db";

/// How long a connection waits for another one's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the data directory (owner-only on Unix: it holds key hashes and captured
/// values) and opens the database in it, creating or upgrading the schema.
pub fn open_connection(dir: &Path) -> Result<Connection, StoreError> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_owned(), source })?;
    #[cfg(unix)]
    if !existed {
        use std::os::unix::fs::PermissionsExt as _;
        // A directory the operator made beforehand keeps the permissions they chose.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| StoreError::Dir { path: dir.to_owned(), source })?;
    }
    #[cfg(not(unix))]
    let _ = existed;
    let path = db_path(dir);
    let conn = Connection::open(&path).map_err(sqlite(&path))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite(&path))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(sqlite(&path))?;
    conn.execute_batch(SCHEMA).map_err(sqlite(&path))?;
    migrate(&conn).map_err(sqlite(&path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(conn)
}

/// Opens an existing database read-only (audit queries and exports), without
/// touching the schema.
pub fn open_reader(dir: &Path) -> Result<Connection, StoreError> {
    let path = db_path(dir);
    let conn = Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite(&path))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite(&path))?;
    Ok(conn)
}

/// Columns added after the first release, added in place to older databases.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, ddl) in [
        ("actions", "org", "ALTER TABLE actions ADD COLUMN org TEXT NOT NULL DEFAULT 'default'"),
        ("actions", "created_by_key", "ALTER TABLE actions ADD COLUMN created_by_key TEXT NOT NULL DEFAULT ''"),
        ("actions", "reach", "ALTER TABLE actions ADD COLUMN reach TEXT"),
        ("actions", "pools", "ALTER TABLE actions ADD COLUMN pools TEXT"),
        ("keys", "created_by_key", "ALTER TABLE keys ADD COLUMN created_by_key TEXT"),
    ] {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        let columns: Vec<String> = stmt.query_map([table], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(ddl)?;
        }
    }
    Ok(())
}

/// A private directory for a broker started without `--data-dir`, removed when
/// dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh owner-only directory under the system's temporary directory.
    pub fn new() -> Result<ScratchDir, StoreError> {
        let path = std::env::temp_dir().join(format!(
            "periscope-scratch-{}-{}",
            std::process::id(),
            periscope_protocol::ActionId::generate()
        ));
        std::fs::create_dir_all(&path).map_err(|source| StoreError::Dir { path: path.clone(), source })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|source| StoreError::Dir { path: path.clone(), source })?;
        }
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An action row, as the engine persists it (JSON columns keep the schema stable while
/// the wire types grow optional fields).
#[derive(Debug, Clone)]
pub struct ActionRow {
    /// `act_…`.
    pub id: String,
    /// The `ActionSpec` as JSON.
    pub spec: String,
    /// The target as JSON.
    pub target: String,
    /// Who placed it.
    pub created_by: String,
    /// When (Unix ms).
    pub created_at_ms: u64,
    /// `active`, `completed`, `expired`, `removed`.
    pub status: String,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Pending note.
    pub pending_note: Option<String>,
    /// Refused hit count.
    pub hits_refused: u64,
    /// The organization it belongs to.
    pub org: String,
    /// Id of the key that placed it (charged for its live-action quota).
    pub created_by_key: String,
    /// The placing key's reach as JSON (which agents the action may ever reach).
    pub reach: Option<String>,
    /// Pools the action was aimed at or reached, as a JSON array.
    pub pools: Option<String>,
}

/// An audit entry row: indexed columns for the filters, the whole entry as JSON.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// `aud_…`.
    pub id: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The organization it belongs to.
    pub org: String,
    /// Who: a key id, `agent:<id>`, `system` or `cli`.
    pub actor: String,
    /// The actor's name (a key's name).
    pub actor_name: String,
    /// What happened (`action_placed`, `key_revoked`, ...).
    pub kind: String,
    /// The action concerned, if any.
    pub action_id: Option<String>,
    /// The entry as JSON.
    pub body: String,
}

/// A hit row.
#[derive(Debug, Clone)]
pub struct HitRow {
    /// The action.
    pub action_id: String,
    /// Position within the action.
    pub idx: u64,
    /// The `StoredHit` as JSON.
    pub body: String,
    /// When the broker accepted it (Unix ms).
    pub received_at_ms: u64,
}

/// A dynamic log line row.
#[derive(Debug, Clone)]
pub struct LineRow {
    /// The action.
    pub action_id: String,
    /// Position within the action.
    pub idx: u64,
    /// The `StoredLine` as JSON.
    pub body: String,
    /// When the broker accepted it (Unix ms).
    pub received_at_ms: u64,
}

/// An agent identity binding row ([`crate::identity`]).
#[derive(Debug, Clone)]
pub struct IdentityRow {
    /// `agt_…`.
    pub agent_id: String,
    /// The organization of the agent key.
    pub org: String,
    /// The agent key that registered it first.
    pub key_id: String,
    /// The pool it registered into.
    pub pool: String,
    /// When the binding was made (Unix ms).
    pub bound_at_ms: u64,
    /// When the id was last connected (Unix ms).
    pub last_seen_ms: u64,
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Actions.
    pub actions: Vec<ActionRow>,
    /// Hits.
    pub hits: Vec<HitRow>,
    /// Log lines (the newest per action, up to the in-memory bound).
    pub lines: Vec<LineRow>,
    /// Metric figures: action id and `MetricData` as JSON.
    pub metrics: Vec<(String, String)>,
    /// Settings changed at run time (redaction rules), by key, as JSON.
    pub settings: Vec<(String, String)>,
    /// Agent identity bindings.
    pub identities: Vec<IdentityRow>,
}

enum Op {
    Action(ActionRow),
    Hit(HitRow),
    Line(LineRow),
    Metric(String, String),
    Setting(String, String),
    Audit(AuditRow),
    DeleteAction(String),
    Identity(IdentityRow),
    DeleteIdentity(String),
    PurgeBefore(u64),
    PurgeAuditBefore(u64),
    Flush(mpsc::Sender<()>),
    /// Room reserved by an agent session, given back once what it queued is committed.
    Release(IngestPermit),
    Stop,
}

/// The writer's queue: its ops in order, counted as they are sent, and how many of them
/// the writer has committed. A barrier is then a number to wait for, not a message: it
/// costs nothing when what was queued before it is already committed, and otherwise
/// waits for the commit already under way rather than for one more of its own.
#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<Op>,
    progress: Arc<Progress>,
}

struct Progress {
    /// Ops sent to the writer, counted before each is sent: when a barrier reads `n`,
    /// every op sent before it is among the first `n` the writer receives (the channel
    /// is first in, first out).
    queued: AtomicU64,
    /// Ops the writer has taken out of the channel and committed (or failed to write,
    /// and logged), published after each batch; `u64::MAX` once the writer is gone.
    committed: tokio::sync::watch::Sender<u64>,
}

impl Queue {
    fn new() -> (Queue, mpsc::Receiver<Op>, Arc<Progress>) {
        let (tx, rx) = mpsc::channel();
        let progress = Arc::new(Progress { queued: AtomicU64::new(0), committed: tokio::sync::watch::Sender::new(0) });
        (Queue { tx, progress: progress.clone() }, rx, progress)
    }

    /// Queues an op; `Err` once the writer is gone (the op is dropped).
    fn send(&self, op: Op) -> Result<(), Stopped> {
        self.progress.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(op).map_err(|_| Stopped)
    }
}

/// The writer thread has ended.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("queued", &self.progress.queued.load(Ordering::Relaxed)).finish()
    }
}

/// Releases every barrier when the writer ends, however it ends (nothing more will be
/// committed to wait for).
struct WriterGone(Arc<Progress>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.committed.send_replace(u64::MAX);
    }
}

/// Room the store keeps for what agents send by default: 64 MiB of frames queued for
/// the writer and not yet committed.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;

/// What one hit, line or metric report may add to its frame's bytes once stored (the
/// ids, name and times the broker adds), reserved with the frame.
pub const ROW_ALLOWANCE: usize = 512;

/// The bound on what agents' sessions have queued for the writer: each reserves room
/// for a frame's rows before taking them in and gets it back after the writer commits
/// them. Also counts what is queued, for `/metrics`.
#[derive(Debug)]
pub struct IngestGate {
    room: Arc<tokio::sync::Semaphore>,
    capacity: u32,
    /// Row bytes (hits, lines, figures) queued and not committed.
    queued_bytes: AtomicU64,
    /// Rows queued and not committed.
    queued_rows: AtomicU64,
    /// The most row bytes queued at once.
    peak_bytes: AtomicU64,
    /// Reservations that had to wait for the writer.
    waits: AtomicU64,
}

/// Room reserved in the [`IngestGate`]; give it to [`StoreHandle::release_after_commit`]
/// once the rows it covers are queued.
#[derive(Debug)]
pub struct IngestPermit {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What the writer's queue holds right now, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Row bytes queued and not committed.
    pub bytes: u64,
    /// Rows queued and not committed.
    pub rows: u64,
    /// The most row bytes queued at once since the start.
    pub peak_bytes: u64,
    /// Reservations that waited for the writer to commit.
    pub waits: u64,
    /// The bound on reserved room, in bytes.
    pub capacity: u64,
}

impl IngestGate {
    fn new(capacity: u64) -> IngestGate {
        let capacity = u32::try_from(capacity.max(64 * 1024)).unwrap_or(u32::MAX);
        IngestGate {
            room: Arc::new(tokio::sync::Semaphore::new(capacity as usize)),
            capacity,
            queued_bytes: AtomicU64::new(0),
            queued_rows: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    fn queued(&self, bytes: usize) {
        let now = self.queued_bytes.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.queued_rows.fetch_add(1, Ordering::Relaxed);
        self.peak_bytes.fetch_max(now, Ordering::Relaxed);
    }

    fn committed(&self, bytes: u64, rows: u64) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.queued_rows.fetch_sub(rows, Ordering::Relaxed);
    }
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Store {
    tx: Queue,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
    gate: Arc<IngestGate>,
    checkpointer: Option<Checkpointer>,
}

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The WAL's size is cut back to this after a checkpoint that emptied it (it otherwise
/// stays at its largest).
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Copies the WAL into the database on its own thread and connection. In WAL mode with
/// `synchronous = NORMAL` a commit does not sync; a checkpoint does (the database file,
/// then the WAL header). Left to SQLite's automatic checkpoints, that happens on the
/// writer thread inside a commit every 1,000 pages, and every write queued behind it
/// (hits, lines, audit entries a caller waits on) waits for the disk. Here the writer
/// never checkpoints; a `PASSIVE` checkpoint on a second connection runs beside it and
/// never blocks it (it copies what no reader still needs, and the writer starts the WAL
/// over once a checkpoint has caught up).
#[derive(Debug)]
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path).map_err(sqlite(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite(path))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let at = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("periscope-checkpoint".into())
            .spawn(move || {
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(CHECKPOINT_EVERY),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    );
                    // A checkpoint that finds the database busy is tried again at the
                    // next tick.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(db = %at.display(), error = %e, "checkpointing the store's WAL failed");
                    }
                    if last {
                        return;
                    }
                }
            })
            .map_err(|source| StoreError::Dir { path: path.to_owned(), source })?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops after one last checkpoint (the writer has stopped by then).
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Action(_) => "Action",
            Op::Hit(_) => "Hit",
            Op::Line(_) => "Line",
            Op::Metric(..) => "Metric",
            Op::Setting(..) => "Setting",
            Op::Audit(_) => "Audit",
            Op::DeleteAction(_) => "DeleteAction",
            Op::Identity(_) => "Identity",
            Op::DeleteIdentity(_) => "DeleteIdentity",
            Op::PurgeBefore(_) => "PurgeBefore",
            Op::PurgeAuditBefore(_) => "PurgeAuditBefore",
            Op::Flush(_) => "Flush",
            Op::Release(_) => "Release",
            Op::Stop => "Stop",
        })
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS actions (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    target TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    ended_at_ms INTEGER,
    end_reason TEXT,
    pending_note TEXT,
    hits_refused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS hits (
    action_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (action_id, idx)
);
CREATE INDEX IF NOT EXISTS hits_received ON hits (received_at_ms);
CREATE TABLE IF NOT EXISTS log_lines (
    action_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (action_id, idx)
);
CREATE INDEX IF NOT EXISTS log_lines_received ON log_lines (received_at_ms);
CREATE TABLE IF NOT EXISTS metrics (
    action_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orgs (
    name TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (org, name)
);
CREATE TABLE IF NOT EXISTS pools (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    grp TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (org, name)
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    org TEXT NOT NULL,
    role TEXT,
    grp TEXT,
    scopes TEXT,
    pools TEXT,
    quotas TEXT,
    hint TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER,
    revoked_by TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    at_ms INTEGER NOT NULL,
    org TEXT NOT NULL,
    actor TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    action_id TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_org_seq ON audit (org, seq);
CREATE TABLE IF NOT EXISTS agent_identities (
    agent_id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    key_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    bound_at_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms);
";

pub(crate) fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

/// A `u64` as SQLite stores it (saturating).
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer back as `u64` (negative values read as 0).
pub fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) `periscope.db` in `dir`; returns the store and what
    /// it holds.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        Store::open_with(dir, DEFAULT_MAX_QUEUED_BYTES)
    }

    /// [`Store::open`], with room for `max_queued_bytes` of agents' frames queued for the
    /// writer ([`IngestGate`]).
    pub fn open_with(dir: &Path, max_queued_bytes: u64) -> Result<(Store, Loaded), StoreError> {
        let conn = open_connection(dir)?;
        let path = db_path(dir);
        // The writer never checkpoints (see [`Checkpointer`]).
        conn.execute_batch(&format!("PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"))
            .map_err(sqlite(&path))?;
        let loaded = Loaded {
            actions: load_actions(&conn).map_err(sqlite(&path))?,
            hits: load_hits(&conn).map_err(sqlite(&path))?,
            lines: load_lines(&conn).map_err(sqlite(&path))?,
            metrics: load_metrics(&conn).map_err(sqlite(&path))?,
            settings: load_settings(&conn).map_err(sqlite(&path))?,
            identities: load_identities(&conn).map_err(sqlite(&path))?,
        };
        let (tx, rx, progress) = Queue::new();
        let writer_path = path.clone();
        let gate = Arc::new(IngestGate::new(max_queued_bytes));
        let writer_gate = Arc::clone(&gate);
        let thread = std::thread::Builder::new()
            .name("periscope-store".into())
            .spawn(move || writer(conn, rx, &writer_path, &writer_gate, &progress))
            .map_err(|source| StoreError::Dir { path: dir.to_owned(), source })?;
        let checkpointer = Checkpointer::start(&path)?;
        Ok((Store { tx, path, thread: Some(thread), gate, checkpointer: Some(checkpointer) }, loaded))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle every part of the broker writes through (the same writer thread).
    pub fn handle(&self) -> StoreHandle {
        StoreHandle { tx: self.tx.clone(), gate: Arc::clone(&self.gate) }
    }

    /// Waits until every write queued so far is on disk.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.handle().flush(timeout)
    }
}

/// A cloneable way to write through the store's writer thread: actions and their data,
/// settings, identities and audit entries, batched into transactions off the request
/// path.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: Queue,
    gate: Arc<IngestGate>,
}

impl StoreHandle {
    /// Reserves room for rows an agent's session is about to take in (`bytes` of frames
    /// holding `items` hits, lines or reports): waits while the writer has that much
    /// reserved and not yet committed. Hand the permit back with
    /// [`StoreHandle::release_after_commit`] once the rows are queued.
    pub fn reserve(
        &self,
        bytes: usize,
        items: usize,
    ) -> impl std::future::Future<Output = IngestPermit> + Send + 'static {
        let gate = Arc::clone(&self.gate);
        let want = bytes.saturating_add(items.saturating_mul(ROW_ALLOWANCE));
        // One frame never waits for more room than there is.
        let want = u32::try_from(want).unwrap_or(u32::MAX).clamp(1, gate.capacity);
        async move {
            let permit = match Arc::clone(&gate.room).try_acquire_many_owned(want) {
                Ok(p) => Ok(p),
                Err(tokio::sync::TryAcquireError::Closed) => return IngestPermit { _permit: None },
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    gate.waits.fetch_add(1, Ordering::Relaxed);
                    Arc::clone(&gate.room).acquire_many_owned(want).await
                }
            };
            IngestPermit { _permit: permit.ok() }
        }
    }

    /// Gives reserved room back once everything queued before this call is committed.
    pub fn release_after_commit(&self, permit: IngestPermit) {
        // A stopped writer drops the op, and with it the permit: nothing waits on a
        // store that is gone.
        let _ = self.tx.send(Op::Release(permit));
    }

    /// What the writer's queue holds.
    pub fn queue_stats(&self) -> QueueStats {
        let g = &self.gate;
        QueueStats {
            bytes: g.queued_bytes.load(Ordering::Relaxed),
            rows: g.queued_rows.load(Ordering::Relaxed),
            peak_bytes: g.peak_bytes.load(Ordering::Relaxed),
            waits: g.waits.load(Ordering::Relaxed),
            capacity: u64::from(g.capacity),
        }
    }

    /// Appends an audit entry.
    pub fn put_audit(&self, row: AuditRow) {
        let _ = self.tx.send(Op::Audit(row));
    }

    /// Deletes audit entries older than `cutoff_ms` (retention).
    pub fn purge_audit_before(&self, cutoff_ms: u64) {
        let _ = self.tx.send(Op::PurgeAuditBefore(cutoff_ms));
    }

    /// Persists an action (insert or update).
    pub fn put_action(&self, row: ActionRow) {
        let _ = self.tx.send(Op::Action(row));
    }

    /// Persists a hit.
    pub fn put_hit(&self, row: HitRow) {
        self.gate.queued(row.body.len());
        let _ = self.tx.send(Op::Hit(row));
    }

    /// Persists a log line.
    pub fn put_line(&self, row: LineRow) {
        self.gate.queued(row.body.len());
        let _ = self.tx.send(Op::Line(row));
    }

    /// Persists a metric's figures (replacing the previous ones).
    pub fn put_metric(&self, action_id: &str, body: String) {
        self.gate.queued(body.len());
        let _ = self.tx.send(Op::Metric(action_id.to_owned(), body));
    }

    /// Persists a setting changed at run time.
    pub fn put_setting(&self, key: &str, value: String) {
        let _ = self.tx.send(Op::Setting(key.to_owned(), value));
    }

    /// Forgets an action and its hits.
    pub fn delete_action(&self, id: &str) {
        let _ = self.tx.send(Op::DeleteAction(id.to_owned()));
    }

    /// Deletes ended actions that ended before `cutoff_ms` with their hits, lines and
    /// figures, and rows of actions no longer stored.
    pub fn purge_before(&self, cutoff_ms: u64) {
        let _ = self.tx.send(Op::PurgeBefore(cutoff_ms));
    }

    /// Waits until every write queued so far is on disk.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = mpsc::channel();
        if self.tx.send(Op::Flush(done_tx)).is_err() {
            return false;
        }
        done_rx.recv_timeout(timeout).is_ok()
    }

    /// Resolves once every write queued before the call is committed to the database
    /// (in SQLite's WAL, which survives the broker being killed: `synchronous = NORMAL`
    /// leaves only an operating-system crash or power loss to lose the last commits).
    /// Callers are told something is stored only after this: the writer batches, so
    /// concurrent barriers share one commit, and the request path never blocks a thread.
    pub fn barrier(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let target = self.tx.progress.queued.load(Ordering::SeqCst);
        let mut committed = self.tx.progress.committed.subscribe();
        async move {
            // Ends at once when the writer is already past `target`; an error means the
            // writer is gone (nothing left to wait for).
            let _ = committed.wait_for(|&done| done >= target).await;
        }
    }

    /// Persists an identity binding (insert, or a new last-seen time).
    pub fn put_identity(&self, row: IdentityRow) {
        let _ = self.tx.send(Op::Identity(row));
    }

    /// Forgets an identity binding.
    pub fn delete_identity(&self, agent_id: &str) {
        let _ = self.tx.send(Op::DeleteIdentity(agent_id.to_owned()));
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.flush(Duration::from_secs(5));
        // Handles may outlive the store (and keep the channel open): the writer is told
        // to stop; what they send afterwards is dropped.
        let _ = self.tx.send(Op::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
    }
}

fn load_actions(conn: &Connection) -> rusqlite::Result<Vec<ActionRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, spec, target, created_by, created_at_ms, status, ended_at_ms, end_reason, pending_note, \
         hits_refused, org, created_by_key, reach, pools FROM actions ORDER BY created_at_ms",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ActionRow {
            id: r.get(0)?,
            spec: r.get(1)?,
            target: r.get(2)?,
            created_by: r.get(3)?,
            created_at_ms: to_u64(r.get(4)?),
            status: r.get(5)?,
            ended_at_ms: r.get::<_, Option<i64>>(6)?.map(to_u64),
            end_reason: r.get(7)?,
            pending_note: r.get(8)?,
            hits_refused: to_u64(r.get(9)?),
            org: r.get(10)?,
            created_by_key: r.get(11)?,
            reach: r.get(12)?,
            pools: r.get(13)?,
        })
    })?;
    rows.collect()
}

fn load_hits(conn: &Connection) -> rusqlite::Result<Vec<HitRow>> {
    let mut stmt = conn.prepare("SELECT action_id, idx, body, received_at_ms FROM hits ORDER BY action_id, idx")?;
    let rows = stmt.query_map([], |r| {
        Ok(HitRow { action_id: r.get(0)?, idx: to_u64(r.get(1)?), body: r.get(2)?, received_at_ms: to_u64(r.get(3)?) })
    })?;
    rows.collect()
}

fn load_lines(conn: &Connection) -> rusqlite::Result<Vec<LineRow>> {
    // Only the newest lines of each action come back into memory.
    let mut stmt = conn.prepare(
        "SELECT action_id, idx, body, received_at_ms FROM log_lines l WHERE idx > \
         (SELECT COALESCE(MAX(idx), 0) FROM log_lines m WHERE m.action_id = l.action_id) - ?1 \
         ORDER BY action_id, idx",
    )?;
    let keep = i64::try_from(crate::telemetry::MAX_STORED_LINES).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![keep], |r| {
        Ok(LineRow { action_id: r.get(0)?, idx: to_u64(r.get(1)?), body: r.get(2)?, received_at_ms: to_u64(r.get(3)?) })
    })?;
    rows.collect()
}

fn load_identities(conn: &Connection) -> rusqlite::Result<Vec<IdentityRow>> {
    let mut stmt =
        conn.prepare("SELECT agent_id, org, key_id, pool, bound_at_ms, last_seen_ms FROM agent_identities")?;
    let rows = stmt.query_map([], |r| {
        Ok(IdentityRow {
            agent_id: r.get(0)?,
            org: r.get(1)?,
            key_id: r.get(2)?,
            pool: r.get(3)?,
            bound_at_ms: to_u64(r.get(4)?),
            last_seen_ms: to_u64(r.get(5)?),
        })
    })?;
    rows.collect()
}

fn load_settings(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare("SELECT key, value FROM settings")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn load_metrics(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare("SELECT action_id, body FROM metrics")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Who waits for a batch to be committed.
enum Done {
    Blocking(mpsc::Sender<()>),
    Release(IngestPermit),
}

/// The statements rows come in by, at tens of thousands a second: prepared once per
/// batch, not once per row.
#[derive(Clone, Copy)]
enum Stmt {
    Hit,
    Line,
    Metric,
    Audit,
}

impl Stmt {
    const ALL: usize = 4;

    fn sql(self) -> &'static str {
        match self {
            Stmt::Hit => "INSERT OR REPLACE INTO hits (action_id, idx, body, received_at_ms) VALUES (?1, ?2, ?3, ?4)",
            Stmt::Line => {
                "INSERT OR REPLACE INTO log_lines (action_id, idx, body, received_at_ms) VALUES (?1, ?2, ?3, ?4)"
            }
            Stmt::Metric => {
                "INSERT INTO metrics (action_id, body) VALUES (?1, ?2) ON CONFLICT(action_id) DO UPDATE SET body = ?2"
            }
            Stmt::Audit => {
                "INSERT OR IGNORE INTO audit (id, at_ms, org, actor, actor_name, kind, action_id, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            }
        }
    }
}

/// What one batch holds, settled once it is committed.
struct Batch<'tx> {
    done: Vec<Done>,
    /// Row bytes and rows of hits, lines and figures (the [`IngestGate`]'s count).
    row_bytes: u64,
    rows: u64,
    stmts: [Option<rusqlite::Statement<'tx>>; Stmt::ALL],
}

impl<'tx> Batch<'tx> {
    fn new() -> Batch<'tx> {
        Batch { done: Vec::new(), row_bytes: 0, rows: 0, stmts: [None, None, None, None] }
    }

    fn row(&mut self, bytes: usize) {
        self.row_bytes += bytes as u64;
        self.rows += 1;
    }

    fn stmt(
        &mut self,
        tx: &'tx rusqlite::Transaction<'_>,
        which: Stmt,
    ) -> rusqlite::Result<&mut rusqlite::Statement<'tx>> {
        let slot = &mut self.stmts[which as usize];
        if slot.is_none() {
            *slot = Some(tx.prepare(which.sql())?);
        }
        slot.as_mut().ok_or(rusqlite::Error::InvalidQuery)
    }
}

fn apply<'tx>(tx: &'tx rusqlite::Transaction<'_>, op: Op, batch: &mut Batch<'tx>) -> rusqlite::Result<()> {
    match op {
        Op::Action(a) => {
            tx.execute(
                "INSERT INTO actions (id, spec, target, created_by, created_at_ms, status, ended_at_ms, end_reason, \
                 pending_note, hits_refused, org, created_by_key, reach, pools) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
                 ON CONFLICT(id) DO UPDATE SET spec = ?2, target = ?3, status = ?6, ended_at_ms = ?7, \
                 end_reason = ?8, pending_note = ?9, hits_refused = ?10, pools = ?14",
                params![
                    a.id,
                    a.spec,
                    a.target,
                    a.created_by,
                    to_i64(a.created_at_ms),
                    a.status,
                    a.ended_at_ms.map(to_i64),
                    a.end_reason,
                    a.pending_note,
                    to_i64(a.hits_refused),
                    a.org,
                    a.created_by_key,
                    a.reach,
                    a.pools
                ],
            )?;
        }
        // Rows agents send come in at tens of thousands a second: their statements are
        // prepared once per connection, not per row.
        Op::Hit(h) => {
            batch.row(h.body.len());
            batch.stmt(tx, Stmt::Hit)?.execute(params![
                h.action_id,
                to_i64(h.idx),
                h.body,
                to_i64(h.received_at_ms)
            ])?;
        }
        Op::Line(l) => {
            batch.row(l.body.len());
            batch.stmt(tx, Stmt::Line)?.execute(params![
                l.action_id,
                to_i64(l.idx),
                l.body,
                to_i64(l.received_at_ms)
            ])?;
        }
        Op::Metric(id, body) => {
            batch.row(body.len());
            batch.stmt(tx, Stmt::Metric)?.execute(params![id, body])?;
        }
        Op::Setting(key, value) => {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, value],
            )?;
        }
        Op::Audit(a) => {
            batch.stmt(tx, Stmt::Audit)?.execute(params![
                a.id,
                to_i64(a.at_ms),
                a.org,
                a.actor,
                a.actor_name,
                a.kind,
                a.action_id,
                a.body
            ])?;
        }
        Op::PurgeAuditBefore(cutoff) => {
            tx.execute("DELETE FROM audit WHERE at_ms < ?1", params![to_i64(cutoff)])?;
        }
        Op::DeleteAction(id) => {
            tx.execute("DELETE FROM log_lines WHERE action_id = ?1", params![id])?;
            tx.execute("DELETE FROM metrics WHERE action_id = ?1", params![id])?;
            tx.execute("DELETE FROM hits WHERE action_id = ?1", params![id])?;
            tx.execute("DELETE FROM actions WHERE id = ?1", params![id])?;
        }
        Op::Identity(i) => {
            tx.execute(
                "INSERT INTO agent_identities (agent_id, org, key_id, pool, bound_at_ms, last_seen_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(agent_id) DO UPDATE SET last_seen_ms = ?6",
                params![i.agent_id, i.org, i.key_id, i.pool, to_i64(i.bound_at_ms), to_i64(i.last_seen_ms)],
            )?;
        }
        Op::DeleteIdentity(id) => {
            tx.execute("DELETE FROM agent_identities WHERE agent_id = ?1", params![id])?;
        }
        Op::PurgeBefore(cutoff) => {
            // The engine forgets ended actions by the time they ended and deletes each
            // one it forgets; this sweeps what it no longer holds (rows of an older
            // version, rows left by a crash between two writes).
            let cutoff = to_i64(cutoff);
            let ended =
                "SELECT id FROM actions WHERE status != 'active' AND ended_at_ms IS NOT NULL AND ended_at_ms < ?1";
            for table in ["hits", "log_lines", "metrics"] {
                tx.execute(&format!("DELETE FROM {table} WHERE action_id IN ({ended})"), params![cutoff])?;
                tx.execute(&format!("DELETE FROM {table} WHERE action_id NOT IN (SELECT id FROM actions)"), [])?;
            }
            tx.execute(
                "DELETE FROM actions WHERE status != 'active' AND ended_at_ms IS NOT NULL AND ended_at_ms < ?1",
                params![cutoff],
            )?;
        }
        Op::Flush(done) => batch.done.push(Done::Blocking(done)),
        Op::Release(permit) => batch.done.push(Done::Release(permit)),
        // Handled by the writer loop.
        Op::Stop => {}
    }
    Ok(())
}

/// Batches whatever is queued into one transaction per wake-up.
fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>, path: &Path, gate: &IngestGate, progress: &Arc<Progress>) {
    let _gone = WriterGone(progress.clone());
    let mut stop = false;
    // Ops taken out of the channel so far, whatever became of them.
    let mut taken: u64 = 0;
    while !stop && let Ok(first) = rx.recv() {
        let mut done = Vec::new();
        let (mut row_bytes, mut rows) = (0, 0);
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            let applied = {
                let mut batch = Batch::new();
                let mut applied = Ok(());
                let mut next = Some(first);
                let mut n = 0;
                while let Some(op) = next.take() {
                    taken += 1;
                    if matches!(op, Op::Stop) {
                        stop = true;
                        break;
                    }
                    if let Err(e) = apply(&tx, op, &mut batch) {
                        applied = Err(e);
                        break;
                    }
                    n += 1;
                    if n < 1_000 {
                        next = rx.try_recv().ok();
                    }
                }
                (done, row_bytes, rows) = (std::mem::take(&mut batch.done), batch.row_bytes, batch.rows);
                applied
            };
            applied?;
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(db = %path.display(), error = %e, "writing to the store failed");
        }
        // Only once the batch is committed (or failed, and was logged): a barrier
        // promises nothing queued before it is still only in memory, and reserved room
        // comes back only when what it covered has left the queue.
        gate.committed(row_bytes, rows);
        progress.committed.send_replace(taken);
        for done in done {
            match done {
                Done::Blocking(tx) => {
                    let _ = tx.send(());
                }
                Done::Release(permit) => drop(permit),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: &str) -> ActionRow {
        ActionRow {
            id: id.into(),
            spec: "{}".into(),
            target: "{}".into(),
            created_by: "me".into(),
            created_at_ms: 1,
            status: status.into(),
            ended_at_ms: None,
            end_reason: None,
            pending_note: None,
            hits_refused: 0,
            org: "default".into(),
            created_by_key: "key_x".into(),
            reach: None,
            pools: None,
        }
    }

    #[test]
    fn what_is_written_is_there_after_reopening() {
        let dir = std::env::temp_dir().join(format!("periscope-store-{}", periscope_protocol::ActionId::generate()));
        {
            let (owner, loaded) = Store::open(&dir).unwrap();
            let store = owner.handle();
            assert!(loaded.actions.is_empty() && loaded.hits.is_empty());
            store.put_action(row("act_a", "active"));
            store.put_action(row("act_b", "active"));
            store.put_hit(HitRow { action_id: "act_a".into(), idx: 1, body: "{}".into(), received_at_ms: 5 });
            store.put_action(ActionRow { status: "completed".into(), ..row("act_a", "x") });
            store.delete_action("act_b");
            assert!(store.flush(Duration::from_secs(5)));
        }
        let (_store, loaded) = Store::open(&dir).unwrap();
        assert_eq!(loaded.actions.len(), 1);
        assert_eq!(loaded.actions[0].status, "completed");
        assert_eq!(loaded.hits.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_reach_the_database_file_through_the_checkpointer_not_the_writer() {
        let dir = std::env::temp_dir().join(format!("periscope-store-{}", periscope_protocol::ActionId::generate()));
        let (owner, _) = Store::open(&dir).unwrap();
        let store = owner.handle();
        let db = db_path(&dir);
        let before = std::fs::metadata(&db).unwrap().len();
        // About 4 MiB: far past SQLite's automatic checkpoint (1,000 pages), which the
        // writer's connection no longer runs.
        for i in 0..2_000 {
            store.put_line(LineRow { action_id: "act_a".into(), idx: i, body: "y".repeat(2_000), received_at_ms: 5 });
        }
        assert!(store.flush(Duration::from_secs(10)));
        let wal = dir.join(format!("{DB_FILE}-wal"));
        assert!(std::fs::metadata(&wal).unwrap().len() > 0, "the rows went to the WAL first");
        // The checkpointer copies them into the database file on its own thread.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&db).unwrap().len() < before + 3_000_000 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint copied the rows into {}", db.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(owner);
        let (_owner, loaded) = Store::open(&dir).unwrap();
        assert_eq!(loaded.lines.len(), 2_000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn line(idx: u64) -> LineRow {
        LineRow { action_id: "act_a".into(), idx, body: "x".repeat(200), received_at_ms: 5 }
    }

    #[tokio::test]
    async fn room_for_agents_rows_comes_back_only_once_the_writer_committed_them() {
        use futures_util::FutureExt as _;
        let dir = std::env::temp_dir().join(format!("periscope-store-{}", periscope_protocol::ActionId::generate()));
        let (owner, _) = Store::open_with(&dir, 64 * 1024).unwrap();
        let store = owner.handle();
        // One session holds all the room: the next one waits, however small.
        let all = store.reserve(1 << 30, 0).await;
        let mut next = Box::pin(store.reserve(100, 1));
        assert!(next.as_mut().now_or_never().is_none(), "no room while it is all reserved");
        for i in 0..100 {
            store.put_line(line(i));
        }
        assert!(next.as_mut().now_or_never().is_none(), "queued rows alone give no room back");
        store.release_after_commit(all);
        let permit = tokio::time::timeout(Duration::from_secs(10), next).await.expect("room once committed");
        // Everything queued before the room came back was committed by then.
        let q = store.queue_stats();
        assert_eq!((q.rows, q.bytes), (0, 0), "{q:?}");
        // The writer commits while rows are still being queued: the peak is some of them.
        assert!(q.peak_bytes > 0 && q.peak_bytes <= 100 * 200, "{q:?}");
        assert_eq!(q.waits, 1);
        assert_eq!(q.capacity, 64 * 1024);
        store.release_after_commit(permit);
        drop(owner);
        let (_owner, loaded) = Store::open(&dir).unwrap();
        assert_eq!(loaded.lines.len(), 100, "nothing queued was dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
