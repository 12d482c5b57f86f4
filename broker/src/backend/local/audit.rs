//! The audit trail in SQLite: entries go through the store's writer thread (batched,
//! never on the request path); reads open a read-only connection of their own after
//! what was queued is written.

use std::path::PathBuf;

use futures_util::FutureExt as _;

use crate::audit::{self, AuditEntry, AuditPage, AuditQuery};
use crate::backend::{AuditReader, AuditSink, BackendError, BackendFuture};
use crate::store::StoreHandle;

/// The single-node [`AuditSink`] and [`AuditReader`].
#[derive(Debug, Clone)]
pub struct SqliteAudit {
    store: StoreHandle,
    dir: PathBuf,
}

impl SqliteAudit {
    /// The audit trail of the database in `dir`, written through `store`.
    pub fn new(store: StoreHandle, dir: PathBuf) -> SqliteAudit {
        SqliteAudit { store, dir }
    }
}

impl AuditSink for SqliteAudit {
    fn append(&self, entry: AuditEntry) {
        self.store.put_audit(entry.row());
    }

    fn purge_before(&self, cutoff_ms: u64) {
        self.store.purge_audit_before(cutoff_ms);
    }
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("reading the audit trail: {e}"))
}

impl AuditReader for SqliteAudit {
    fn page(&self, q: AuditQuery) -> BackendFuture<'_, AuditPage> {
        let (store, dir) = (self.store.clone(), self.dir.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                store.flush(std::time::Duration::from_secs(5));
                let conn = crate::store::open_reader(&dir).map_err(failed)?;
                audit::query(&conn, &q).map_err(failed)
            })
            .await
            .map_err(failed)?
        }
        .boxed()
    }

    fn export(&self, q: AuditQuery, out: tokio::sync::mpsc::Sender<Vec<u8>>) -> BackendFuture<'_, u64> {
        let (store, dir) = (self.store.clone(), self.dir.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                store.flush(std::time::Duration::from_secs(5));
                let conn = crate::store::open_reader(&dir).map_err(failed)?;
                let mut chunk = Vec::with_capacity(64 * 1024);
                let result = audit::export(&conn, &q, |line| {
                    chunk.extend_from_slice(line.as_bytes());
                    if chunk.len() >= 64 * 1024 {
                        // The reader went away: stop reading.
                        out.blocking_send(std::mem::take(&mut chunk)).map_err(|_| ())?;
                    }
                    Ok::<(), ()>(())
                });
                match result {
                    Ok(n) => {
                        if !chunk.is_empty() {
                            let _ = out.blocking_send(chunk);
                        }
                        Ok(n)
                    }
                    Err(audit::ExportError::Sqlite(e)) => Err(failed(e)),
                    Err(_) => Ok(0),
                }
            })
            .await
            .map_err(failed)?
        }
        .boxed()
    }
}
