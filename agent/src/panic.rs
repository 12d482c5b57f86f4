//! Capture on error for panics and ERROR events: the process-wide panic hook (installed
//! once, when the first error-capture action arrives, chaining to the hook the host had
//! then) and what an occurrence says (location, type, message).
//!
//! While no error-capture action is live in any agent of the process, the hook costs one
//! atomic load before the host's own hook runs. A hook the host sets *after* ours
//! replaces it (panics are then not captured); one set before is always called.

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use periscope_agent_core::errors::ErrorOccurrence;
use periscope_protocol::{ErrorKind, HitError};
use tracing_core::Metadata;

use crate::capture::{Raw, RawField};
use crate::layer::{IN_AGENT, ProbeLayer};

/// Agents of this process with a live error-capture action.
pub(crate) static LIVE: AtomicUsize = AtomicUsize::new(0);

static INSTALL: Once = Once::new();

thread_local! {
    /// Set while this thread captures a panic: a panic inside the capture must not
    /// recurse into it.
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs the hook once per process; the host's hook (whatever was set at that
/// moment, the default one otherwise) runs after ours, every time.
pub(crate) fn ensure_installed() {
    INSTALL.call_once(|| {
        let host = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if LIVE.load(Ordering::Acquire) > 0 {
                capture(info);
            }
            host(info);
        }));
    });
}

/// Hands the panic to the agent layer of this thread's dispatcher, if it has one.
fn capture(info: &std::panic::PanicHookInfo<'_>) {
    if IN_AGENT.with(|a| a.get()) || CAPTURING.with(|c| c.replace(true)) {
        return;
    }
    tracing_core::dispatcher::get_default(|dispatch| {
        if let Some(layer) = dispatch.downcast_ref::<ProbeLayer>() {
            layer.on_panic(info, dispatch);
        }
    });
    CAPTURING.with(|c| c.set(false));
}

/// A panic's location, type (`panic`) and message (its payload when it is text).
pub(crate) fn panic_occurrence(info: &std::panic::PanicHookInfo<'_>) -> ErrorOccurrence {
    let payload = info.payload();
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    };
    let (file, line) = info.location().map_or((String::new(), 0), |l| (l.file().to_owned(), l.line()));
    let mut error = HitError { kind: ErrorKind::Panic, error_type: "panic".to_owned(), message };
    error.clip();
    ErrorOccurrence { error, file, line, module: None }
}

/// An ERROR event's location, type and message. The type is the event's `error.type`
/// (or `error_type`) field when it has one, else its target; the message is its
/// `message`, followed by its `error` field when it has one.
pub(crate) fn event_occurrence(meta: &'static Metadata<'static>, fields: &[RawField]) -> ErrorOccurrence {
    let text = |name: &str| {
        fields.iter().find(|f| f.name == name).map(|f| match &f.value {
            Raw::Str(s, _) | Raw::Debug(s, _) => s.clone(),
            Raw::Bool(b) => b.to_string(),
            Raw::I64(i) => i.to_string(),
            Raw::U64(u) => u.to_string(),
            Raw::I128(i) => i.to_string(),
            Raw::U128(u) => u.to_string(),
            Raw::F64(f) => f.to_string(),
        })
    };
    let error_type = text("error.type").or_else(|| text("error_type")).unwrap_or_else(|| meta.target().to_owned());
    let mut message = text("message").unwrap_or_default();
    if let Some(e) = text("error") {
        message = if message.is_empty() { e } else { format!("{message}: {e}") };
    }
    let mut error = HitError { kind: ErrorKind::Event, error_type, message };
    error.clip();
    ErrorOccurrence {
        error,
        file: meta.file().unwrap_or_default().to_owned(),
        line: meta.line().unwrap_or(0),
        module: meta.module_path().map(str::to_owned),
    }
}
