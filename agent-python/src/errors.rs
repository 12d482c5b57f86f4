//! Capture on error for Python (3.12+): an exception escaping a function of the
//! application's own code. `sys.monitoring`'s `PY_UNWIND` (enabled globally, on our tool
//! id, only while an error-capture action is live) reports every frame an exception
//! leaves; the probe here keeps those that are the application's and where no deeper
//! frame of the traceback is (so an exception is captured once, at the first
//! application function it escapes, however far it then propagates).
//!
//! Application code is every file not under the interpreter's library directories
//! (stdlib, site-packages, dist-packages, the user site, this agent's own package; the
//! worker computes them with `sysconfig` and `site` at start, [`set_library_paths`])
//! and not a `<frozen ...>` or `<string>` pseudo-file. An exception raised and caught
//! inside the standard library, or escaping only library code, is never captured.
//!
//! Nothing here runs the host's code: the exception's `args` and `__traceback__` are
//! read through `BaseException`'s own C descriptors, tracebacks and frames through
//! their C attributes, values through the reader (`read.rs`).

use std::sync::RwLock;

use periscope_agent_core::errors::ErrorOccurrence;
use periscope_agent_core::fire::{Need, Site};
use periscope_agent_core::{Installed, redaction_limits};
use periscope_protocol::expr::Roots;
use periscope_protocol::{ErrorKind, Field, HitError, HitLocation, SpanFrame, ThreadInfo, Value};
use pyo3::exceptions::{PyBaseException, PyGeneratorExit, PyStopAsyncIteration, PyStopIteration, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::agent::{Payload, PyAgent, Table};
use crate::read::{NODE_BUDGET, Reader};

/// Directories whose files are not the application's (see the module docs).
static LIBRARY_PATHS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Most traceback entries walked per check (deeper ones are treated as library code).
const MAX_TRACEBACK: usize = 512;

/// Sets the library directories (each ending without a separator).
pub(crate) fn set_library_paths(paths: Vec<String>) {
    let mut paths: Vec<String> =
        paths.into_iter().map(|p| p.trim_end_matches('/').to_owned()).filter(|p| !p.is_empty()).collect();
    paths.sort();
    paths.dedup();
    match LIBRARY_PATHS.write() {
        Ok(mut l) => *l = paths,
        Err(p) => *p.into_inner() = paths,
    }
}

/// Whether `file` (a code object's `co_filename`) is the application's.
pub(crate) fn is_app_file(file: &str) -> bool {
    if file.is_empty() || file.starts_with('<') {
        return false;
    }
    let paths = LIBRARY_PATHS.read().unwrap_or_else(|p| p.into_inner());
    !paths.iter().any(|dir| file.strip_prefix(dir.as_str()).is_some_and(|rest| rest.starts_with('/')))
}

fn filename(code: &Bound<'_, PyAny>) -> Option<String> {
    let f = attr!(code, "co_filename").ok()?;
    f.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())
}

/// `BaseException`'s own descriptor `name` applied to `exc` (no user code).
fn exc_attr<'py>(exc: &Bound<'py, PyAny>, name: &str) -> Option<Bound<'py, PyAny>> {
    let py = exc.py();
    let descr = py.get_type::<PyBaseException>().getattr(name).ok()?;
    descr.call_method1(pyo3::intern!(py, "__get__"), (exc, exc.get_type())).ok()
}

/// Whether `code` (the frame being unwound) should capture `exc`: it is the
/// application's, the exception is a failure (not the end of an iteration, a closed
/// generator or an exit), and no deeper frame of its traceback is the application's.
fn first_app_frame(code: &Bound<'_, PyAny>, exc: &Bound<'_, PyAny>) -> Option<String> {
    let file = filename(code)?;
    if !is_app_file(&file) {
        return None;
    }
    if exc.is_instance_of::<PyStopIteration>()
        || exc.is_instance_of::<PyStopAsyncIteration>()
        || exc.is_instance_of::<PyGeneratorExit>()
        || exc.is_instance_of::<PySystemExit>()
    {
        return None;
    }
    let mut tb = exc_attr(exc, "__traceback__").filter(|t| !t.is_none())?;
    // The head is this frame's entry; any deeper application frame captured it already.
    for _ in 0..MAX_TRACEBACK {
        let next = attr!(tb, "tb_next").ok().filter(|t| !t.is_none());
        let Some(next) = next else { return Some(file) };
        let deeper_file = attr!(next, "tb_frame").ok().and_then(|f| attr!(f, "f_code").ok()).and_then(|c| filename(&c));
        if deeper_file.as_deref().is_some_and(is_app_file) {
            return None;
        }
        tb = next;
    }
    Some(file)
}

/// The exception's type (`module.QualName`, builtins bare) and message (its `args`:
/// text as is, anything else as the reader sees it).
fn describe(py: Python<'_>, exc: &Bound<'_, PyAny>, table: &Table) -> (String, String) {
    let ty = exc.get_type();
    let name = ty.qualname().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".to_owned());
    let module = ty.module().map(|m| m.to_string()).unwrap_or_default();
    let error_type = if module.is_empty() || module == "builtins" { name } else { format!("{module}.{name}") };
    let mut parts = Vec::new();
    if let Some(args) = exc_attr(exc, "args")
        && let Ok(args) = args.cast_into_exact::<PyTuple>()
    {
        let limits = redaction_limits(&table.limits);
        for arg in args.iter().take(8) {
            if let Ok(s) = arg.cast_exact::<PyString>() {
                parts.push(s.to_string_lossy().into_owned());
            } else if let Ok(mut reader) = Reader::new(py, &limits, NODE_BUDGET / 8) {
                parts.push(match reader.read(&arg) {
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => f.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Str(t) => t.value,
                    Value::Null => "None".to_owned(),
                    _ => format!("<{}>", reader.type_name(&arg)),
                });
            }
        }
    }
    (error_type, parts.join(", "))
}

/// Counts (and, when due, captures) an exception escaping the application's `code`.
pub(crate) fn on_unwind(
    py: Python<'_>,
    agent: &PyAgent,
    table: &Table,
    code: &Bound<'_, PyAny>,
    exc: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let Some(file) = first_app_frame(code, exc) else { return Ok(()) };
    let frame = py.import("sys")?.getattr("_getframe")?.call1((0,))?;
    let line = attr!(frame, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok()).unwrap_or(0);
    let module = crate::probe::module_of(&frame);
    let (error_type, message) = describe(py, exc, table);
    let mut error = HitError { kind: ErrorKind::Exception, error_type, message };
    error.clip();
    let occurrence = ErrorOccurrence { error, file, line, module };
    let mut site = ErrorSite { py, frame, exc: exc.clone(), table };
    periscope_agent_core::errors::fire_error(agent.core(), &table.budgets, &table.errors, &occurrence, &mut site);
    Ok(())
}

/// The unwinding frame as the core sees it: no expressions (an error capture has no
/// condition), a capture of the application's frames and the whole traceback's text.
struct ErrorSite<'a, 'py> {
    py: Python<'py>,
    frame: Bound<'py, PyAny>,
    exc: Bound<'py, PyAny>,
    table: &'a Table,
}

/// An empty scope: error captures evaluate no expression.
struct NoScope;

impl periscope_protocol::Scope for NoScope {
    fn field(&self, _name: &str) -> Option<&Value> {
        None
    }
    fn span_field(&self, _span: Option<&str>, _field: &str) -> Option<&Value> {
        None
    }
    fn has_span(&self, _name: &str) -> bool {
        false
    }
}

fn frame_text(frame: &Bound<'_, PyAny>, line: Option<u32>) -> String {
    let code = attr!(frame, "f_code").ok();
    let name = code.as_ref().map(crate::probe::code_name).unwrap_or_default();
    let file = code.as_ref().and_then(filename).unwrap_or_default();
    let line = line.or_else(|| attr!(frame, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok())).unwrap_or(0);
    format!("{name} at {file}:{line}")
}

impl Site for ErrorSite<'_, '_> {
    type Payload = Payload;
    type Scope<'s>
        = NoScope
    where
        Self: 's;

    fn scope(&mut self, _roots: &Roots) -> NoScope {
        NoScope
    }

    /// The unwinding frame's locals, its application callers (the frames the exception
    /// leaves next unless one catches it) with their locals, and the traceback's text:
    /// the frames below (where it was raised) and every caller.
    fn capture(&mut self, _need: Need<'_>) -> Payload {
        let py = self.py;
        let limits = redaction_limits(&self.table.limits);
        let empty =
            || Payload { location: HitLocation::default(), locals: Vec::new(), frames: Vec::new(), backtrace: None };
        let Ok(mut reader) = Reader::new(py, &limits, crate::read::NODE_BUDGET) else { return empty() };
        let read_locals = |frame: &Bound<'_, PyAny>, reader: &mut Reader<'_>| -> Vec<Field> {
            let Some(locals) = crate::probe::locals_of(frame) else { return Vec::new() };
            crate::probe::all_locals(&locals)
                .into_iter()
                .take(limits.max_fields as usize)
                .map(|(name, obj)| Field::new(name, reader.read(&obj)))
                .collect()
        };
        let code = attr!(self.frame, "f_code").ok();
        let location = HitLocation {
            file: code.as_ref().and_then(filename).unwrap_or_default(),
            line: attr!(self.frame, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok()).unwrap_or(0),
            module: crate::probe::module_of(&self.frame),
            name: code.as_ref().map(crate::probe::code_name),
        };
        let locals = read_locals(&self.frame, &mut reader);
        // Innermost first: the traceback below this frame (deepest first), this frame,
        // then its callers.
        let mut backtrace = Vec::new();
        if let Some(tb) = exc_attr(&self.exc, "__traceback__").filter(|t| !t.is_none()) {
            let mut below = Vec::new();
            let mut next = attr!(tb, "tb_next").ok().filter(|t| !t.is_none());
            while let Some(t) = next {
                if below.len() >= MAX_TRACEBACK {
                    break;
                }
                let line = attr!(t, "tb_lineno").ok().and_then(|l| l.extract::<u32>().ok());
                if let Ok(f) = attr!(t, "tb_frame") {
                    below.push(frame_text(&f, line));
                }
                next = attr!(t, "tb_next").ok().filter(|t| !t.is_none());
            }
            backtrace.extend(below.into_iter().rev());
        }
        backtrace.push(frame_text(&self.frame, None));
        let max_frames = self.table.limits.max_frames as usize;
        let with_values = self.table.limits.frames_with_values as usize;
        let mut frames = Vec::new();
        let mut caller = attr!(self.frame, "f_back").ok().filter(|f| !f.is_none());
        while let Some(f) = caller {
            if backtrace.len() < max_frames * 4 {
                backtrace.push(frame_text(&f, None));
            }
            let code = attr!(f, "f_code").ok();
            let file = code.as_ref().and_then(filename);
            if frames.len() < max_frames && file.as_deref().is_some_and(is_app_file) {
                let fields = if frames.len() < with_values { read_locals(&f, &mut reader) } else { Vec::new() };
                frames.push(SpanFrame {
                    name: code.as_ref().map(crate::probe::code_name).unwrap_or_default(),
                    target: crate::probe::module_of(&f),
                    file,
                    line: attr!(f, "f_lineno").ok().and_then(|l| l.extract::<u32>().ok()),
                    fields,
                });
            }
            caller = attr!(f, "f_back").ok().filter(|f| !f.is_none());
        }
        Payload { location, locals, frames, backtrace: Some(backtrace) }
    }

    fn thread(&mut self) -> ThreadInfo {
        crate::probe::thread_info(self.py).unwrap_or_else(|| ThreadInfo { name: None, id: String::new() })
    }

    fn start_clock(&mut self, _action: &std::sync::Arc<Installed>, _now: u64) {}

    fn stop_clock(&mut self, _action: &std::sync::Arc<Installed>) -> Option<u64> {
        None
    }

    /// An exception unwinding is not a call of a probed function: nothing to hold.
    fn begin_call(&mut self, action: &std::sync::Arc<Installed>, _started: u64) {
        periscope_agent_core::fire::close_call(action);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_directories_and_pseudo_files_are_not_application_code() {
        set_library_paths(vec!["/usr/lib/python3.13/".into(), "/venv/lib/python3.13/site-packages".into()]);
        assert!(!is_app_file("/usr/lib/python3.13/json/decoder.py"));
        assert!(!is_app_file("/venv/lib/python3.13/site-packages/flask/app.py"));
        assert!(!is_app_file("<frozen importlib._bootstrap>"));
        assert!(is_app_file("/srv/shop/orders.py"));
        assert!(is_app_file("/usr/lib/python3.13x/mine.py"), "a prefix on a path boundary only");
    }
}
