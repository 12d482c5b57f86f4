//! Periscope's Python agent, native part (`periscope_agent._native`): the agents' core
//! (broker session, budgets, redaction, expressions, hit queue) bound to CPython through
//! PyO3, as one abi3 extension module for CPython 3.9 and later.
//!
//! The Python package `periscope_agent` (beside this crate, in `python/`) starts the
//! agent, runs the worker thread that resolves actions to code objects and instruments
//! them (`sys.monitoring` on 3.12+, bytecode injection on 3.9 to 3.11), and keeps the
//! catalog of loaded modules. This module holds everything on the hot path (the probes)
//! and everything that must never need the GIL (the agent thread).
//!
//! # Layout
//!
//! - `agent`: the agent, its table of instrumented places, the runtime the core talks
//!   to, and the commands for the worker.
//! - `probe`: the probes, and the frame as the core's firing logic sees it.
//! - `read`: Python objects into captured values without running the host's code.
//! - `legacy`: frames already running old code on 3.9 to 3.11 (the one `unsafe` part).

/// `obj.getattr(name)` with the name interned once per call site (no string made and
/// hashed per call on the hot path).
macro_rules! attr {
    ($obj:expr, $name:literal) => {
        $obj.getattr(pyo3::intern!($obj.py(), $name))
    };
}

mod agent;
mod errors;
mod legacy;
mod probe;
mod read;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use periscope_agent_core::{AgentBuilder, RuntimeIdentity};
use periscope_protocol::{FileLines, FunctionLine, LineSet, LogLevel};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::agent::{Command, PyAgent, Slot, Table};

/// `sys.monitoring.DISABLE`, once the worker has set monitoring up.
static DISABLE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn disable(py: Python<'_>) -> Py<PyAny> {
    DISABLE.get(py).map_or_else(|| py.None(), |d| d.clone_ref(py))
}

/// Starts the agent from `options` (a dict of the builder's settings; what it leaves
/// out comes from `PERISCOPE_*` variables). Returns the agent's id.
#[pyfunction]
fn start(py: Python<'_>, options: &Bound<'_, PyDict>) -> PyResult<String> {
    if agent::current().is_some() {
        return Err(PyRuntimeError::new_err("a Periscope agent is already running in this process"));
    }
    let get = |name: &str| -> PyResult<Option<String>> {
        match options.get_item(name)? {
            Some(v) if !v.is_none() => Ok(Some(v.extract::<String>()?)),
            _ => Ok(None),
        }
    };
    let mut builder = AgentBuilder::<()>::new();
    if let Some(v) = get("broker_url")? {
        builder = builder.broker_url(v);
    }
    if let Some(v) = get("agent_key")? {
        builder = builder.agent_key(v);
    }
    if let Some(v) = get("pool")? {
        builder = builder.pool(v);
    }
    if let Some(v) = get("service")? {
        builder = builder.service(v);
    }
    if let Some(v) = get("service_version")? {
        builder = builder.service_version(v);
    }
    if let Some(v) = get("build")? {
        builder = builder.build_commit(v);
    }
    if let Some(v) = get("display_name")? {
        builder = builder.display_name(v);
    }
    if let Some(v) = get("ca_cert")? {
        builder = builder.ca_cert(v);
    }
    if let Some(tags) = options.get_item("tags")?
        && !tags.is_none()
    {
        builder = builder.tags(tags.extract::<Vec<String>>()?);
    }
    if let Some(ms) = options.get_item("reconnect_initial_ms")?
        && !ms.is_none()
    {
        builder = builder.reconnect_initial(Duration::from_millis(ms.extract::<u64>()?));
    }
    if let Some(n) = options.get_item("queue_capacity")?
        && !n.is_none()
    {
        builder = builder.queue_capacity(n.extract::<usize>()?);
    }
    builder = builder.env_defaults();
    if !builder.has_service()
        && let Some(v) = get("default_service")?
    {
        builder = builder.service(v);
    }
    let config = builder.build_config().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let identity = identity(py, get("runtime")?)?;
    let agent = PyAgent::start(config, identity).map_err(PyValueError::new_err)?;
    let id = agent.id();
    agent::replace(Some(agent));
    read::builtins(py)?;
    Ok(id)
}

fn identity(py: Python<'_>, runtime: Option<String>) -> PyResult<RuntimeIdentity> {
    let runtime = match runtime {
        Some(r) => r,
        None => {
            let v = py.version_info();
            format!("cpython {}.{}.{} ({} {})", v.major, v.minor, v.patch, std::env::consts::OS, std::env::consts::ARCH)
        }
    };
    Ok(RuntimeIdentity {
        language: "python".into(),
        runtime,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        capabilities: {
            let mut c: Vec<String> = [
                "snapshot",
                "log",
                "metric",
                "conditions",
                "locals",
                "call_stack",
                "function_duration",
                "function_probe",
            ]
            .map(str::to_owned)
            .to_vec();
            // Capture on error needs `sys.monitoring`'s PY_UNWIND (3.12+).
            if py.version_info() >= (3, 12) {
                c.push("capture_errors".to_owned());
            }
            c
        },
    })
}

/// Says goodbye to the broker and stops the agent (probes then do nothing).
#[pyfunction]
fn stop(py: Python<'_>, timeout_ms: u64) {
    if let Some(agent) = agent::replace(None) {
        py.detach(|| agent.stop(Duration::from_millis(timeout_ms)));
    }
}

/// The running agent's id (`None` when none runs).
#[pyfunction]
fn agent_id() -> Option<String> {
    agent::current().map(|a| a.id())
}

/// Waits (without the GIL) up to `timeout_ms` for the next command for the worker:
/// `("install", generation, [(index, file, line, end_file, end_line, whole_function,
/// function, calls)])` (`function` is `(module, qualname)` for a function probe, `calls`
/// whether it snapshots whole calls, so its exit is probed too),
/// `("log", level, action_id, text)`, `("stop",)` when the agent is gone, or `None`.
#[pyfunction]
fn next_command(py: Python<'_>, timeout_ms: u64) -> PyResult<Option<Py<PyAny>>> {
    let Some(agent) = agent::current() else {
        return Ok(Some(PyTuple::new(py, ["stop"])?.into_any().unbind()));
    };
    let command = py.detach(|| {
        let rx = agent.commands.lock().unwrap_or_else(|p| p.into_inner());
        rx.recv_timeout(Duration::from_millis(timeout_ms))
    });
    let command = match command {
        Ok(c) => c,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(None),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            return Ok(Some(PyTuple::new(py, ["stop"])?.into_any().unbind()));
        }
    };
    Ok(Some(match command {
        Command::Install(generation, actions) => {
            let list = PyList::empty(py);
            for (i, a) in actions.iter().enumerate() {
                let end = a.end_location();
                let whole = periscope_agent_core::fire::times_whole_scope(a);
                let function = a.spec.function.as_ref().map(|f| (f.module.clone(), f.name.clone()));
                let item = (
                    i,
                    a.spec.location.file.clone(),
                    a.spec.location.line,
                    end.map(|e| e.file.clone()),
                    end.map(|e| e.line),
                    whole,
                    a.errors.is_some(),
                    function,
                    a.probes_calls(),
                );
                list.append(item)?;
            }
            ("install", generation, list).into_pyobject(py)?.into_any().unbind()
        }
        Command::Log(level, action_id, text) => {
            let level = match level {
                LogLevel::Trace | LogLevel::Debug => 10,
                LogLevel::Info => 20,
                LogLevel::Warn => 30,
                LogLevel::Error => 40,
            };
            ("log", level, action_id.to_string(), text).into_pyobject(py)?.into_any().unbind()
        }
        Command::Reconnected => PyTuple::new(py, ["reconnected"])?.into_any().unbind(),
    }))
}

/// The local names of a code object (`co_varnames`, `co_cellvars`, `co_freevars`).
fn local_names(code: &Bound<'_, PyAny>) -> Vec<String> {
    let mut names = Vec::new();
    for attr in ["co_varnames", "co_cellvars", "co_freevars"] {
        if let Ok(t) = code.getattr(attr)
            && let Ok(t) = t.cast_into_exact::<PyTuple>()
        {
            for n in t.iter() {
                if let Ok(n) = n.cast_exact::<PyString>() {
                    names.push(n.to_string_lossy().into_owned());
                }
            }
        }
    }
    names
}

/// Installs the worker's resolution of install `generation`: `places` is a list of
/// `(role, code, line, key, actions, ends)` where role is `line`, `start` or `exit`,
/// `actions` the indices of the actions that fire there and `ends` those whose clocks
/// stop there. Reports each action's state. Returns false when a newer install is
/// already waiting (the worker then resolves that one).
#[pyfunction]
fn install(generation: u64, places: &Bound<'_, PyList>) -> PyResult<bool> {
    let Some(agent) = agent::current() else { return Ok(false) };
    let (current, actions) = agent.runtime.pending.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if current != generation {
        return Ok(false);
    }
    let (budgets, limits) = agent.runtime.params.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let redactor = agent.core().redactor();
    let mut table = Table { budgets, limits, ..Table::empty(Arc::clone(&redactor)) };
    let mut counts: HashMap<usize, u32> = HashMap::new();
    // Error captures have no place: they are armed everywhere at once.
    for (i, a) in actions.iter().enumerate() {
        if a.errors.is_some() {
            table.errors.push(Arc::clone(a));
            counts.insert(i, 1);
        }
    }
    for place in places.iter() {
        let (role, code, line, key, fire, ends): (String, Bound<'_, PyAny>, u32, u64, Vec<usize>, Vec<usize>) =
            place.extract()?;
        let pick = |idx: &[usize]| idx.iter().filter_map(|i| actions.get(*i).cloned()).collect::<Vec<_>>();
        for i in &fire {
            *counts.entry(*i).or_default() += 1;
        }
        let names = local_names(&code).into_iter().map(|n| {
            let rule = redactor.name_rule(&n);
            (n, rule)
        });
        let slot = Arc::new(Slot { actions: pick(&fire), ends: pick(&ends), names: names.collect() });
        let id = code.as_ptr() as usize;
        match role.as_str() {
            "line" => {
                table.lines.insert((id, line), Arc::clone(&slot));
            }
            "start" => {
                table.starts.insert(id, Arc::clone(&slot));
            }
            "exit" => {
                table.exits.insert(id, Arc::clone(&slot));
            }
            other => return Err(PyValueError::new_err(format!("unknown probe role `{other}`"))),
        }
        table.keys.insert(key, slot);
    }
    agent.set_table(table);
    agent.calls.keep_only(&actions);
    agent.report_installed(&actions, &counts);
    Ok(true)
}

/// One file as the worker publishes it: path, module, hash, lines, functions.
type PublishedFile = (String, Option<String>, Option<String>, Vec<u32>, Vec<(String, u32, Option<u32>)>);

/// Publishes source files to the catalog: a list of `(file, module, hash, lines,
/// functions)` with `lines` a list of line numbers and `functions` a list of
/// `(name, line, end_line)`.
#[pyfunction]
fn publish(files: &Bound<'_, PyList>) -> PyResult<()> {
    let Some(agent) = agent::current() else { return Ok(()) };
    let mut out = Vec::with_capacity(files.len());
    for f in files.iter() {
        let (file, module, hash, lines, functions): PublishedFile = f.extract()?;
        let functions =
            functions.into_iter().map(|(name, line, end_line)| FunctionLine { name, line, end_line }).collect();
        out.push(FileLines { file, module, hash, lines: LineSet::from_lines(lines), functions });
    }
    agent.runtime.publish(out);
    Ok(())
}

/// Whether `reported` (a path as the interpreter loaded it) is the file a placement
/// names (`wanted`: the same path, or a suffix of it on a `/` boundary).
#[pyfunction]
fn file_matches(wanted: &str, reported: &str) -> bool {
    periscope_protocol::action::file_matches(wanted, reported)
}

/// Tells the probes what `sys.monitoring.DISABLE` is.
#[pyfunction]
fn set_disable(py: Python<'_>, value: Py<PyAny>) {
    let _ = DISABLE.set(py, value);
}

/// `sys.monitoring` `LINE` callback.
#[pyfunction]
fn _line(py: Python<'_>, code: &Bound<'_, PyAny>, line: u32) -> Py<PyAny> {
    let found = probe::guarded(py, |py, agent| {
        let table = agent.table();
        let Some(slot) = table.lines.get(&(code.as_ptr() as usize, line)) else { return Ok(false) };
        probe::fire_slot(py, agent, &table, slot)
    });
    if found { py.None() } else { disable(py) }
}

/// `sys.monitoring` `PY_START` callback: a function with actions on its entry began.
#[pyfunction]
fn _start(py: Python<'_>, code: &Bound<'_, PyAny>, _offset: i64) -> Py<PyAny> {
    let found = probe::guarded(py, |py, agent| {
        let table = agent.table();
        let Some(slot) = table.starts.get(&(code.as_ptr() as usize)) else { return Ok(false) };
        probe::fire_slot(py, agent, &table, slot)
    });
    if found { py.None() } else { disable(py) }
}

/// `sys.monitoring` `PY_RETURN` callback: a timed or probed function returned.
#[pyfunction]
fn _return(py: Python<'_>, code: &Bound<'_, PyAny>, _offset: i64, value: &Bound<'_, PyAny>) -> Py<PyAny> {
    let found = exit(py, code, probe::Exit::Returned(value));
    if found { py.None() } else { disable(py) }
}

/// `sys.monitoring` `PY_UNWIND` callback (a global event: never disabled): a timed or
/// probed function ended by an exception.
#[pyfunction]
fn _unwind(py: Python<'_>, code: &Bound<'_, PyAny>, _offset: i64, exc: &Bound<'_, PyAny>) -> Py<PyAny> {
    exit(py, code, probe::Exit::Raised(exc));
    probe::guarded(py, |py, agent| {
        let table = agent.table();
        if !table.errors.is_empty() {
            errors::on_unwind(py, agent, &table, code, exc)?;
        }
        Ok(true)
    });
    py.None()
}

/// Sets the directories whose files are not the application's (the standard library,
/// site-packages, this package), for capture on error.
#[pyfunction]
fn set_library_paths(paths: Vec<String>) {
    errors::set_library_paths(paths);
}

fn exit(py: Python<'_>, code: &Bound<'_, PyAny>, how: probe::Exit<'_, '_>) -> bool {
    probe::guarded(py, |py, agent| {
        let table = agent.table();
        let Some(slot) = table.exits.get(&(code.as_ptr() as usize)) else { return Ok(false) };
        probe::exit_slot(py, agent, &table, slot, how)?;
        Ok(true)
    })
}

/// The probe injected before a return (3.9 to 3.11) of a function whose calls are
/// probed: `value` is what it returns.
#[pyfunction]
fn _hook_exit(py: Python<'_>, value: &Bound<'_, PyAny>, key: u64) {
    probe::guarded(py, |py, agent| {
        let table = agent.table();
        let Some(slot) = table.keys.get(&key) else { return Ok(false) };
        probe::exit_slot(py, agent, &table, slot, probe::Exit::Returned(value))?;
        Ok(true)
    });
}

/// The probe injected into bytecode (3.9 to 3.11): `key` names the place.
#[pyfunction]
fn _hook(py: Python<'_>, key: u64) {
    probe::guarded(py, |py, agent| {
        let table = agent.table();
        let Some(slot) = table.keys.get(&key) else { return Ok(false) };
        probe::fire_slot(py, agent, &table, slot)?;
        Ok(true)
    });
}

/// Gives frames of other threads that run any of `codes` (code objects just replaced
/// by injection, 3.9 to 3.11) the trace function `tracer`; returns how many it reached.
#[pyfunction]
fn trace_running(py: Python<'_>, codes: &Bound<'_, PyList>, tracer: &Bound<'_, PyAny>) -> PyResult<usize> {
    legacy::trace_running(py, codes, tracer)
}

/// The trace function of frames that were running old code (3.9 to 3.11): fires the
/// probes of their lines, and removes itself from the thread when the last such frame
/// returns.
#[pyfunction]
fn _trace(py: Python<'_>, frame: &Bound<'_, PyAny>, event: &str, _arg: &Bound<'_, PyAny>) -> Py<PyAny> {
    match event {
        "line" => {
            probe::guarded(py, |py, agent| {
                let table = agent.table();
                let code = attr!(frame, "f_code")?;
                let line: u32 = attr!(frame, "f_lineno")?.extract()?;
                let Some(slot) = table.lines.get(&(code.as_ptr() as usize, line)) else { return Ok(false) };
                probe::fire_slot(py, agent, &table, slot)?;
                Ok(true)
            });
            legacy::TRACER.get(py).map_or_else(|| py.None(), |t| t.clone_ref(py))
        }
        "return" => {
            let _ = legacy::frame_returned(py, frame);
            py.None()
        }
        "call" => py.None(),
        _ => legacy::TRACER.get(py).map_or_else(|| py.None(), |t| t.clone_ref(py)),
    }
}

/// Before `fork()`: probes stand still while the process is copied.
#[pyfunction]
fn before_fork() {
    agent::FORKING.store(true, Ordering::SeqCst);
}

/// After `fork()`, in the parent.
#[pyfunction]
fn after_fork_parent() {
    agent::FORKING.store(false, Ordering::SeqCst);
}

/// After `fork()`, in the child: the parent's agent thread does not exist here, so the
/// child gets an agent of its own (new thread, new id) that registers by itself. The
/// parent's agent is left untouched (never dropped: its locks may have been held by a
/// thread that was not copied). Returns the new id.
#[pyfunction]
fn after_fork_child(py: Python<'_>) -> PyResult<Option<String>> {
    let old = match agent::AGENT.read() {
        Ok(a) => a.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let Some(old) = old else {
        agent::FORKING.store(false, Ordering::SeqCst);
        return Ok(None);
    };
    let identity = old.runtime_identity();
    let fresh = PyAgent::start(old.config.clone(), identity).map_err(PyRuntimeError::new_err);
    let replaced = agent::replace(fresh.as_ref().ok().cloned());
    // Never dropped: see above.
    std::mem::forget(replaced);
    std::mem::forget(old);
    agent::FORKING.store(false, Ordering::SeqCst);
    let fresh = fresh?;
    let _ = py;
    Ok(Some(fresh.id()))
}

/// Counters: hits sent and dropped, probe errors swallowed.
#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    if let Some(agent) = agent::current() {
        let c = &agent.core().counters;
        d.set_item("hits_sent", c.hits_sent.load(Ordering::Relaxed))?;
        d.set_item("dropped_queue_full", c.dropped_queue_full.load(Ordering::Relaxed))?;
        d.set_item("dropped_rate", c.dropped_rate.load(Ordering::Relaxed))?;
        d.set_item("dropped_disconnected", c.dropped_disconnected.load(Ordering::Relaxed))?;
        d.set_item("dropped_open_calls", c.dropped_open_calls.load(Ordering::Relaxed))?;
        d.set_item("calls_in_flight", agent.calls.0.lock().unwrap_or_else(|p| p.into_inner()).len())?;
    }
    d.set_item("probe_errors", probe::SWALLOWED.load(Ordering::Relaxed))?;
    Ok(d)
}

/// Benchmarks only: installs a snapshot at `file:line` (with an optional `condition`)
/// directly, with budgets that never refuse, bypassing the broker and its bounds, so a
/// benchmark can measure a capture, or a condition, on every call. The worker resolves
/// and instruments it as it would a broker's action. Real deployments receive actions
/// from a broker.
#[pyfunction]
#[pyo3(signature = (file, line, condition=None, frames_with_values=None))]
fn install_for_bench(
    file: String,
    line: u32,
    condition: Option<String>,
    frames_with_values: Option<u32>,
) -> PyResult<()> {
    use periscope_agent_core::{Budgets, Installed};
    use periscope_protocol::{ActionId, ActionKind, ActionSpec, AgentQuotas, CaptureLimits, Location, SnapshotSpec};
    let Some(agent) = agent::current() else { return Err(PyRuntimeError::new_err("no agent is running")) };
    let quotas = AgentQuotas {
        snapshot_hits_per_sec: 1e12,
        snapshot_hits_per_sec_per_action: 1e12,
        cpu_fraction: 1.0,
        cpu_burst_micros: u64::MAX / 4_000,
        ..AgentQuotas::default()
    };
    let spec = ActionSpec {
        id: ActionId::generate(),
        location: Location { file, line },
        condition,
        expires_at_ms: u64::MAX,
        kind: ActionKind::Snapshot(SnapshotSpec { max_hits: u32::MAX, watch: Vec::new(), backtrace: false }),
        function: None,
        expect: None,
    };
    let action = Arc::new(Installed::new(spec, &quotas));
    if let Some(e) = &action.compile_error {
        return Err(PyValueError::new_err(e.clone()));
    }
    use periscope_agent_core::Runtime as _;
    let mut limits = CaptureLimits::default();
    if let Some(n) = frames_with_values {
        limits.frames_with_values = n;
    }
    agent.core().assume_connected_for_bench();
    agent.runtime.install(vec![action], Arc::new(Budgets::new(quotas)), limits);
    Ok(())
}

/// Benchmarks only: installs a live error-capture action directly (what capture on
/// error costs while no error happens), through the worker as a broker's would be.
#[pyfunction]
fn install_errors_for_bench() -> PyResult<()> {
    use periscope_agent_core::{Budgets, Installed, Runtime as _};
    use periscope_protocol::{ActionId, ActionKind, ActionSpec, AgentQuotas, CaptureLimits, ErrorCaptureSpec};
    let Some(agent) = agent::current() else { return Err(PyRuntimeError::new_err("no agent is running")) };
    let quotas = AgentQuotas::default();
    let spec = ActionSpec {
        id: ActionId::generate(),
        location: ErrorCaptureSpec::location(),
        condition: None,
        expires_at_ms: u64::MAX,
        kind: ActionKind::CaptureErrors(ErrorCaptureSpec::default()),
        function: None,
        expect: None,
    };
    let action = Arc::new(Installed::new(spec, &quotas));
    agent.core().assume_connected_for_bench();
    agent.runtime.install(vec![action], Arc::new(Budgets::new(quotas)), CaptureLimits::default());
    Ok(())
}

/// Benchmarks only: installs a function probe (a snapshot of whole calls) on
/// `module:qualname` keeping calls of at least `min_duration_ms`, with budgets that
/// never refuse, bypassing the broker as `install_for_bench` does.
#[pyfunction]
fn install_function_for_bench(module: String, qualname: String, min_duration_ms: u64) -> PyResult<()> {
    use periscope_agent_core::{Budgets, Installed};
    use periscope_protocol::{
        ActionId, ActionKind, ActionSpec, AgentQuotas, CaptureLimits, FunctionTarget, Location, SnapshotSpec,
    };
    let Some(agent) = agent::current() else { return Err(PyRuntimeError::new_err("no agent is running")) };
    let quotas = AgentQuotas {
        snapshot_hits_per_sec: 1e12,
        snapshot_hits_per_sec_per_action: 1e12,
        cpu_fraction: 1.0,
        cpu_burst_micros: u64::MAX / 4_000,
        ..AgentQuotas::default()
    };
    let function = FunctionTarget { name: qualname, module: Some(module), min_duration_ms: Some(min_duration_ms) };
    let spec = ActionSpec {
        id: ActionId::generate(),
        location: Location { file: function.to_string(), line: 1 },
        condition: None,
        expires_at_ms: u64::MAX,
        kind: ActionKind::Snapshot(SnapshotSpec { max_hits: u32::MAX, watch: Vec::new(), backtrace: false }),
        function: Some(Box::new(function)),
        expect: None,
    };
    let action = Arc::new(Installed::new(spec, &quotas));
    use periscope_agent_core::Runtime as _;
    agent.core().assume_connected_for_bench();
    agent.runtime.install(vec![action], Arc::new(Budgets::new(quotas)), CaptureLimits::default());
    Ok(())
}

/// Re-resolves the standard-library types shown as text (after `datetime` or
/// `decimal` load).
#[pyfunction]
fn refresh_types(py: Python<'_>) -> PyResult<()> {
    read::refresh_text_types(py)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(start, m)?)?;
    m.add_function(wrap_pyfunction!(stop, m)?)?;
    m.add_function(wrap_pyfunction!(agent_id, m)?)?;
    m.add_function(wrap_pyfunction!(next_command, m)?)?;
    m.add_function(wrap_pyfunction!(install, m)?)?;
    m.add_function(wrap_pyfunction!(publish, m)?)?;
    m.add_function(wrap_pyfunction!(file_matches, m)?)?;
    m.add_function(wrap_pyfunction!(set_disable, m)?)?;
    m.add_function(wrap_pyfunction!(_line, m)?)?;
    m.add_function(wrap_pyfunction!(_start, m)?)?;
    m.add_function(wrap_pyfunction!(_return, m)?)?;
    m.add_function(wrap_pyfunction!(_unwind, m)?)?;
    m.add_function(wrap_pyfunction!(set_library_paths, m)?)?;
    m.add_function(wrap_pyfunction!(_hook, m)?)?;
    m.add_function(wrap_pyfunction!(_hook_exit, m)?)?;
    m.add_function(wrap_pyfunction!(_trace, m)?)?;
    m.add_function(wrap_pyfunction!(trace_running, m)?)?;
    m.add_function(wrap_pyfunction!(before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(after_fork_parent, m)?)?;
    m.add_function(wrap_pyfunction!(after_fork_child, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(refresh_types, m)?)?;
    m.add_function(wrap_pyfunction!(install_for_bench, m)?)?;
    m.add_function(wrap_pyfunction!(install_errors_for_bench, m)?)?;
    m.add_function(wrap_pyfunction!(install_function_for_bench, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
