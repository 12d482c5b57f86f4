//! Action events over Redis pub/sub: a change on any node is published on one channel;
//! every node forwards what it hears to its own waiters (a [`LocalEvents`]). A node that
//! lost its subscription (Redis restarted, a network cut) wakes all its waiters once it
//! is back, so none waits on an event it missed; waiters also re-read every couple of
//! seconds regardless.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use periscope_protocol::ActionId;
use tokio::sync::{mpsc, watch};

use super::Redis;
use crate::backend::ActionEvents;
use crate::backend::local::LocalEvents;

/// Events published but not yet sent; beyond it, publishing drops (waiters re-read by
/// themselves within seconds).
const PUBLISH_QUEUE: usize = 4_096;

/// The shared [`ActionEvents`]; see the module docs.
#[derive(Debug)]
pub struct RedisEvents {
    local: Arc<LocalEvents>,
    publish: mpsc::Sender<ActionId>,
}

impl RedisEvents {
    /// Events on `redis`'s channel; the tasks that publish and subscribe run until
    /// `stop` says so.
    pub fn start(redis: Redis, mut stop: watch::Receiver<bool>) -> Arc<RedisEvents> {
        let local = Arc::new(LocalEvents::default());
        let (tx, mut rx) = mpsc::channel::<ActionId>(PUBLISH_QUEUE);
        let channel = redis.key("events");
        let publisher = redis.clone();
        let ch = channel.clone();
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let _ = publisher.query::<i64>(redis::cmd("PUBLISH").arg(&ch).arg(id.as_str())).await;
            }
        });
        let waiters = Arc::clone(&local);
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                match redis.pubsub().await {
                    Ok(mut sub) => {
                        if sub.subscribe(&channel).await.is_ok() {
                            // Whatever happened while we were away is news now.
                            waiters.wake_all();
                            let mut messages = sub.on_message();
                            loop {
                                tokio::select! {
                                    msg = messages.next() => match msg {
                                        Some(m) => {
                                            if let Ok(id) = m.get_payload::<String>().map(|s| ActionId::parse(&s))
                                                && let Ok(id) = id
                                            {
                                                waiters.changed(&id);
                                            }
                                        }
                                        None => break,
                                    },
                                    _ = stop.changed() => return,
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "action events: cannot subscribe yet"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stop.changed() => return,
                }
            }
        });
        Arc::new(RedisEvents { local, publish: tx })
    }
}

impl ActionEvents for RedisEvents {
    fn subscribe(&self, id: &ActionId) -> watch::Receiver<u64> {
        self.local.subscribe(id)
    }

    fn changed(&self, id: &ActionId) {
        // This node's waiters at once; the others through Redis.
        self.local.changed(id);
        let _ = self.publish.try_send(id.clone());
    }
}
