//! Action events within one process: a `watch` channel per action someone waits on,
//! dropped when its last waiter goes.

use std::collections::HashMap;
use std::sync::Mutex;

use periscope_protocol::ActionId;
use tokio::sync::watch;

use crate::backend::ActionEvents;

/// The single-node [`ActionEvents`].
#[derive(Debug, Default)]
pub struct LocalEvents {
    waiters: Mutex<HashMap<ActionId, watch::Sender<u64>>>,
}

impl LocalEvents {
    /// Actions with waiters now.
    pub fn watched(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wakes every waiter of every action (after the events may have been missed, e.g.
    /// a lost subscription to another node's events).
    pub fn wake_all(&self) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for tx in waiters.values() {
            tx.send_modify(|v| *v += 1);
        }
    }
}

impl ActionEvents for LocalEvents {
    fn subscribe(&self, id: &ActionId) -> watch::Receiver<u64> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Forget actions nobody waits on any more, a few at a time, so the map stays the
        // size of what is waited on.
        if waiters.len() > 64 {
            waiters.retain(|_, tx| tx.receiver_count() > 0);
        }
        waiters.entry(id.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn changed(&self, id: &ActionId) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = waiters.get(id) {
            if tx.receiver_count() == 0 {
                waiters.remove(id);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }
}
