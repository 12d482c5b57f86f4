//! The conformance suite every backend passes: generic test functions over the seams,
//! instantiated once per backend with [`conformance_suite!`] (the single-node backend
//! in `local`, the shared one beside it). A behaviour the broker relies on is written
//! here once, never per backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use periscope_protocol::{
    ActionId, ActionKind, ActionSpec, AgentId, Hit, Location, LogDestination, LogLevel, LogLine, LogSpec, MetricKind,
    MetricReport, MetricSpec, SnapshotSpec,
};

use crate::audit::{Actor, AuditEntry, AuditKind};
use crate::auth::Reach;
use crate::backend::{
    ActionEvents, ActionStore, AgentDirectory, HitOutcome, KeyBackend, KeyRefusal, KeyRow, LiveLimits, LiveRefusal,
    RateSpec,
};
use crate::engine::{ActionRecord, ActionStatus, AgentActionView, Sender, Target};

/// A fresh, empty backend under test.
pub(crate) struct Backend {
    /// Its action store (keeping at most 3 ended actions per organization).
    pub actions: Arc<dyn ActionStore>,
    /// Its action events.
    pub events: Arc<dyn ActionEvents>,
    /// Its key directory.
    pub keys: Arc<dyn KeyBackend>,
    /// Its callers' budgets.
    pub budgets: Arc<dyn crate::quota::Budgets>,
    /// Its agent directory (node `n1`).
    pub directory: Arc<dyn AgentDirectory>,
    /// Its error groups.
    pub errors: Arc<dyn crate::backend::ErrorStore>,
    /// Its store of redaction rules, and of safety settings (blocklists, pauses) in
    /// their own namespace, over the same storage.
    pub rule_stores: [Arc<dyn crate::backend::RuleStore>; 2],
    /// Whatever must live as long as the test (a server, a stop signal).
    pub _keep: Box<dyn std::any::Any + Send>,
}

/// Runs every conformance test against the backends `$make` builds (an async fn
/// returning a [`Backend`] whose store keeps 3 ended actions per organization).
macro_rules! conformance_suite {
    ($make:path) => {
        $crate::backend::conformance::conformance_suite!(@tests $make;
            insertion_stops_at_the_key_and_organization_budgets,
            a_swap_over_a_stale_version_changes_nothing,
            hits_get_consecutive_indexes_and_stop_at_max_hits,
            hits_from_agents_the_action_does_not_target_are_refused,
            hits_stored_together_are_each_checked_as_if_alone,
            each_agent_is_held_to_its_rate_per_action,
            an_action_ends_once_and_leaves_the_live_counts,
            retention_forgets_the_oldest_of_the_key_holding_the_most,
            expiry_is_told_by_the_store_without_a_scan,
            log_lines_are_admitted_within_the_actions_rates_and_complete_at_max_lines,
            metric_reports_merge_from_the_agents_the_action_targets,
            a_waiter_subscribed_before_a_change_is_woken,
            purging_forgets_actions_that_ended_before_the_cutoff,
            a_key_is_stored_with_its_audit_entry_and_moves_the_epoch,
            revoking_twice_writes_one_entry,
            groups_and_pool_assignments_refuse_what_does_not_exist,
            a_lease_is_taken_over_only_by_the_same_process_with_a_newer_epoch,
            a_budget_allows_its_burst_then_says_when_to_retry,
            budgets_taken_together_stop_at_the_first_spent_one,
            slots_are_taken_for_the_key_and_its_organization_together_or_not_at_all,
            error_groups_add_up_keep_the_newest_message_and_hit_and_list_newest_first,
            error_groups_are_kept_per_organization_and_bounded,
            settings_of_each_namespace_are_kept_apart_and_replaced_whole);
    };
    (@tests $make:path; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::backend::conformance::$name($make().await).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

fn sender(org: &str) -> Sender {
    Sender { id: AgentId::generate(), name: "agent".into(), org: org.into(), pool: "shop".into(), epoch: 0 }
}

fn record(org: &str, key: &str, kind: ActionKind, agents: &[&Sender], expires_at_ms: u64) -> ActionRecord {
    let spec = ActionSpec {
        id: ActionId::generate(),
        location: Location { file: "src/shop.rs".into(), line: 7 },
        condition: None,
        expires_at_ms,
        kind,
        function: None,
        expect: None,
    };
    ActionRecord {
        spec,
        target: Target { pool: Some("shop".into()), ..Target::default() },
        org: org.into(),
        reach: Reach::org(org),
        pools: BTreeSet::from(["shop".to_owned()]),
        created_by: key.into(),
        created_by_key: key.into(),
        created_at_ms: 1,
        pending_note: None,
        status: ActionStatus::Active,
        ended_at_ms: None,
        end_reason: None,
        agents: agents
            .iter()
            .map(|a| (a.id.clone(), AgentActionView::pending(a.id.clone(), a.name.clone(), "shop".into(), 1)))
            .collect(),
        hits: 0,
        hits_refused: 0,
        lines: 0,
        rules_fired: BTreeMap::new(),
        pauses: BTreeMap::new(),
        pause_last_ms: BTreeMap::new(),
        dropped: Default::default(),
        redacted_reads: 0,
    }
}

fn snapshot(max_hits: u32) -> ActionKind {
    ActionKind::Snapshot(SnapshotSpec { max_hits, watch: Vec::new(), backtrace: false })
}

fn hit(action: &ActionId, seq: u64) -> Hit {
    serde_json::from_value(serde_json::json!({
        "action_id": action, "seq": seq, "time_ms": 1, "location": {"file": "src/shop.rs", "line": 7},
        "fields": {"n": {"type": "int", "value": seq}},
        "redactions": [{"path": "fields.card", "rule": "credit_card"}],
    }))
    .expect("a hit")
}

const WIDE: RateSpec = RateSpec { per_sec: 1_000.0, burst: 1_000.0 };
const LIMITS: LiveLimits = LiveLimits { per_key: 100, per_org: 100 };
const FAR: u64 = u64::MAX / 2;

async fn insert(b: &Backend, r: &ActionRecord) {
    b.actions.insert(r.clone(), LIMITS).await.expect("reachable").expect("within budget");
}

pub(crate) async fn insertion_stops_at_the_key_and_organization_budgets(b: Backend) {
    let limits = LiveLimits { per_key: 2, per_org: 3 };
    for expires in [5_000, 4_000] {
        b.actions.insert(record("acme", "key_a", snapshot(1), &[], expires), limits).await.unwrap().unwrap();
    }
    let refused = b.actions.insert(record("acme", "key_a", snapshot(1), &[], 9_000), limits).await.unwrap();
    assert_eq!(refused, Err(LiveRefusal::Key { live: 2, soonest_ms: Some(4_000) }));
    b.actions.insert(record("acme", "key_b", snapshot(1), &[], 7_000), limits).await.unwrap().unwrap();
    let refused = b.actions.insert(record("acme", "key_c", snapshot(1), &[], 9_000), limits).await.unwrap();
    assert_eq!(refused, Err(LiveRefusal::Org { live: 3, soonest_ms: Some(4_000) }));
    b.actions.insert(record("other", "key_d", snapshot(1), &[], 9_000), limits).await.unwrap().unwrap();
    assert_eq!(b.actions.live_counts("key_a", "acme").await.unwrap(), (2, 3));
    assert_eq!(b.actions.live("acme").await.unwrap().len(), 3);
}

pub(crate) async fn a_swap_over_a_stale_version_changes_nothing(b: Backend) {
    let a = sender("acme");
    let r = record("acme", "key_a", snapshot(5), &[&a], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let (mut first, v) = b.actions.load(&id).await.unwrap().unwrap();
    let (mut second, v2) = b.actions.load(&id).await.unwrap().unwrap();
    assert_eq!(v, v2);
    first.pending_note = Some("first".into());
    assert!(b.actions.swap(&first, v).await.unwrap());
    second.pending_note = Some("second".into());
    assert!(!b.actions.swap(&second, v2).await.unwrap(), "the second writer read an older version");
    // An append moves the version on too, and what it counted survives a later swap.
    let (mut third, v3) = b.actions.load(&id).await.unwrap().unwrap();
    assert!(matches!(b.actions.append_hit(&id, &a, hit(&id, 1), 10, WIDE).await.unwrap(), HitOutcome::Accepted { .. }));
    third.pending_note = Some("third".into());
    assert!(!b.actions.swap(&third, v3).await.unwrap());
    let (mut fourth, v4) = b.actions.load(&id).await.unwrap().unwrap();
    fourth.hits = 0;
    assert!(b.actions.swap(&fourth, v4).await.unwrap());
    let (now, _) = b.actions.load(&id).await.unwrap().unwrap();
    assert_eq!((now.pending_note.as_deref(), now.hits), (Some("first"), 1));
}

pub(crate) async fn hits_get_consecutive_indexes_and_stop_at_max_hits(b: Backend) {
    let a = sender("acme");
    let r = record("acme", "key_a", snapshot(3), &[&a], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let mut outcomes = Vec::new();
    for seq in 1..=4 {
        outcomes.push(b.actions.append_hit(&id, &a, hit(&id, seq), 10 + seq, WIDE).await.unwrap());
    }
    assert_eq!(
        outcomes,
        [
            HitOutcome::Accepted { index: 1, complete: false },
            HitOutcome::Accepted { index: 2, complete: false },
            HitOutcome::Accepted { index: 3, complete: true },
            HitOutcome::Refused,
        ]
    );
    let page = b.actions.hits(&id, 1, 10).await.unwrap();
    assert_eq!(page.hits.iter().map(|h| h.index).collect::<Vec<_>>(), [2, 3]);
    assert_eq!((page.next_cursor, page.has_more), (3, false));
    let page = b.actions.hits(&id, 0, 1).await.unwrap();
    assert_eq!((page.hits[0].index, page.next_cursor, page.has_more), (1, 1, true));
    let (rec, _) = b.actions.load(&id).await.unwrap().unwrap();
    assert_eq!((rec.hits, rec.hits_refused), (3, 1));
    assert_eq!(rec.rules_fired.get("credit_card"), Some(&3), "the rules that fired are counted");
    let (rec, page) = b.actions.load_with_hits(&id, 1, 10).await.unwrap().unwrap();
    assert_eq!((rec.hits, page.hits.iter().map(|h| h.index).collect::<Vec<_>>()), (3, vec![2, 3]));
    let (_, page) = b.actions.load_with_hits(&id, 3, 10).await.unwrap().unwrap();
    assert_eq!((page.hits.len(), page.next_cursor, page.has_more), (0, 3, false), "nothing after the last");
    assert!(b.actions.load_with_hits(&ActionId::generate(), 0, 10).await.unwrap().is_none());
}

pub(crate) async fn hits_from_agents_the_action_does_not_target_are_refused(b: Backend) {
    let a = sender("acme");
    let stranger = sender("acme");
    let mut intruder = a.clone();
    intruder.org = "evil".into();
    let r = record("acme", "key_a", snapshot(5), &[&a], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    assert_eq!(b.actions.append_hit(&id, &stranger, hit(&id, 1), 1, WIDE).await.unwrap(), HitOutcome::Refused);
    assert_eq!(b.actions.append_hit(&id, &intruder, hit(&id, 1), 1, WIDE).await.unwrap(), HitOutcome::Refused);
    let unknown = ActionId::generate();
    assert_eq!(b.actions.append_hit(&unknown, &a, hit(&unknown, 1), 1, WIDE).await.unwrap(), HitOutcome::Refused);
    assert_eq!(b.actions.hits(&id, 0, 10).await.unwrap().hits.len(), 0);
}

pub(crate) async fn hits_stored_together_are_each_checked_as_if_alone(b: Backend) {
    let a = sender("acme");
    let (two, five) =
        (record("acme", "key_a", snapshot(2), &[&a], FAR), record("acme", "key_a", snapshot(5), &[&a], FAR));
    insert(&b, &two).await;
    insert(&b, &five).await;
    let (x, y, unknown) = (two.spec.id.clone(), five.spec.id.clone(), ActionId::generate());
    let batch = vec![hit(&x, 1), hit(&y, 2), hit(&x, 3), hit(&unknown, 4), hit(&x, 5), hit(&y, 6)];
    assert_eq!(
        b.actions.append_hits(&a, batch, 10, WIDE).await.unwrap(),
        [
            HitOutcome::Accepted { index: 1, complete: false },
            HitOutcome::Accepted { index: 1, complete: false },
            HitOutcome::Accepted { index: 2, complete: true },
            HitOutcome::Refused,
            HitOutcome::Refused,
            HitOutcome::Accepted { index: 2, complete: false },
        ]
    );
    assert_eq!(b.actions.hits(&y, 0, 10).await.unwrap().hits.iter().map(|h| h.index).collect::<Vec<_>>(), [1, 2]);
    let (rec, _) = b.actions.load(&x).await.unwrap().unwrap();
    assert_eq!((rec.hits, rec.hits_refused), (2, 1));
    assert!(b.actions.append_hits(&a, Vec::new(), 10, WIDE).await.unwrap().is_empty());
}

pub(crate) async fn each_agent_is_held_to_its_rate_per_action(b: Backend) {
    let (a, c) = (sender("acme"), sender("acme"));
    let r = record("acme", "key_a", snapshot(50), &[&a, &c], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let tight = RateSpec { per_sec: 0.001, burst: 2.0 };
    let mut got = Vec::new();
    for seq in 1..=3 {
        got.push(b.actions.append_hit(&id, &a, hit(&id, seq), seq, tight).await.unwrap());
    }
    assert_eq!(got[2], HitOutcome::RateLimited);
    assert!(matches!(got[1], HitOutcome::Accepted { index: 2, .. }));
    assert!(
        matches!(b.actions.append_hit(&id, &c, hit(&id, 9), 9, tight).await.unwrap(), HitOutcome::Accepted { .. }),
        "another agent has its own rate"
    );
}

pub(crate) async fn an_action_ends_once_and_leaves_the_live_counts(b: Backend) {
    let a = sender("acme");
    let r = record("acme", "key_a", snapshot(5), &[&a], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let ended = b.actions.end(&id, ActionStatus::Removed, "removed by a caller", 77).await.unwrap().unwrap();
    assert_eq!(ended.record.status, ActionStatus::Removed);
    assert_eq!(ended.record.ended_at_ms, Some(77));
    assert!(b.actions.end(&id, ActionStatus::Expired, "again", 78).await.unwrap().is_none(), "ends once");
    assert_eq!(b.actions.live_counts("key_a", "acme").await.unwrap(), (0, 0));
    assert_eq!(b.actions.ended_count("acme").await.unwrap(), 1);
    assert_eq!(b.actions.append_hit(&id, &a, hit(&id, 1), 80, WIDE).await.unwrap(), HitOutcome::Refused);
    let (rec, _) = b.actions.load(&id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.end_reason.as_deref()), (ActionStatus::Removed, Some("removed by a caller")));
}

pub(crate) async fn retention_forgets_the_oldest_of_the_key_holding_the_most(b: Backend) {
    // The backend keeps 3 ended actions per organization.
    let alice = record("acme", "key_alice", snapshot(1), &[], FAR);
    insert(&b, &alice).await;
    b.actions.end(&alice.spec.id, ActionStatus::Removed, "r", 1).await.unwrap().unwrap();
    let mut mallory: Vec<ActionId> = Vec::new();
    for t in 2..=4 {
        let r = record("acme", "key_mallory", snapshot(1), &[], FAR);
        insert(&b, &r).await;
        let ended = b.actions.end(&r.spec.id, ActionStatus::Removed, "r", t).await.unwrap().unwrap();
        if t < 4 {
            assert!(ended.forgotten.is_empty());
        } else {
            assert_eq!(ended.forgotten, vec![mallory[0].clone()], "mallory's oldest, not alice's older one");
        }
        mallory.push(r.spec.id.clone());
    }
    assert!(b.actions.load(&mallory[0]).await.unwrap().is_none());
    assert!(b.actions.load(&alice.spec.id).await.unwrap().is_some());
    assert_eq!(b.actions.ended_count("acme").await.unwrap(), 3);
}

pub(crate) async fn expiry_is_told_by_the_store_without_a_scan(b: Backend) {
    let soon = record("acme", "key_a", snapshot(1), &[], 1_000);
    let later = record("acme", "key_a", snapshot(1), &[], 5_000);
    let other = record("other", "key_b", snapshot(1), &[], 2_000);
    for r in [&soon, &later, &other] {
        insert(&b, r).await;
    }
    assert_eq!(b.actions.due(999).await.unwrap(), Vec::<ActionId>::new());
    assert_eq!(b.actions.due(2_000).await.unwrap(), vec![soon.spec.id.clone(), other.spec.id.clone()]);
    b.actions.end(&soon.spec.id, ActionStatus::Expired, "reached its expiry", 2_000).await.unwrap().unwrap();
    assert_eq!(b.actions.due(2_000).await.unwrap(), vec![other.spec.id.clone()]);
}

fn line(action: &ActionId, text: &str) -> LogLine {
    LogLine {
        action_id: action.clone(),
        seq: 1,
        time_ms: 1,
        level: LogLevel::Info,
        text: text.into(),
        thread: None,
        redactions: Vec::new(),
        rules_version: 0,
    }
}

pub(crate) async fn log_lines_are_admitted_within_the_actions_rates_and_complete_at_max_lines(b: Backend) {
    let (a, c) = (sender("acme"), sender("acme"));
    let kind = ActionKind::Log(LogSpec {
        template: "x".into(),
        level: LogLevel::Info,
        destination: LogDestination::Broker,
        max_lines: Some(4),
    });
    let r = record("acme", "key_a", kind, &[&a, &c], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let rates = (RateSpec { per_sec: 0.001, burst: 3.0 }, RateSpec { per_sec: 1_000.0, burst: 1_000.0 });
    assert_eq!(b.actions.admit_lines(&id, &a, &[10, 10], rates).await.unwrap(), Some(vec![true, true]));
    assert_eq!(
        b.actions.admit_lines(&id, &c, &[10, 10], rates).await.unwrap(),
        Some(vec![true, false]),
        "the rate is the action's, all agents together"
    );
    let snap = record("acme", "key_a", snapshot(1), &[&a], FAR);
    insert(&b, &snap).await;
    assert_eq!(b.actions.admit_lines(&snap.spec.id, &a, &[1], rates).await.unwrap(), None, "not a log");
    let o = b.actions.append_lines(&id, &a, vec![line(&id, "one"), line(&id, "two"), line(&id, "three")], 5).await;
    let o = o.unwrap();
    assert_eq!((o.kept, o.complete), (3, false));
    let o = b.actions.append_lines(&id, &c, vec![line(&id, "four"), line(&id, "five")], 6).await.unwrap();
    assert_eq!((o.kept, o.complete), (1, true), "it stops at max_lines");
    let page = b.actions.lines(&id, 2, 10).await.unwrap();
    assert_eq!(page.lines.iter().map(|l| l.line.text.as_str()).collect::<Vec<_>>(), ["three", "four"]);
    assert_eq!(page.next_cursor, 4);
    let (rec, _) = b.actions.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.lines, 4);
}

pub(crate) async fn metric_reports_merge_from_the_agents_the_action_targets(b: Backend) {
    let (a, c, stranger) = (sender("acme"), sender("acme"), sender("acme"));
    let kind = ActionKind::Metric(MetricSpec {
        metric: MetricKind::Counter,
        expression: None,
        end_location: None,
        report_interval_ms: 5_000,
    });
    let r = record("acme", "key_a", kind, &[&a, &c], FAR);
    insert(&b, &r).await;
    let id = r.spec.id.clone();
    let report = |count| MetricReport {
        action_id: id.clone(),
        window_start_ms: 95_000,
        window_end_ms: 100_000,
        count,
        sum: 0.0,
        min: None,
        max: None,
        histogram: Default::default(),
        skipped: 0,
    };
    assert!(b.actions.merge_metric(&id, &a, report(2)).await.unwrap());
    assert!(b.actions.merge_metric(&id, &c, report(3)).await.unwrap());
    assert!(b.actions.merge_metric(&id, &a, report(1)).await.unwrap());
    assert!(!b.actions.merge_metric(&id, &stranger, report(100)).await.unwrap());
    let data = b.actions.metric(&id).await.unwrap().unwrap();
    assert_eq!(data.total.count, 6);
    assert_eq!(data.per_agent[&a.id].count, 3);
    assert_eq!(data.series.len(), 1);
}

pub(crate) async fn a_waiter_subscribed_before_a_change_is_woken(b: Backend) {
    let id = ActionId::generate();
    let mut rx = b.events.subscribe(&id);
    let events = Arc::clone(&b.events);
    let changer = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        events.changed(&changer);
    });
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("woken").expect("open");
    let mut other = b.events.subscribe(&ActionId::generate());
    b.events.changed(&id);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other.changed()).await.is_err(),
        "another action's waiter sleeps on"
    );
}

pub(crate) async fn purging_forgets_actions_that_ended_before_the_cutoff(b: Backend) {
    let old = record("acme", "key_a", snapshot(1), &[], FAR);
    let new = record("acme", "key_a", snapshot(1), &[], FAR);
    for (r, t) in [(&old, 10), (&new, 20)] {
        insert(&b, r).await;
        b.actions.end(&r.spec.id, ActionStatus::Completed, "done", t).await.unwrap().unwrap();
    }
    assert_eq!(b.actions.purge_before(15).await.unwrap(), vec![old.spec.id.clone()]);
    assert!(b.actions.load(&old.spec.id).await.unwrap().is_none());
    assert!(b.actions.load(&new.spec.id).await.unwrap().is_some());
    assert_eq!(b.actions.list("acme").await.unwrap().len(), 1);
}

fn key_row(id: &str, org: &str, group: Option<&str>) -> KeyRow {
    KeyRow {
        id: id.into(),
        hash: format!("{:0>64}", id.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
        kind: "api".into(),
        name: id.into(),
        org: org.into(),
        role: Some("developer".into()),
        group: group.map(Into::into),
        scopes: None,
        pools: None,
        quotas: None,
        hint: "psk_…".into(),
        created_at_ms: 1,
        created_by: "test".into(),
        expires_at_ms: None,
        revoked_at_ms: None,
        revoked_by: None,
        created_by_key: None,
    }
}

fn entry(org: &str, kind: AuditKind) -> AuditEntry {
    AuditEntry::new(org, Actor::cli(), kind)
}

pub(crate) async fn a_key_is_stored_with_its_audit_entry_and_moves_the_epoch(b: Backend) {
    b.keys.ensure(vec![("acme".into(), Some("payments".into()))]).await.unwrap();
    let before = b.keys.epoch().await.unwrap();
    let refused =
        b.keys.insert(key_row("key_a", "nowhere", None), entry("nowhere", AuditKind::KeyCreated), false).await;
    assert_eq!(refused.unwrap(), Err(KeyRefusal::NoOrg("nowhere".into())));
    let refused = b.keys.insert(key_row("key_a", "acme", Some("ghosts")), entry("acme", AuditKind::KeyCreated), false);
    assert_eq!(refused.await.unwrap(), Err(KeyRefusal::NoGroup("ghosts".into())));
    b.keys
        .insert(key_row("key_a", "acme", Some("payments")), entry("acme", AuditKind::KeyCreated), false)
        .await
        .unwrap()
        .unwrap();
    assert!(b.keys.epoch().await.unwrap() > before, "every change moves the epoch");
    let rows = b.keys.load().await.unwrap();
    assert_eq!(rows.keys.len(), 1);
    assert_eq!(rows.keys[0].group.as_deref(), Some("payments"));
    assert!(rows.orgs.contains(&"acme".to_owned()) && rows.orgs.contains(&"default".to_owned()));
    assert!(rows.groups.contains(&("acme".to_owned(), "payments".to_owned())));
    // The command line creates what is missing.
    b.keys
        .insert(key_row("key_b", "globex", Some("ops")), entry("globex", AuditKind::KeyCreated), true)
        .await
        .unwrap()
        .unwrap();
    assert!(b.keys.load().await.unwrap().groups.contains(&("globex".to_owned(), "ops".to_owned())));
}

pub(crate) async fn revoking_twice_writes_one_entry(b: Backend) {
    b.keys.ensure(vec![]).await.unwrap();
    b.keys
        .insert(key_row("key_a", "default", None), entry("default", AuditKind::KeyCreated), false)
        .await
        .unwrap()
        .unwrap();
    b.keys.revoke(vec![("key_a".into(), entry("default", AuditKind::KeyRevoked))], 42, "alice".into()).await.unwrap();
    b.keys.revoke(vec![("key_a".into(), entry("default", AuditKind::KeyRevoked))], 99, "bob".into()).await.unwrap();
    let rows = b.keys.load().await.unwrap();
    assert_eq!((rows.keys[0].revoked_at_ms, rows.keys[0].revoked_by.as_deref()), (Some(42), Some("alice")));
}

pub(crate) async fn groups_and_pool_assignments_refuse_what_does_not_exist(b: Backend) {
    b.keys.ensure(vec![]).await.unwrap();
    b.keys
        .create_group("default".into(), "ops".into(), entry("default", AuditKind::GroupCreated))
        .await
        .unwrap()
        .unwrap();
    let again = b.keys.create_group("default".into(), "ops".into(), entry("default", AuditKind::GroupCreated)).await;
    assert_eq!(again.unwrap(), Err(KeyRefusal::GroupExists("ops".into())));
    let audit = |from: &str| entry("default", AuditKind::PoolAssigned).detail(format!("from {from}"));
    let nowhere = b.keys.assign_pool("default".into(), "shop".into(), "ghosts".into(), Box::new(audit)).await;
    assert_eq!(nowhere.unwrap(), Err(KeyRefusal::NoGroup("ghosts".into())));
    b.keys.assign_pool("default".into(), "shop".into(), "ops".into(), Box::new(audit)).await.unwrap().unwrap();
    assert_eq!(b.keys.load().await.unwrap().pools, vec![("default".into(), "shop".into(), "ops".into())]);
    b.keys.assign_pool("default".into(), "shop".into(), "default".into(), Box::new(audit)).await.unwrap().unwrap();
    assert!(b.keys.load().await.unwrap().pools.is_empty(), "back to default: no assignment");
}

pub(crate) async fn a_lease_is_taken_over_only_by_the_same_process_with_a_newer_epoch(b: Backend) {
    let agent = AgentId::generate();
    let first = b.directory.acquire(&agent, "host-1", 10).await.unwrap().unwrap();
    let held = b.directory.acquire(&agent, "host-2", 10).await.unwrap();
    assert!(held.is_err(), "another process may not take a live lease");
    let second = b.directory.acquire(&agent, "host-1", 10).await.unwrap().unwrap();
    assert!(second > first, "the same process reconnecting takes it over, newer");
    assert_eq!(b.directory.lease(&agent).await.unwrap(), Some(second));
    assert_eq!(b.directory.renew(vec![(agent.clone(), first)]).await.unwrap(), vec![agent.clone()], "moved on");
    assert!(b.directory.renew(vec![(agent.clone(), second)]).await.unwrap().is_empty());
    b.directory.release(&agent, first).await.unwrap();
    assert_eq!(b.directory.lease(&agent).await.unwrap(), Some(second), "a stale epoch releases nothing");
    b.directory.release(&agent, second).await.unwrap();
    assert!(b.directory.acquire(&agent, "host-2", 11).await.unwrap().is_ok(), "released: anyone may take it");
}

/// A live snapshot targeting `from` (for backend-specific tests).
pub(crate) fn record_for(from: &Sender, max_hits: u32) -> ActionRecord {
    record(&from.org, "key_a", snapshot(max_hits), &[from], FAR)
}

/// A hit for `action` (for backend-specific tests).
pub(crate) fn hit_for(action: &ActionId, seq: u64) -> Hit {
    hit(action, seq)
}

pub(crate) async fn a_budget_allows_its_burst_then_says_when_to_retry(b: Backend) {
    let name = "call:key:key_a".to_owned();
    let mut left = Vec::new();
    for _ in 0..3 {
        left.push(b.budgets.take(name.clone(), 1, 3).await.unwrap().unwrap());
    }
    assert_eq!(left, [2, 1, 0]);
    let wait = b.budgets.take(name.clone(), 1, 3).await.unwrap().unwrap_err();
    assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60), "{wait:?}");
    assert!(b.budgets.take("call:key:key_b".into(), 1, 3).await.unwrap().is_ok(), "another budget is its own");
}

pub(crate) async fn budgets_taken_together_stop_at_the_first_spent_one(b: Backend) {
    let cells = |key: &str| vec![(format!("call:key:{key}"), 1, 2), ("call:org:acme".to_owned(), 1, 3)];
    assert_eq!(b.budgets.take_all(cells("a")).await.unwrap(), Ok(vec![1, 2]));
    assert_eq!(b.budgets.take_all(cells("a")).await.unwrap(), Ok(vec![0, 1]));
    let (spent, wait) = b.budgets.take_all(cells("a")).await.unwrap().unwrap_err();
    assert_eq!(spent, 0, "the key's budget is spent first");
    assert!(wait > Duration::from_secs(20) && wait <= Duration::from_secs(60), "{wait:?}");
    // The key's refusal spent nothing of its organization's: one cell is left there.
    assert_eq!(b.budgets.take_all(cells("b")).await.unwrap(), Ok(vec![1, 0]));
    let (spent, _) = b.budgets.take_all(cells("c")).await.unwrap().unwrap_err();
    assert_eq!(spent, 1, "the organization's budget is spent");
    assert_eq!(b.budgets.take("call:key:c".into(), 1, 2).await.unwrap(), Ok(0), "the key's cell stays taken");
}

pub(crate) async fn slots_are_taken_for_the_key_and_its_organization_together_or_not_at_all(b: Backend) {
    let deadline = crate::time::now_ms() + 60_000;
    let hold = |key: &str, id: &str| {
        b.budgets.hold(format!("wait:key:{key}"), 1, "wait:org:acme".into(), 2, id.into(), deadline)
    };
    hold("a", "1").await.unwrap().unwrap();
    let full = hold("a", "2").await.unwrap().unwrap_err();
    assert_eq!((full.whose, full.held, full.soonest_ms), (crate::quota::Whose::Key, 1, Some(deadline)));
    hold("b", "3").await.unwrap().unwrap();
    let full = hold("c", "4").await.unwrap().unwrap_err();
    assert_eq!(full.whose, crate::quota::Whose::Org);
    assert_eq!(b.budgets.held("wait:key:c".into()).await.unwrap(), 0, "a refused slot holds nothing");
    b.budgets.release("wait:key:a".into(), "wait:org:acme".into(), "1".into()).await.unwrap();
    assert_eq!(b.budgets.held("wait:org:acme".into()).await.unwrap(), 1);
    hold("c", "5").await.unwrap().unwrap();
    // A slot past its deadline (and the grace) no longer counts.
    let past = crate::time::now_ms().saturating_sub(10_000);
    b.budgets.hold("wait:key:d".into(), 1, "wait:org:old".into(), 1, "6".into(), past).await.unwrap().unwrap();
    b.budgets.hold("wait:key:d".into(), 1, "wait:org:old".into(), 1, "7".into(), deadline).await.unwrap().unwrap();
}

fn error_group(agent: &AgentId, line: u32, count: u64, last: u64, message: &str) -> crate::backend::ErrorGroup {
    crate::backend::ErrorGroup {
        source: crate::backend::ErrorSource {
            agent_id: agent.clone(),
            agent_name: "agent".into(),
            pool: "shop".into(),
            service: "shop".into(),
            tags: vec!["region:eu".into()],
        },
        file: "src/shop.rs".into(),
        line,
        kind: periscope_protocol::ErrorKind::Event,
        error_type: "shop::orders".into(),
        message: message.into(),
        count,
        uncaptured: count.saturating_sub(1),
        captured: 0,
        first_seen_ms: last.saturating_sub(10),
        last_seen_ms: last,
        hit: None,
    }
}

pub(crate) async fn error_groups_add_up_keep_the_newest_message_and_hit_and_list_newest_first(b: Backend) {
    let agent = AgentId::generate();
    let action = ActionId::generate();
    let mut first = error_group(&agent, 7, 3, 1_000, "first");
    first.captured = 1;
    first.hit = Some(crate::backend::ErrorHit { action_id: action.clone(), index: 1, time_ms: 995 });
    b.errors.record("org_a", vec![first]).await.unwrap();
    // An older report arriving late widens the times but keeps the newest message.
    b.errors.record("org_a", vec![error_group(&agent, 7, 2, 900, "older")]).await.unwrap();
    let mut newer = error_group(&agent, 7, 1, 2_000, "newest");
    newer.captured = 1;
    newer.hit = Some(crate::backend::ErrorHit { action_id: action.clone(), index: 2, time_ms: 1_990 });
    b.errors.record("org_a", vec![newer, error_group(&agent, 9, 5, 1_500, "other line")]).await.unwrap();
    let groups = b.errors.list("org_a").await.unwrap();
    assert_eq!(groups.len(), 2);
    let g = &groups[0];
    assert_eq!((g.line, g.count, g.uncaptured, g.captured), (7, 6, 3, 2));
    assert_eq!((g.first_seen_ms, g.last_seen_ms, g.message.as_str()), (890, 2_000, "newest"));
    assert_eq!(g.hit.as_ref().map(|h| h.index), Some(2));
    assert_eq!(g.source.tags, vec!["region:eu".to_owned()]);
    assert_eq!((groups[1].line, groups[1].count, groups[1].hit.is_none()), (9, 5, true));
}

pub(crate) async fn error_groups_are_kept_per_organization_and_bounded(b: Backend) {
    let agent = AgentId::generate();
    b.errors.record("org_b", vec![error_group(&agent, 1, 1, 5, "b")]).await.unwrap();
    let max = crate::backend::errors::MAX_ERROR_GROUPS_PER_ORG as u32;
    let updates: Vec<_> = (1..=max + 3).map(|line| error_group(&agent, line, 1, 100 + u64::from(line), "x")).collect();
    b.errors.record("org_a", updates).await.unwrap();
    let groups = b.errors.list("org_a").await.unwrap();
    assert_eq!(groups.len(), max as usize);
    assert_eq!(groups[0].line, max + 3, "newest first");
    assert!(groups.iter().all(|g| g.line > 3), "the least recently seen were forgotten");
    let other = b.errors.list("org_b").await.unwrap();
    assert_eq!((other.len(), other[0].message.as_str()), (1, "b"));
    assert!(b.errors.list("org_c").await.unwrap().is_empty());
}

/// Redaction rules and safety settings live side by side: each organization's latest
/// copy, per namespace, never one read as the other.
pub(crate) async fn settings_of_each_namespace_are_kept_apart_and_replaced_whole(b: Backend) {
    let [rules, safety] = &b.rule_stores;
    rules.save("acme", r#"{"version":1}"#.into()).await.unwrap();
    safety.save("acme", r#"{"version":1,"pauses":[]}"#.into()).await.unwrap();
    safety.save("acme", r#"{"version":2,"pauses":[{"by":"ops","at_ms":1}]}"#.into()).await.unwrap();
    safety.save("globex", r#"{"version":1}"#.into()).await.unwrap();
    let mut stored = safety.load_all().await.unwrap();
    stored.sort();
    assert_eq!(
        stored,
        [
            ("acme".to_owned(), r#"{"version":2,"pauses":[{"by":"ops","at_ms":1}]}"#.to_owned()),
            ("globex".to_owned(), r#"{"version":1}"#.to_owned())
        ],
        "the latest copy per organization"
    );
    assert_eq!(rules.load_all().await.unwrap(), [("acme".to_owned(), r#"{"version":1}"#.to_owned())]);
    let settings: crate::safety::SafetySettings = serde_json::from_str(&stored[0].1).unwrap();
    assert_eq!(settings.pauses[0].by, "ops");
}
