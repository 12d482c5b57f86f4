//! Rebuilding the single-node backend from the database at start: actions with their
//! hits, newest lines and figures, in the order they were placed (so a retention bound
//! lowered since they were written forgets the oldest of whoever holds the most).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use periscope_protocol::{ActionId, ActionSpec};

use super::Engine;
use super::model::{ActionRecord, ActionStatus, StoredHit, Target};
use crate::auth::Reach;
use crate::backend::local::actions::Restored;
use crate::backend::local::{LocalEvents, MemoryActions, SqliteAudit, SqliteRules};
use crate::store::{Loaded, Store, StoreError};
use crate::telemetry::{MetricData, StoredLine};

impl Engine {
    /// Makes the engine durable on the single-node backend: loads what `store` holds and
    /// writes every change to it (actions, hits, lines, figures, audit entries, rules).
    pub fn with_store(
        self,
        store: &Store,
        dir: std::path::PathBuf,
        loaded: Loaded,
        max_ended: usize,
    ) -> Result<Self, StoreError> {
        let Loaded { actions, hits, lines, metrics, settings, identities: _ } = loaded;
        let corrupt =
            |what: &'static str, detail: String| StoreError::Corrupt { path: store.path().to_owned(), what, detail };
        let mut restored: Vec<Restored> = Vec::with_capacity(actions.len());
        let mut index: HashMap<ActionId, usize> = HashMap::new();
        for row in actions {
            let spec: ActionSpec = serde_json::from_str(&row.spec).map_err(|e| corrupt("action", e.to_string()))?;
            let target: Target = serde_json::from_str(&row.target).map_err(|e| corrupt("target", e.to_string()))?;
            let status =
                ActionStatus::parse(&row.status).ok_or_else(|| corrupt("action status", row.status.clone()))?;
            let reach = match row.reach.as_deref() {
                Some(r) => serde_json::from_str(r).map_err(|e| corrupt("action reach", e.to_string()))?,
                None => Reach::org(row.org.clone()),
            };
            let mut pools: BTreeSet<String> =
                row.pools.as_deref().and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default();
            pools.extend(target.pool.clone());
            let record = ActionRecord {
                spec,
                target,
                org: row.org,
                reach,
                pools,
                created_by: row.created_by,
                created_by_key: row.created_by_key,
                created_at_ms: row.created_at_ms,
                pending_note: row.pending_note,
                status,
                ended_at_ms: row.ended_at_ms,
                end_reason: row.end_reason,
                agents: BTreeMap::new(),
                hits: 0,
                hits_refused: row.hits_refused,
                lines: 0,
                rules_fired: BTreeMap::new(),
                pauses: BTreeMap::new(),
                pause_last_ms: BTreeMap::new(),
                dropped: Default::default(),
                redacted_reads: 0,
            };
            index.insert(record.spec.id.clone(), restored.len());
            restored.push(Restored { record, hits: Vec::new(), lines: Vec::new(), metric: None });
        }
        let slot = |raw: &str| ActionId::parse(raw).ok().and_then(|id| index.get(&id).copied());
        for row in lines {
            let line: StoredLine = serde_json::from_str(&row.body).map_err(|e| corrupt("log line", e.to_string()))?;
            if let Some(i) = slot(&row.action_id) {
                let r = &mut restored[i];
                for f in &line.line.redactions {
                    *r.record.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
                }
                r.lines.push(line);
            }
        }
        for (id, body) in metrics {
            let data: MetricData = serde_json::from_str(&body).map_err(|e| corrupt("metric", e.to_string()))?;
            if let Some(i) = slot(&id) {
                restored[i].metric = Some(data);
            }
        }
        for row in hits {
            let hit: StoredHit = serde_json::from_str(&row.body).map_err(|e| corrupt("hit", e.to_string()))?;
            if let Some(i) = slot(&row.action_id) {
                let r = &mut restored[i];
                for f in &hit.hit.redactions {
                    *r.record.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
                }
                r.hits.push(hit);
            }
        }
        for r in &mut restored {
            r.hits.sort_by_key(|h| h.index);
            r.lines.sort_by_key(|l| l.index);
        }
        let handle = store.handle();
        let (actions, forgotten) = MemoryActions::restored(max_ended, Some(handle.clone()), restored);
        tracing::info!(
            actions = actions.len(),
            live = actions.live_len(),
            forgotten = forgotten.len(),
            db = %store.path().display(),
            "restored actions from the store"
        );
        let mut engine = self
            .with_backend(Arc::new(actions), Arc::new(LocalEvents::default()))
            .with_audit(Arc::new(SqliteAudit::new(handle.clone(), dir)))
            .with_rule_store(Arc::new(SqliteRules::new(Some(handle.clone()), settings)));
        engine.durable = Some(handle);
        Ok(engine)
    }
}
