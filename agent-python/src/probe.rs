//! The probes: what runs on the host's thread when instrumented code reaches a place
//! with actions. Called by `sys.monitoring` (3.12+) or by injected bytecode (3.9 to
//! 3.11) with the GIL held; each finds its slot in the table, then hands the firing to
//! the core ([`periscope_agent_core::fire::fire`]) through [`FrameSite`], which reads
//! the frame's locals lazily and without running the host's code (`read.rs`).
//!
//! A probe never raises into the host and never panics into it: every error is
//! swallowed (and counted), and a panic is caught at the boundary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use periscope_agent_core::fire::{Need, Site, start_thread_clock, stop_thread_clock};
use periscope_agent_core::{Installed, client_value, redaction_limits};
use periscope_protocol::expr::Roots;
use periscope_protocol::{CaptureLimits, Field, HitLocation, Scope, SpanFrame, ThreadInfo, Value};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};

use crate::agent::{Calls, HeldCall, Payload, PyAgent, Slot, Table};
use crate::read::{NODE_BUDGET, Reader};

/// Probe errors and panics swallowed so far (the host never sees them).
pub(crate) static SWALLOWED: AtomicU64 = AtomicU64::new(0);

/// Interpreter objects the probes use, resolved once.
struct Handles {
    getframe: Py<PyAny>,
    get_ident: Py<PyAny>,
    /// `type(f_locals)` of a function frame: `dict` before 3.13, `FrameLocalsProxy` after.
    locals_type: Py<PyAny>,
}

static HANDLES: PyOnceLock<Handles> = PyOnceLock::new();

fn handles(py: Python<'_>) -> PyResult<&'static Handles> {
    HANDLES.get_or_try_init(py, || {
        let sys = py.import("sys")?;
        let getframe = attr!(sys, "_getframe")?;
        let get_ident = py.import("_thread")?.getattr("get_ident")?;
        let probe = py.eval(c"(lambda: __import__('sys')._getframe().f_locals)()", None, None)?;
        Ok(Handles {
            getframe: getframe.unbind(),
            get_ident: get_ident.unbind(),
            locals_type: probe.get_type().into_any().unbind(),
        })
    })
}

/// Runs `f` for the current agent, swallowing every error and panic.
pub(crate) fn guarded(py: Python<'_>, f: impl FnOnce(Python<'_>, &Arc<PyAgent>) -> PyResult<bool>) -> bool {
    let Some(agent) = crate::agent::current() else { return false };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(py, &agent)));
    match outcome {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            SWALLOWED.fetch_add(1, Ordering::Relaxed);
            // Leave no exception set behind for the host.
            drop(e);
            true
        }
        Err(_) => {
            SWALLOWED.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// Fires `slot` in the frame that is running now. `Ok(false)` says the place may stop
/// reporting until the broker is back (`sys.monitoring.DISABLE`): no session is up and
/// all it holds are captures, which are counted as drops. The worker re-enables such
/// places when a session begins (`Command::Reconnected`).
pub(crate) fn fire_slot(py: Python<'_>, agent: &PyAgent, table: &Table, slot: &Slot) -> PyResult<bool> {
    // Nothing captured here could be delivered (no broker session, or the hit queue
    // full): counted as drops, and the frame is not even looked at.
    let core = agent.core();
    if !core.can_capture() && core.refuse_undeliverable(&slot.actions, &slot.ends) {
        // A full queue drains by itself, with nothing to re-enable the place after it:
        // only a missing session silences it.
        return Ok(core.is_connected());
    }
    let frame = handles(py)?.getframe.bind(py).call1((0,))?;
    let mut site = FrameSite::new(py, frame, table, slot, &agent.calls);
    periscope_agent_core::fire::fire(agent.core(), &table.budgets, &slot.actions, &slot.ends, &mut site);
    Ok(true)
}

/// How a probed function ended.
#[derive(Clone, Copy)]
pub(crate) enum Exit<'a, 'py> {
    /// It returned this value.
    Returned(&'a Bound<'py, PyAny>),
    /// It raised this exception.
    Raised(&'a Bound<'py, PyAny>),
}

/// Fires `slot` at the exit of the frame running now: its durations stop, and the calls
/// its function probes held for this frame finish (a hit when slow enough, with the
/// arguments read at entry and the return value or exception, read only then).
pub(crate) fn exit_slot(
    py: Python<'_>,
    agent: &PyAgent,
    table: &Table,
    slot: &Slot,
    how: Exit<'_, '_>,
) -> PyResult<()> {
    let frame = handles(py)?.getframe.bind(py).call1((0,))?;
    let frame_id = frame.as_ptr() as usize;
    let core = agent.core();
    let mut site = FrameSite::new(py, frame, table, slot, &agent.calls);
    periscope_agent_core::fire::fire(core, &table.budgets, &slot.actions, &slot.ends, &mut site);
    for action in slot.ends.iter().filter(|a| a.probes_calls()) {
        let Some(mut held) = agent.calls.take(action, frame_id) else { continue };
        // The slot is given back by `finish_call`, not by the drop.
        held.action = None;
        let outcome = match how {
            Exit::Returned(_) => periscope_protocol::CallOutcome::Returned,
            Exit::Raised(_) => periscope_protocol::CallOutcome::Raised,
        };
        site.exit = Some((std::mem::take(&mut held.location), std::mem::take(&mut held.args), how));
        periscope_agent_core::fire::finish_call(core, &table.budgets, action, held.started, outcome, &mut site);
        site.exit = None;
    }
    Ok(())
}

/// The running frame as the core's firing logic sees it.
struct FrameSite<'a, 'py> {
    py: Python<'py>,
    frame: Bound<'py, PyAny>,
    table: &'a Table,
    slot: &'a Slot,
    /// Where function probes hold their calls in flight.
    calls: &'a Calls,
    /// At a probed call's exit: where it was entered, its arguments, how it ended.
    exit: Option<(HitLocation, Vec<Field>, Exit<'a, 'py>)>,
    /// The frame's locals mapping, once looked up.
    locals: Option<Option<Bound<'py, PyAny>>>,
    /// Locals expressions have read, as a client sees them.
    values: Vec<(String, Value)>,
    /// Caller frames (function name, frame), once walked.
    spans: Option<Vec<(String, Bound<'py, PyAny>)>>,
    /// Caller locals expressions have read: (frame index, name, value).
    span_values: Vec<(usize, String, Value)>,
}

/// A frame's locals mapping when it is one we can read without running user code: a
/// `dict` (before 3.13) or the interpreter's own `FrameLocalsProxy` (3.13+).
pub(crate) fn locals_of<'py>(frame: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    let py = frame.py();
    let locals = attr!(frame, "f_locals").ok()?;
    let h = handles(py).ok()?;
    (locals.is_exact_instance_of::<PyDict>() || locals.get_type().is(h.locals_type.bind(py))).then_some(locals)
}

/// One local by name (C code over a dict or the frame's own storage).
fn local<'py>(locals: &Bound<'py, PyAny>, name: &str) -> Option<Bound<'py, PyAny>> {
    if let Ok(d) = locals.cast::<PyDict>() {
        return d.get_item(name).ok().flatten();
    }
    locals.get_item(name).ok()
}

/// Every local, in the frame's order.
pub(crate) fn all_locals<'py>(locals: &Bound<'py, PyAny>) -> Vec<(String, Bound<'py, PyAny>)> {
    let mut out = Vec::new();
    let items = match locals.cast::<PyDict>() {
        Ok(d) => d.items().into_any(),
        Err(_) => match locals.call_method0("items") {
            Ok(i) => i,
            Err(_) => return out,
        },
    };
    let Ok(iter) = items.try_iter() else { return out };
    for item in iter.flatten() {
        let (Ok(k), Ok(v)) = (item.get_item(0), item.get_item(1)) else { continue };
        if let Ok(k) = k.cast_exact::<PyString>() {
            out.push((k.to_string_lossy().into_owned(), v));
        }
    }
    out
}

pub(crate) fn code_name(code: &Bound<'_, PyAny>) -> String {
    let name = attr!(code, "co_qualname").or_else(|_| attr!(code, "co_name"));
    name.ok()
        .and_then(|n| n.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

fn string_attr(obj: &Bound<'_, PyAny>, name: &str) -> Option<String> {
    let v = obj.getattr(name).ok()?;
    v.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())
}

/// The module a frame runs in (`__name__` of its globals).
pub(crate) fn module_of(frame: &Bound<'_, PyAny>) -> Option<String> {
    let globals = attr!(frame, "f_globals").ok()?;
    let globals = globals.cast_exact::<PyDict>().ok()?;
    let name = globals.get_item("__name__").ok().flatten()?;
    name.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())
}

impl<'a, 'py> FrameSite<'a, 'py> {
    fn new(py: Python<'py>, frame: Bound<'py, PyAny>, table: &'a Table, slot: &'a Slot, calls: &'a Calls) -> Self {
        FrameSite {
            py,
            frame,
            table,
            slot,
            calls,
            exit: None,
            locals: None,
            values: Vec::new(),
            spans: None,
            span_values: Vec::new(),
        }
    }

    /// Where the frame is, for a hit.
    fn location(&self) -> HitLocation {
        let code = attr!(self.frame, "f_code").ok();
        HitLocation {
            file: code.as_ref().and_then(|c| string_attr(c, "co_filename")).unwrap_or_default(),
            line: attr!(self.frame, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok()).unwrap_or(0),
            module: module_of(&self.frame),
            name: code.as_ref().map(code_name),
        }
    }

    fn locals(&mut self) -> Option<Bound<'py, PyAny>> {
        if self.locals.is_none() {
            self.locals = Some(locals_of(&self.frame));
        }
        self.locals.clone().flatten()
    }

    fn rule(&self, name: &str) -> periscope_redaction::NameRule {
        match self.slot.names.iter().find(|(n, _)| n == name) {
            Some((_, rule)) => *rule,
            None => self.table.redactor.name_rule(name),
        }
    }

    /// A value as a client will see it: read within the redaction limits, redacted
    /// under its name, cut.
    fn client(&self, name: &str, obj: &Bound<'py, PyAny>) -> Value {
        let limits = redaction_limits(&self.table.limits);
        let value = match Reader::new(self.py, &limits, NODE_BUDGET / 4) {
            Ok(mut r) => r.read(obj),
            Err(_) => Value::Null,
        };
        client_value(value, &self.table.limits, &self.table.redactor, self.rule(name))
    }

    fn callers(&mut self) -> &[(String, Bound<'py, PyAny>)] {
        if self.spans.is_none() {
            let max = self.table.limits.max_frames as usize;
            let mut out = Vec::new();
            let mut frame = attr!(self.frame, "f_back").ok();
            while let Some(f) = frame.filter(|f| !f.is_none()) {
                if out.len() >= max {
                    break;
                }
                let name = attr!(f, "f_code").map(|c| code_name(&c)).unwrap_or_default();
                frame = attr!(f, "f_back").ok();
                out.push((name, f));
            }
            self.spans = Some(out);
        }
        self.spans.as_deref().unwrap_or_default()
    }
}

/// What a condition or metric value reads: the locals it names (and callers' locals
/// for `span.` paths), each built once per firing.
struct FrameScope<'s> {
    values: &'s [(String, Value)],
    spans: &'s [(String, Bound<'s, PyAny>)],
    span_values: &'s [(usize, String, Value)],
}

impl Scope for FrameScope<'_> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&Value> {
        let frames: Vec<usize> = match span {
            Some(s) => self
                .spans
                .iter()
                .enumerate()
                .filter(|(_, (n, _))| n == s || n.rsplit('.').next() == Some(s))
                .map(|(i, _)| i)
                .take(1)
                .collect(),
            None => (0..self.spans.len()).collect(),
        };
        frames.into_iter().find_map(|i| self.span_values.iter().find(|(j, n, _)| *j == i && n == field).map(|t| &t.2))
    }

    fn has_span(&self, name: &str) -> bool {
        self.spans.iter().any(|(n, _)| n == name || n.rsplit('.').next() == Some(name))
    }
}

impl<'a, 'py> Site for FrameSite<'a, 'py> {
    type Payload = Payload;
    type Scope<'s>
        = FrameScope<'s>
    where
        Self: 's;

    fn scope(&mut self, roots: &Roots) -> FrameScope<'_> {
        if let Some(locals) = self.locals() {
            for name in &roots.fields {
                if self.values.iter().any(|(n, _)| n == name) {
                    continue;
                }
                if let Some(obj) = local(&locals, name) {
                    let v = self.client(name, &obj);
                    self.values.push((name.clone(), v));
                }
            }
        }
        if roots.uses_spans() {
            let with_values = self.table.limits.frames_with_values as usize;
            let frames: Vec<Bound<'py, PyAny>> =
                self.callers().iter().take(with_values).map(|(_, f)| f.clone()).collect();
            for (i, f) in frames.iter().enumerate() {
                let Some(locals) = locals_of(f) else { continue };
                for name in &roots.span_fields {
                    if self.span_values.iter().any(|(j, n, _)| *j == i && n == name) {
                        continue;
                    }
                    if let Some(obj) = local(&locals, name) {
                        let v = self.client(name, &obj);
                        self.span_values.push((i, name.clone(), v));
                    }
                }
            }
        }
        let spans = self.spans.as_deref().unwrap_or_default();
        FrameScope { values: &self.values, spans, span_values: &self.span_values }
    }

    /// A snapshot reads every local and the call stack; a log line only the locals
    /// (and callers' locals) its template names.
    fn capture(&mut self, need: Need<'_>) -> Payload {
        let wanted: Option<&Roots> = match need {
            Need::Snapshot { .. } => None,
            Need::Log { roots } => Some(roots),
        };
        let py = self.py;
        let limits: CaptureLimits = redaction_limits(&self.table.limits);
        let mut reader = match Reader::new(py, &limits, NODE_BUDGET) {
            Ok(r) => r,
            Err(_) => {
                return Payload {
                    location: HitLocation::default(),
                    locals: Vec::new(),
                    frames: Vec::new(),
                    backtrace: None,
                };
            }
        };
        let location = self.location();
        let read_locals = |locals: Option<Bound<'py, PyAny>>, only: Option<&[String]>, reader: &mut Reader<'_>| {
            let Some(locals) = locals else { return Vec::new() };
            all_locals(&locals)
                .into_iter()
                .filter(|(name, _)| only.is_none_or(|names| names.iter().any(|n| n == name)))
                .take(limits.max_fields as usize)
                .map(|(name, obj)| {
                    let v = reader.read(&obj);
                    Field::new(name, v)
                })
                .collect::<Vec<Field>>()
        };
        let (location, locals) = match self.exit.take() {
            // A call's exit: the arguments as they were at entry, then how it ended.
            Some((entered, mut args, how)) => {
                args.push(match how {
                    Exit::Returned(value) => Field::new("return", reader.read(value)),
                    Exit::Raised(exc) => Field::new("exception", reader.exception(exc)),
                });
                (entered, args)
            }
            None => (location, read_locals(self.locals(), wanted.map(|r| &r.fields[..]), &mut reader)),
        };
        let with_values = self.table.limits.frames_with_values as usize;
        let callers: Vec<(String, Bound<'py, PyAny>)> =
            if wanted.is_some_and(|r| !r.uses_spans()) { Vec::new() } else { self.callers().to_vec() };
        let frames = callers
            .iter()
            .enumerate()
            .map(|(i, (name, f))| {
                let code = attr!(f, "f_code").ok();
                SpanFrame {
                    name: name.clone(),
                    target: module_of(f),
                    file: code.as_ref().and_then(|c| string_attr(c, "co_filename")),
                    line: attr!(f, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok()),
                    fields: if i < with_values {
                        read_locals(locals_of(f), wanted.map(|r| &r.span_fields[..]), &mut reader)
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Payload { location, locals, frames, backtrace: None }
    }

    fn thread(&mut self) -> ThreadInfo {
        thread_info(self.py).unwrap_or_else(|| ThreadInfo { name: None, id: String::new() })
    }

    fn start_clock(&mut self, action: &Arc<Installed>, now: u64) {
        start_thread_clock(action, self.frame.as_ptr() as usize, now);
    }

    fn stop_clock(&mut self, action: &Arc<Installed>) -> Option<u64> {
        stop_thread_clock(action, self.frame.as_ptr() as usize)
    }

    /// Reads the arguments (at entry the frame's locals are its arguments) and holds
    /// them, by action and frame, until the frame returns or raises.
    fn begin_call(&mut self, action: &Arc<Installed>, started: u64) {
        let limits = redaction_limits(&self.table.limits);
        let args = match (Reader::new(self.py, &limits, NODE_BUDGET), self.locals()) {
            (Ok(mut reader), Some(locals)) => all_locals(&locals)
                .into_iter()
                .take(limits.max_fields as usize)
                .map(|(name, obj)| Field::new(name, reader.read(&obj)))
                .collect(),
            _ => Vec::new(),
        };
        let held = HeldCall { action: Some(Arc::clone(action)), started, location: self.location(), args };
        // A refused call gives its slot back as it drops.
        let _ = self.calls.hold(action, self.frame.as_ptr() as usize, held);
    }
}

/// The thread's identity and name, and the asyncio task running on it, read without
/// calling anything a user could have overridden.
pub(crate) fn thread_info(py: Python<'_>) -> Option<ThreadInfo> {
    let h = handles(py).ok()?;
    let ident = h.get_ident.bind(py).call0().ok()?;
    let id = ident.extract::<u64>().ok()?;
    let modules = py.import("sys").ok()?.getattr("modules").ok()?;
    let modules = modules.cast_into_exact::<PyDict>().ok()?;
    let mut name = None;
    if let Some(threading) = modules.get_item("threading").ok().flatten()
        && let Ok(active) = attr!(threading, "_active")
        && let Ok(active) = active.cast_exact::<PyDict>()
        && let Some(thread) = active.get_item(&ident).ok().flatten()
    {
        name = crate::read::instance_str(py, &thread, "_name");
    }
    if let Some(task_name) = current_task_name(&modules) {
        name = Some(match name {
            Some(n) => format!("{n} (task {task_name})"),
            None => format!("task {task_name}"),
        });
    }
    Some(ThreadInfo { name, id: id.to_string() })
}

/// The name of the asyncio task running on this thread, if any: the C accelerator's
/// own table of current tasks (by loop identity, never hashing the loop), and the
/// task's name only when it is the C `Task` itself.
fn current_task_name(modules: &Bound<'_, PyDict>) -> Option<String> {
    let asyncio = modules.get_item("_asyncio").ok().flatten()?;
    let loop_ = attr!(asyncio, "_get_running_loop").ok()?.call0().ok()?;
    if loop_.is_none() {
        return None;
    }
    let task_type = attr!(asyncio, "Task").ok()?;
    let task = match attr!(asyncio, "current_task") {
        // 3.12+: a C function.
        Ok(current) => current.call1((&loop_,)).ok()?,
        // 3.9 to 3.11: the accelerator's dict of current tasks.
        Err(_) => {
            let tasks = attr!(asyncio, "_current_tasks").ok()?;
            let tasks = tasks.cast_into_exact::<PyDict>().ok()?;
            tasks.iter().find_map(|(k, v)| k.is(&loop_).then_some(v))?
        }
    };
    if !task.get_type().is(&task_type) {
        return None;
    }
    let name = task.call_method0("get_name").ok()?;
    name.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())
}
