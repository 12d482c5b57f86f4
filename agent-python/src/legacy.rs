//! Frames already running an instrumented function's old code, on CPython 3.9 to 3.11.
//!
//! Injection gives a function new code; a frame that was already running the old code
//! (a loop in a thread started before the action) keeps running it. Before 3.12 the only
//! way to see such a frame's lines is a trace function on *its* thread, and
//! `sys.settrace` only reaches the calling thread. So, once, when probes go in, this
//! walks the interpreter's thread states (as debuggers attaching to a live process do),
//! and for each thread whose stack holds a frame of an old code object: gives those
//! frames a local trace function and, with that thread's state swapped in, installs the
//! global one. The thread then pays a trace call per function call until its last old
//! frame returns, when the trace function removes itself. No other thread pays anything.
//!
//! This is the only `unsafe` this crate writes: three functions of CPython's C API that
//! are not in the limited API (exported by every CPython 3.9 to 3.13), and a thread-state
//! swap, made with the GIL held and undone before returning.

#![allow(unsafe_code)]

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;

unsafe extern "C" {
    fn PyInterpreterState_ThreadHead(interp: *mut ffi::PyInterpreterState) -> *mut ffi::PyThreadState;
    fn PyThreadState_Next(tstate: *mut ffi::PyThreadState) -> *mut ffi::PyThreadState;
    fn PyThreadState_GetFrame(tstate: *mut ffi::PyThreadState) -> *mut ffi::PyFrameObject;
}

/// The trace function (`_native._trace`), once handed over.
pub(crate) static TRACER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Gives the frames of other threads running any of `codes` the tracer; returns how
/// many frames it reached.
pub(crate) fn trace_running(py: Python<'_>, codes: &Bound<'_, PyList>, tracer: &Bound<'_, PyAny>) -> PyResult<usize> {
    let _ = TRACER.set(py, tracer.clone().unbind());
    if codes.is_empty() {
        return Ok(0);
    }
    let sys = py.import("sys")?;
    let (settrace, gettrace) = (attr!(sys, "settrace")?, attr!(sys, "gettrace")?);
    let mut reached = 0;
    // SAFETY: the GIL is held (we hold `py`), so the interpreter's thread list cannot
    // change under us; `PyThreadState_Get` is this thread's state.
    let me = unsafe { ffi::PyThreadState_Get() };
    // SAFETY: as above; the interpreter outlives this call.
    let mut tstate = unsafe { PyInterpreterState_ThreadHead(ffi::PyInterpreterState_Get()) };
    while !tstate.is_null() {
        if tstate != me {
            // SAFETY: `tstate` is a live thread state of this interpreter (GIL held);
            // the function returns a new reference or null.
            let frame = unsafe { PyThreadState_GetFrame(tstate) };
            if !frame.is_null() {
                // SAFETY: a new, non-null reference to a frame object, owned from here.
                let top = unsafe { Bound::from_owned_ptr(py, frame.cast::<ffi::PyObject>()) };
                let mut found = 0;
                let mut f = Some(top);
                while let Some(frame) = f.filter(|f| !f.is_none()) {
                    if let Ok(code) = attr!(frame, "f_code")
                        && codes.iter().any(|c| c.is(&code))
                    {
                        frame.setattr("f_trace_lines", true)?;
                        frame.setattr("f_trace", tracer)?;
                        found += 1;
                    }
                    f = attr!(frame, "f_back").ok();
                }
                if found > 0 {
                    // SAFETY: swapping in another live thread state of this interpreter
                    // while holding the GIL, as debuggers attaching to a running process
                    // do; `sys.settrace` then sets that thread's trace function. The
                    // previous state is restored before anything else runs.
                    let previous = unsafe { ffi::PyThreadState_Swap(tstate) };
                    // A thread that already has a trace function (a debugger's, a
                    // coverage tool's) keeps it: its old frames are left as they are.
                    let result = match gettrace.call0() {
                        Ok(t) if t.is_none() || t.is(tracer) => settrace.call1((tracer,)).map(|_| true),
                        Ok(_) => Ok(false),
                        Err(e) => Err(e),
                    };
                    // SAFETY: restores this thread's own state.
                    unsafe { ffi::PyThreadState_Swap(previous) };
                    if result? {
                        reached += found;
                    }
                }
            }
        }
        // SAFETY: GIL held; `tstate` is live.
        tstate = unsafe { PyThreadState_Next(tstate) };
    }
    Ok(reached)
}

/// Called on a traced frame's `return`: when no frame left on this thread's stack has
/// our local tracer, the thread stops tracing.
pub(crate) fn frame_returned(py: Python<'_>, frame: &Bound<'_, PyAny>) -> PyResult<()> {
    let Some(tracer) = TRACER.get(py) else { return Ok(()) };
    let mut f = attr!(frame, "f_back").ok();
    while let Some(frame) = f.filter(|f| !f.is_none()) {
        if attr!(frame, "f_trace").is_ok_and(|t| t.is(tracer.bind(py))) {
            return Ok(());
        }
        f = attr!(frame, "f_back").ok();
    }
    py.import("sys")?.getattr("settrace")?.call1((py.None(),))?;
    Ok(())
}
