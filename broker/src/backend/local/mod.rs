//! The single-node backend: the broker's state in this process's memory, persisted to
//! SQLite under `--data-dir` (or a scratch directory).
//!
//! - [`actions`]: [`MemoryActions`], the [`crate::backend::ActionStore`].
//! - [`live_index`]: live actions by expiry, key and organization.
//! - [`retention`]: which ended actions are kept, per organization and fair per key.
//! - [`keys`]: [`SqliteKeys`], the [`crate::backend::KeyBackend`] in the database.
//! - [`events`]: [`LocalEvents`], the [`crate::backend::ActionEvents`].
//! - [`audit`]: [`SqliteAudit`], the audit sink and reader.
//! - [`rules`]: [`SqliteRules`], the [`crate::backend::RuleStore`].
//! - [`errors`]: [`MemoryErrors`], the [`crate::backend::ErrorStore`] (in memory).
//! - [`directory`]: [`LocalDirectory`], the [`crate::backend::AgentDirectory`] of one node.

pub mod actions;
pub mod audit;
pub mod directory;
pub mod errors;
pub mod events;
pub mod keys;
pub mod live_index;
pub mod retention;
pub mod rules;

pub use actions::MemoryActions;
pub use audit::SqliteAudit;
pub use directory::LocalDirectory;
pub use errors::MemoryErrors;
pub use events::LocalEvents;
pub use keys::SqliteKeys;
pub use rules::SqliteRules;

#[cfg(test)]
mod conformance {
    use std::sync::Arc;

    use crate::backend::conformance::{Backend, conformance_suite};

    async fn memory() -> Backend {
        let dir = crate::store::ScratchDir::new().expect("a scratch directory");
        let keys = Arc::new(super::SqliteKeys::open(dir.path()).expect("a database"));
        Backend {
            actions: Arc::new(super::MemoryActions::new(3, None)),
            events: Arc::new(super::LocalEvents::default()),
            keys,
            budgets: Arc::new(crate::quota::LocalBudgets::default()),
            directory: Arc::new(super::LocalDirectory::new("n1")),
            errors: Arc::new(super::MemoryErrors::default()),
            rule_stores: [
                Arc::new(super::SqliteRules::new(None, Vec::new())),
                Arc::new(super::SqliteRules::namespaced(crate::safety::NAMESPACE, None, Vec::new())),
            ],
            _keep: Box::new(dir),
        }
    }

    conformance_suite!(memory);
}
