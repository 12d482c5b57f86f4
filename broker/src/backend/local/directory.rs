//! The agent directory of a single node: leases in a map (the registry's own checks
//! already keep one live session per agent id; the lease adds the epoch every write
//! carries), records and catalogs as published, and a bus that reaches this node only.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::FutureExt as _;
use periscope_protocol::{AgentId, BrokerMessage};
use tokio::sync::mpsc;

use crate::backend::{AgentDirectory, BackendFuture, ClusterEvent, LeaseHeld};
use crate::registry::{AgentSnapshot, PublishedCatalog};

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    leases: HashMap<AgentId, (u64, String, u32)>,
    records: HashMap<AgentId, AgentSnapshot>,
    catalogs: HashMap<AgentId, PublishedCatalog>,
    subscribers: Vec<mpsc::Sender<ClusterEvent>>,
    load: serde_json::Value,
}

/// The single-node [`AgentDirectory`].
#[derive(Debug)]
pub struct LocalDirectory {
    node: String,
    inner: Mutex<Inner>,
}

impl LocalDirectory {
    /// The directory of node `node`.
    pub fn new(node: impl Into<String>) -> LocalDirectory {
        LocalDirectory { node: node.into(), inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BackendFuture<'a, T> {
    std::future::ready(Ok(v)).boxed()
}

impl AgentDirectory for LocalDirectory {
    fn node(&self) -> &str {
        &self.node
    }

    fn acquire<'a>(&'a self, agent: &'a AgentId, host: &'a str, pid: u32) -> BackendFuture<'a, Result<u64, LeaseHeld>> {
        let mut inner = self.lock();
        if let Some((_, h, p)) = inner.leases.get(agent)
            && (h != host || *p != pid)
        {
            return ready(Err(LeaseHeld { node: self.node.clone() }));
        }
        inner.epoch += 1;
        let epoch = inner.epoch;
        inner.leases.insert(agent.clone(), (epoch, host.to_owned(), pid));
        ready(Ok(epoch))
    }

    fn renew(&self, leases: Vec<(AgentId, u64)>) -> BackendFuture<'_, Vec<AgentId>> {
        let inner = self.lock();
        let moved =
            leases.into_iter().filter(|(a, e)| inner.leases.get(a).is_none_or(|l| l.0 != *e)).map(|(a, _)| a).collect();
        ready(moved)
    }

    fn release<'a>(&'a self, agent: &'a AgentId, epoch: u64) -> BackendFuture<'a, ()> {
        let mut inner = self.lock();
        if inner.leases.get(agent).is_some_and(|l| l.0 == epoch) {
            inner.leases.remove(agent);
        }
        ready(())
    }

    fn lease<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, Option<u64>> {
        ready(self.lock().leases.get(agent).map(|l| l.0))
    }

    fn publish(&self, record: AgentSnapshot, catalog: Option<PublishedCatalog>) -> BackendFuture<'_, ()> {
        let mut inner = self.lock();
        let id = record.info.agent_id.clone();
        if let Some(c) = catalog {
            inner.catalogs.insert(id.clone(), c);
        }
        inner.records.insert(id, record);
        ready(())
    }

    fn get<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, Option<AgentSnapshot>> {
        ready(self.lock().records.get(agent).cloned())
    }

    fn all(&self) -> BackendFuture<'_, Vec<AgentSnapshot>> {
        ready(self.lock().records.values().cloned().collect())
    }

    fn catalog<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, PublishedCatalog> {
        ready(self.lock().catalogs.get(agent).cloned().unwrap_or_default())
    }

    fn forget<'a>(&'a self, agent: &'a AgentId) -> BackendFuture<'a, ()> {
        let mut inner = self.lock();
        inner.records.remove(agent);
        inner.catalogs.remove(agent);
        ready(())
    }

    fn send<'a>(&'a self, node: &'a str, agent: &'a AgentId, msg: &'a BrokerMessage) -> BackendFuture<'a, ()> {
        // One node: a message can only be for this one.
        if node == self.node {
            let mut inner = self.lock();
            inner.subscribers.retain(|s| s.try_send(ClusterEvent::Message(agent.clone(), msg.clone())).is_ok());
        }
        ready(())
    }

    fn broadcast(&self, _event: ClusterEvent) -> BackendFuture<'_, ()> {
        // No other node to tell.
        ready(())
    }

    fn heartbeat(&self, load: serde_json::Value) -> BackendFuture<'_, ()> {
        self.lock().load = load;
        ready(())
    }

    fn nodes(&self) -> BackendFuture<'_, Vec<(String, serde_json::Value)>> {
        ready(vec![(self.node.clone(), self.lock().load.clone())])
    }

    fn subscribe(&self) -> mpsc::Receiver<ClusterEvent> {
        let (tx, rx) = mpsc::channel(1_024);
        self.lock().subscribers.push(tx);
        rx
    }
}
