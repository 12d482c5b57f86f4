//! The single-node action store: every action in one map behind a mutex (held for
//! microseconds, never across an `.await`), indexes that answer without scans (live
//! actions by expiry, key and organization: [`LiveIndex`]; ended actions per
//! organization, fair per key: [`Retention`]), and every change written behind to
//! SQLite through the store's writer thread, so a restart loses nothing.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use futures_util::FutureExt as _;
use periscope_protocol::{ActionId, ActionKind, AgentId, Hit, HitId, LogLine, MetricReport};

use super::live_index::LiveIndex;
use super::retention::Retention;
use crate::backend::{ActionStore, BackendFuture, Ended, HitOutcome, LinesOutcome, LiveLimits, LiveRefusal, RateSpec};
use crate::engine::{ActionRecord, ActionStatus, HitsPage, Sender, StoredHit};
use crate::quota::Rate;
use crate::store::{ActionRow, HitRow, LineRow, StoreHandle};
use crate::telemetry::{LineBook, LinesPage, MetricData, StoredLine};

/// One action with what the store keeps beside its record.
#[derive(Debug)]
struct Entry {
    record: ActionRecord,
    version: u64,
    hits: Vec<StoredHit>,
    lines: LineBook,
    metric: Option<MetricData>,
    /// Per-agent snapshot rates (an agent is held by this one process).
    hit_rates: HashMap<AgentId, Rate>,
    /// A log's line and byte rates, all agents together.
    log_rates: Option<(Rate, Rate)>,
}

impl Entry {
    fn new(record: ActionRecord) -> Entry {
        let metric = matches!(record.spec.kind, ActionKind::Metric(_)).then(MetricData::default);
        Entry {
            record,
            version: 1,
            hits: Vec::new(),
            lines: LineBook::default(),
            metric,
            hit_rates: HashMap::new(),
            log_rates: None,
        }
    }

    fn targets(&self, from: &Sender) -> bool {
        self.record.org == from.org && self.record.agents.contains_key(&from.id)
    }
}

/// An action as restored from the database.
#[derive(Debug)]
pub struct Restored {
    /// Its record.
    pub record: ActionRecord,
    /// Its hits, in index order.
    pub hits: Vec<StoredHit>,
    /// Its newest lines, in index order.
    pub lines: Vec<StoredLine>,
    /// A metric's figures.
    pub metric: Option<MetricData>,
}

#[derive(Debug)]
struct Book {
    actions: HashMap<ActionId, Entry>,
    live: LiveIndex,
    retention: Retention,
}

/// The single-node [`ActionStore`]; see the module docs.
#[derive(Debug)]
pub struct MemoryActions {
    book: Mutex<Book>,
    store: Option<StoreHandle>,
}

/// The database row of a record (JSON columns keep the schema stable while the types
/// grow optional fields).
pub fn row(record: &ActionRecord) -> ActionRow {
    ActionRow {
        id: record.spec.id.to_string(),
        spec: serde_json::to_string(&record.spec).unwrap_or_default(),
        target: serde_json::to_string(&record.target).unwrap_or_default(),
        created_by: record.created_by.clone(),
        created_at_ms: record.created_at_ms,
        status: record.status.as_str().to_owned(),
        ended_at_ms: record.ended_at_ms,
        end_reason: record.end_reason.clone(),
        pending_note: record.pending_note.clone(),
        hits_refused: record.hits_refused,
        org: record.org.clone(),
        created_by_key: record.created_by_key.clone(),
        reach: serde_json::to_string(&record.reach).ok(),
        pools: serde_json::to_string(&record.pools).ok(),
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BackendFuture<'a, T> {
    std::future::ready(Ok(v)).boxed()
}

impl MemoryActions {
    /// An empty store keeping at most `max_ended_per_org` ended actions per organization,
    /// writing through `store` (nothing is persisted without one).
    pub fn new(max_ended_per_org: usize, store: Option<StoreHandle>) -> MemoryActions {
        Self::restored(max_ended_per_org, store, Vec::new()).0
    }

    /// A store holding `actions` (oldest first, as loaded); returns it and the ended
    /// actions a bound lowered since they were written made it forget (already deleted
    /// from the database).
    pub fn restored(
        max_ended_per_org: usize,
        store: Option<StoreHandle>,
        actions: Vec<Restored>,
    ) -> (MemoryActions, Vec<ActionId>) {
        let mut book =
            Book { actions: HashMap::new(), live: LiveIndex::default(), retention: Retention::new(max_ended_per_org) };
        let mut forget = Vec::new();
        for r in actions {
            let rec = &r.record;
            let id = rec.spec.id.clone();
            if rec.is_live() {
                book.live.insert(&rec.org, &rec.created_by_key, rec.spec.expires_at_ms, id.clone());
            } else {
                let ended = rec.ended_at_ms.unwrap_or(rec.created_at_ms);
                forget.extend(book.retention.keep(&rec.org, &rec.created_by_key, ended, id.clone()));
            }
            let mut entry = Entry::new(r.record);
            entry.hits = r.hits;
            for line in r.lines {
                entry.lines.restore(line);
            }
            entry.record.hits = entry.hits.len() as u64;
            entry.record.lines = entry.record.lines.max(entry.lines.total);
            if r.metric.is_some() {
                entry.metric = r.metric;
            }
            book.actions.insert(id, entry);
        }
        for id in &forget {
            book.actions.remove(id);
            if let Some(store) = &store {
                store.delete_action(id.as_str());
            }
        }
        (MemoryActions { book: Mutex::new(book), store }, forget)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // Only short, panic-free sections run under it; a poisoned lock still holds
        // consistent data.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, record: &ActionRecord) {
        if let Some(store) = &self.store {
            store.put_action(row(record));
        }
    }

    /// Live actions in all.
    pub fn live_len(&self) -> usize {
        self.book().live.len()
    }

    /// Actions held in all, live and ended.
    pub fn len(&self) -> usize {
        self.book().actions.len()
    }

    /// Whether it holds no action.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ActionStore for MemoryActions {
    fn insert(&self, record: ActionRecord, limits: LiveLimits) -> BackendFuture<'_, Result<(), LiveRefusal>> {
        let mut book = self.book();
        let (key, org) = (record.created_by_key.as_str(), record.org.as_str());
        let live = book.live.count_key(key);
        if live >= limits.per_key {
            return ready(Err(LiveRefusal::Key { live, soonest_ms: book.live.soonest_key(key) }));
        }
        let live = book.live.count_org(org);
        if live >= limits.per_org {
            return ready(Err(LiveRefusal::Org { live, soonest_ms: book.live.soonest_org(org) }));
        }
        let id = record.spec.id.clone();
        book.live.insert(org, key, record.spec.expires_at_ms, id.clone());
        self.persist(&record);
        book.actions.insert(id, Entry::new(record));
        ready(Ok(()))
    }

    fn load<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<(ActionRecord, u64)>> {
        let book = self.book();
        ready(book.actions.get(id).map(|e| (e.record.clone(), e.version)))
    }

    fn swap<'a>(&'a self, record: &'a ActionRecord, version: u64) -> BackendFuture<'a, bool> {
        let mut book = self.book();
        let Some(entry) = book.actions.get_mut(&record.spec.id).filter(|e| e.version == version) else {
            return ready(false);
        };
        // Counts kept by the appends are theirs, whatever the caller read.
        let (hits, lines) = (entry.record.hits, entry.record.lines);
        entry.record = record.clone();
        entry.record.hits = hits;
        entry.record.lines = lines;
        entry.version += 1;
        self.persist(&entry.record);
        ready(true)
    }

    fn end<'a>(
        &'a self,
        id: &'a ActionId,
        status: ActionStatus,
        reason: &'a str,
        now_ms: u64,
    ) -> BackendFuture<'a, Option<Ended>> {
        let mut book = self.book();
        let Some(entry) = book.actions.get_mut(id).filter(|e| e.record.is_live()) else { return ready(None) };
        let rec = &mut entry.record;
        rec.status = status;
        rec.ended_at_ms = Some(now_ms);
        rec.end_reason = Some(reason.to_owned());
        entry.version += 1;
        let record = rec.clone();
        self.persist(&record);
        let (org, key, expires) = (record.org.clone(), record.created_by_key.clone(), record.spec.expires_at_ms);
        book.live.remove(&org, &key, expires, id);
        let forgotten = book.retention.keep(&org, &key, now_ms, id.clone());
        for old in &forgotten {
            book.actions.remove(old);
            if let Some(store) = &self.store {
                store.delete_action(old.as_str());
            }
        }
        ready(Some(Ended { record, forgotten }))
    }

    fn list<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>> {
        let book = self.book();
        ready(book.actions.values().filter(|e| e.record.org == org).map(|e| e.record.clone()).collect())
    }

    fn live<'a>(&'a self, org: &'a str) -> BackendFuture<'a, Vec<ActionRecord>> {
        let book = self.book();
        let out = book.live.ids_in_org(org).filter_map(|id| book.actions.get(id)).map(|e| e.record.clone()).collect();
        ready(out)
    }

    fn due(&self, now_ms: u64) -> BackendFuture<'_, Vec<ActionId>> {
        ready(self.book().live.due(now_ms))
    }

    fn live_counts<'a>(&'a self, key_id: &'a str, org: &'a str) -> BackendFuture<'a, (usize, usize)> {
        let book = self.book();
        ready((book.live.count_key(key_id), book.live.count_org(org)))
    }

    fn ended_count<'a>(&'a self, org: &'a str) -> BackendFuture<'a, usize> {
        ready(self.book().retention.count_in(org))
    }

    fn append_hit<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        hit: Hit,
        now_ms: u64,
        rate: RateSpec,
    ) -> BackendFuture<'a, HitOutcome> {
        let mut book = self.book();
        let Some(entry) = book.actions.get_mut(id) else { return ready(HitOutcome::Refused) };
        let max = u64::from(entry.record.max_hits());
        if !entry.targets(from) || !entry.record.is_live() || entry.record.hits >= max {
            entry.record.hits_refused += 1;
            entry.version += 1;
            return ready(HitOutcome::Refused);
        }
        let limiter =
            entry.hit_rates.entry(from.id.clone()).or_insert_with(|| Rate::per_second(rate.per_sec, rate.burst));
        if limiter.take(1).is_err() {
            return ready(HitOutcome::RateLimited);
        }
        let rec = &mut entry.record;
        rec.dropped.paused = false;
        for f in &hit.redactions {
            *rec.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
        }
        rec.hits += 1;
        let stored = StoredHit {
            hit_id: HitId::generate(),
            index: rec.hits,
            agent_id: from.id.clone(),
            agent_name: from.name.clone(),
            received_at_ms: now_ms,
            hit,
        };
        if let Some(store) = &self.store {
            store.put_hit(HitRow {
                action_id: id.to_string(),
                idx: stored.index,
                body: serde_json::to_string(&stored).unwrap_or_default(),
                received_at_ms: now_ms,
            });
        }
        let index = stored.index;
        entry.hits.push(stored);
        entry.version += 1;
        ready(HitOutcome::Accepted { index, complete: index >= max })
    }

    fn hits<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, HitsPage> {
        let book = self.book();
        let hits = book.actions.get(id).map_or(&[][..], |e| &e.hits[..]);
        let start = usize::try_from(since).unwrap_or(usize::MAX).min(hits.len());
        let end = start.saturating_add(limit.max(1)).min(hits.len());
        ready(HitsPage { hits: hits[start..end].to_vec(), next_cursor: end as u64, has_more: end < hits.len() })
    }

    fn admit_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        costs: &'a [u32],
        rates: (RateSpec, RateSpec),
    ) -> BackendFuture<'a, Option<Vec<bool>>> {
        let mut book = self.book();
        let Some(entry) = book.actions.get_mut(id) else { return ready(None) };
        if !matches!(entry.record.spec.kind, ActionKind::Log(_)) || !entry.record.is_live() || !entry.targets(from) {
            return ready(None);
        }
        let (lines, bytes) = entry.log_rates.get_or_insert_with(|| {
            (Rate::per_second(rates.0.per_sec, rates.0.burst), Rate::per_second(rates.1.per_sec, rates.1.burst))
        });
        ready(Some(costs.iter().map(|c| lines.take(1).is_ok() && bytes.take(*c).is_ok()).collect()))
    }

    fn append_lines<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        lines: Vec<LogLine>,
        now_ms: u64,
    ) -> BackendFuture<'a, LinesOutcome> {
        let mut book = self.book();
        let mut out = LinesOutcome::default();
        let Some(entry) = book.actions.get_mut(id).filter(|e| e.record.is_live() && e.targets(from)) else {
            out.refused = lines.len();
            return ready(out);
        };
        let max_lines = match &entry.record.spec.kind {
            ActionKind::Log(l) => l.max_lines,
            _ => None,
        };
        for line in lines {
            entry.record.dropped.paused = false;
            for f in &line.redactions {
                *entry.record.rules_fired.entry(f.rule.clone()).or_insert(0) += 1;
            }
            let stored = StoredLine {
                index: 0,
                agent_id: from.id.clone(),
                agent_name: from.name.clone(),
                received_at_ms: now_ms,
                line,
            };
            let index = entry.lines.push(stored);
            if let (Some(store), Some(last)) = (&self.store, entry.lines.lines.back()) {
                store.put_line(LineRow {
                    action_id: id.to_string(),
                    idx: index,
                    body: serde_json::to_string(last).unwrap_or_default(),
                    received_at_ms: now_ms,
                });
            }
            out.kept += 1;
            entry.record.lines = entry.lines.total;
            if max_lines.is_some_and(|m| entry.lines.total >= m) {
                out.complete = true;
                break;
            }
        }
        entry.version += 1;
        ready(out)
    }

    fn lines<'a>(&'a self, id: &'a ActionId, since: u64, limit: usize) -> BackendFuture<'a, LinesPage> {
        let book = self.book();
        let page = match book.actions.get(id) {
            Some(e) => e.lines.page(since, limit),
            None => LineBook::default().page(since, limit),
        };
        ready(page)
    }

    fn merge_metric<'a>(
        &'a self,
        id: &'a ActionId,
        from: &'a Sender,
        mut report: MetricReport,
    ) -> BackendFuture<'a, bool> {
        let mut book = self.book();
        let Some(entry) = book.actions.get_mut(id).filter(|e| e.targets(from)) else { return ready(false) };
        let Some(data) = entry.metric.as_mut() else { return ready(false) };
        crate::telemetry::sanitize(&mut report);
        data.merge(&from.id, &report);
        if let Some(store) = &self.store {
            store.put_metric(id.as_str(), serde_json::to_string(data).unwrap_or_default());
        }
        entry.version += 1;
        ready(true)
    }

    fn metric<'a>(&'a self, id: &'a ActionId) -> BackendFuture<'a, Option<MetricData>> {
        ready(self.book().actions.get(id).and_then(|e| e.metric.clone()))
    }

    fn purge_before(&self, cutoff_ms: u64) -> BackendFuture<'_, Vec<ActionId>> {
        let mut book = self.book();
        let old = book.retention.expire_before(cutoff_ms);
        for id in &old {
            book.actions.remove(id);
        }
        drop(book);
        if let Some(store) = &self.store {
            for id in &old {
                store.delete_action(id.as_str());
            }
            // And whatever the database holds that memory no longer does.
            store.purge_before(cutoff_ms);
        }
        ready(old)
    }
}
