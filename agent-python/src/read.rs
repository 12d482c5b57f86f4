//! Reading Python objects into captured values without running the host's code.
//!
//! A snapshot must never change what the program does, so nothing here calls a method a
//! user could have written: no `repr`, no `str` of a user type, no `__getattr__`,
//! `__getattribute__`, property or other descriptor, no `__iter__`, `__len__`, `__eq__`
//! or `__hash__` of a user type. What is read:
//!
//! - the built-in scalars (`None`, `bool`, `int`, `float`, `complex`, `str`, `bytes`,
//!   `bytearray`) by exact type, through the C API;
//! - the built-in containers (`list`, `tuple`, `dict`, `set`, `frozenset`) through their
//!   C storage (`PyList_GetItem`, `PyDict_Next`...), which a subclass cannot override;
//!   a `set` subclass (whose iteration could be Python code) shows its size only;
//! - any other object through its type's own attribute tables, found with the getters of
//!   the built-in `type` itself (`type.__dict__['__mro__'].__get__(cls)`), so that a
//!   metaclass's `__getattribute__` never runs either: the instance `__dict__` when the
//!   first `__dict__` in the type's MRO is CPython's own getset descriptor, and every
//!   `__slots__` member (a `member_descriptor`, C code that reads a pointer);
//! - a few standard-library value types by exact type (`datetime`, `date`, `time`,
//!   `timedelta`, `Decimal`, `UUID`), as their standard text.
//!
//! Limits are applied while reading (the variable itself is level 1; a container at
//! `max_depth` keeps its leaves and cuts its containers, naming their type and size;
//! `max_items`, `max_fields`, strings cut with their full length counted), and every
//! capture has a node budget, so reading a huge structure costs the host a bounded time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use periscope_protocol::value::{Cut, CutReason, Text};
use periscope_protocol::{CaptureLimits, Field, List, Map, Object, Value};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyComplex, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
    PyType,
};

/// Most values read for one capture (all locals and frames together); past it, values
/// are cut for size. About what fits the default 64 KiB hit.
pub(crate) const NODE_BUDGET: usize = 4_000;

/// Most distinct types whose layouts are remembered; the table starts over beyond it.
const MAX_LAYOUTS: usize = 4_096;

/// The built-in getters and descriptor types reading goes through, taken from `type`
/// itself when the module loads.
pub(crate) struct Builtins {
    /// `type.__dict__['__mro__']`.
    mro: Py<PyAny>,
    /// `type.__dict__['__dict__']`.
    dict: Py<PyAny>,
    /// `type.__dict__['__qualname__']`.
    qualname: Py<PyAny>,
    /// `type(type.__dict__['__dict__'])`: `getset_descriptor`.
    getset: Py<PyAny>,
    /// `type(int.real)`-like slot readers: `member_descriptor`.
    member: Py<PyAny>,
    /// Standard-library value types shown as their standard text.
    text_types: Mutex<Vec<Py<PyAny>>>,
    /// Callables, modules and interpreter internals: shown as a short label, never
    /// expanded (their namespaces are code, not data).
    labelled: Vec<(Py<PyAny>, &'static str)>,
    /// What is known of each type's instances.
    layouts: Mutex<HashMap<usize, Arc<Layout>>>,
}

static BUILTINS: PyOnceLock<Builtins> = PyOnceLock::new();

/// The builtins, resolved once.
pub(crate) fn builtins(py: Python<'_>) -> PyResult<&'static Builtins> {
    BUILTINS.get_or_try_init(py, || {
        let ty = py.get_type::<PyType>();
        let td = attr!(ty, "__dict__")?;
        let get = |name: &str| td.get_item(name).map(Bound::unbind);
        let dict = get("__dict__")?;
        let getset = dict.bind(py).get_type().into_any().unbind();
        // A `__slots__` member of a throwaway class gives the member descriptor type.
        let ns = PyDict::new(py);
        ns.set_item("__slots__", ("x",))?;
        let probe = ty.call1(("_periscope_probe", (), ns))?;
        let member = attr!(probe, "__dict__")?.get_item("x")?.get_type().into_any().unbind();
        let types = py.import("types")?;
        let mut labelled = Vec::new();
        for (name, label) in [
            ("FunctionType", "function"),
            ("BuiltinFunctionType", "built-in function"),
            ("MethodType", "method"),
            ("ModuleType", "module"),
            ("CodeType", "code"),
            ("FrameType", "frame"),
            ("GeneratorType", "generator"),
            ("CoroutineType", "coroutine"),
            ("AsyncGeneratorType", "async generator"),
            ("MethodWrapperType", "method-wrapper"),
            ("WrapperDescriptorType", "slot wrapper"),
            ("MethodDescriptorType", "method descriptor"),
        ] {
            if let Ok(t) = types.getattr(name) {
                labelled.push((t.unbind(), label));
            }
        }
        Ok(Builtins {
            labelled,
            mro: get("__mro__")?,
            dict,
            qualname: get("__qualname__")?,
            getset,
            member,
            text_types: Mutex::new(Vec::new()),
            layouts: Mutex::new(HashMap::new()),
        })
    })
}

/// Resolves the standard-library types shown as text (those whose modules are loaded).
pub(crate) fn refresh_text_types(py: Python<'_>) -> PyResult<()> {
    let b = builtins(py)?;
    let modules = py.import("sys")?.getattr("modules")?;
    let Ok(modules) = modules.cast_into::<PyDict>() else { return Ok(()) };
    let mut found = Vec::new();
    for (module, names) in [
        ("datetime", &["datetime", "date", "time", "timedelta", "timezone"][..]),
        ("decimal", &["Decimal"][..]),
        ("uuid", &["UUID"][..]),
    ] {
        let Some(m) = modules.get_item(module)? else { continue };
        let Ok(m) = m.cast::<pyo3::types::PyModule>() else { continue };
        let dict = m.dict();
        for name in names {
            if let Some(t) = dict.get_item(name)?
                && t.is_exact_instance_of::<PyType>()
            {
                found.push(t.unbind());
            }
        }
    }
    *b.text_types.lock().unwrap_or_else(|p| p.into_inner()) = found;
    Ok(())
}

/// What reading an instance of one type may touch.
pub(crate) struct Layout {
    /// The type itself: keeps it alive while remembered, so its address is never
    /// another type's.
    ty: Py<PyAny>,
    /// The type's qualified name (`Order`, `Shop.Cart`).
    pub(crate) name: String,
    /// CPython's own `__dict__` getter, when instances have a dict that no class in
    /// the MRO hides behind a descriptor of its own.
    dict: Option<Py<PyAny>>,
    /// `__slots__` members, in MRO order.
    slots: Vec<(String, Py<PyAny>)>,
    /// A named tuple's field names.
    tuple_fields: Option<Vec<String>>,
    /// Shown as its standard text.
    as_text: bool,
}

impl Builtins {
    /// The layout of `ty`'s instances, worked out once per type.
    pub(crate) fn layout(&self, py: Python<'_>, ty: &Bound<'_, PyType>) -> PyResult<Arc<Layout>> {
        let key = ty.as_ptr() as usize;
        if let Some(l) = self.layouts.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && l.ty.bind(py).is(ty.as_any())
        {
            return Ok(Arc::clone(l));
        }
        let layout = Arc::new(self.compute_layout(py, ty)?);
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        if layouts.len() >= MAX_LAYOUTS {
            layouts.clear();
        }
        layouts.insert(key, Arc::clone(&layout));
        Ok(layout)
    }

    fn compute_layout(&self, py: Python<'_>, ty: &Bound<'_, PyType>) -> PyResult<Layout> {
        let name = self.qualname.bind(py).call_method1("__get__", (ty,))?;
        let name = name.cast_exact::<PyString>().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let as_text =
            self.text_types.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|t| t.bind(py).is(ty.as_any()));
        let mro = self.mro.bind(py).call_method1("__get__", (ty,))?;
        let mro = mro.cast_exact::<PyTuple>()?;
        let mut dict: Option<Option<Py<PyAny>>> = None;
        let mut slots = Vec::new();
        let mut tuple_fields = None;
        let is_tuple = ty.is_subclass_of::<PyTuple>()?;
        for cls in mro.iter() {
            let proxy = self.dict.bind(py).call_method1("__get__", (&cls,))?;
            // A type's own namespace: a `mappingproxy` over a real dict, read through
            // its `items` (C code over the dict's storage).
            let items = proxy.call_method0("items")?;
            for item in items.try_iter()? {
                let item = item?;
                let Ok(pair) = item.cast_exact::<PyTuple>() else { continue };
                let (Ok(k), Ok(v)) = (pair.get_item(0), pair.get_item(1)) else { continue };
                let Ok(k) = k.cast_exact::<PyString>() else { continue };
                let k = k.to_string_lossy();
                if k == "__dict__" && dict.is_none() {
                    // The first `__dict__` in the MRO decides, as attribute lookup would.
                    dict = Some(v.get_type().is(self.getset.bind(py)).then(|| v.clone().unbind()));
                } else if v.get_type().is(self.member.bind(py)) && !slots.iter().any(|(n, _)| *n == k) {
                    slots.push((k.into_owned(), v.clone().unbind()));
                } else if is_tuple
                    && k == "_fields"
                    && tuple_fields.is_none()
                    && let Ok(names) = v.cast_exact::<PyTuple>()
                {
                    let names = names
                        .iter()
                        .filter_map(|n| n.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned()));
                    tuple_fields = Some(names.collect());
                }
            }
        }
        Ok(Layout { ty: ty.clone().into_any().unbind(), name, dict: dict.flatten(), slots, tuple_fields, as_text })
    }
}

/// One capture's reading state: its limits and what is left of its node budget.
pub(crate) struct Reader<'a> {
    pub(crate) limits: &'a CaptureLimits,
    pub(crate) budget: usize,
    builtins: &'static Builtins,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(py: Python<'_>, limits: &'a CaptureLimits, budget: usize) -> PyResult<Reader<'a>> {
        Ok(Reader { limits, budget, builtins: builtins(py)? })
    }

    /// Reads one variable (level 1).
    pub(crate) fn read(&mut self, obj: &Bound<'_, PyAny>) -> Value {
        self.read_at(obj, 1)
    }

    fn read_at(&mut self, obj: &Bound<'_, PyAny>, level: u32) -> Value {
        if self.budget == 0 {
            return Value::Cut(Cut { reason: CutReason::Size, type_name: Some(self.type_name(obj)), size: None });
        }
        self.budget -= 1;
        if let Some(v) = self.scalar(obj) {
            return v;
        }
        let py = obj.py();
        if let Ok(list) = obj.cast::<PyList>() {
            let items: Vec<Bound<'_, PyAny>> = (0..list.len()).filter_map(|i| list.get_item(i).ok()).collect();
            return self.list(obj, items.len(), items.into_iter(), level);
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            let layout = self.layout(obj);
            if let Some(names) = layout.as_ref().and_then(|l| l.tuple_fields.clone()) {
                let fields: Vec<(String, Bound<'_, PyAny>)> = names.into_iter().zip(tuple.iter()).collect();
                let name = layout.as_ref().map(|l| l.name.clone()).unwrap_or_default();
                return self.object(name, fields, level);
            }
            return self.list(obj, tuple.len(), tuple.iter(), level);
        }
        if let Ok(dict) = obj.cast::<PyDict>() {
            return self.dict(obj, dict, level);
        }
        if obj.is_exact_instance_of::<PySet>() || obj.is_exact_instance_of::<PyFrozenSet>() {
            let len = obj.len().unwrap_or(0);
            let items: Vec<Bound<'_, PyAny>> = match obj.try_iter() {
                Ok(it) => it.take(self.limits.max_items as usize + 1).filter_map(Result::ok).collect(),
                Err(_) => Vec::new(),
            };
            return self.list(obj, len, items.into_iter(), level);
        }
        if let Some(label) = self.label(obj) {
            return label;
        }
        let Some(layout) = self.layout(obj) else {
            return Value::Cut(Cut {
                reason: CutReason::Unsupported,
                type_name: Some(self.type_name(obj)),
                size: None,
            });
        };
        if layout.as_text {
            return self.text_of(obj, &layout.name);
        }
        let mut fields: Vec<(String, Bound<'_, PyAny>)> = Vec::new();
        if let Some(getter) = &layout.dict
            && let Ok(d) = getter.bind(py).call_method1("__get__", (obj, obj.get_type()))
            && let Ok(d) = d.cast_exact::<PyDict>()
        {
            for (k, v) in d.iter() {
                if let Ok(k) = k.cast_exact::<PyString>() {
                    fields.push((k.to_string_lossy().into_owned(), v));
                }
            }
        }
        for (name, member) in &layout.slots {
            if let Ok(v) = member.bind(py).call_method1("__get__", (obj, obj.get_type())) {
                fields.push((name.clone(), v));
            }
        }
        self.object(layout.name.clone(), fields, level)
    }

    /// A callable, module, class or interpreter object as a short label (`<function
    /// Shop.checkout>`, `<module json>`, `<class Order>`), read through C getters of
    /// built-in types only.
    fn label(&self, obj: &Bound<'_, PyAny>) -> Option<Value> {
        let py = obj.py();
        if obj.is_instance_of::<PyType>() {
            let name = self.builtins.qualname.bind(py).call_method1("__get__", (obj,)).ok();
            let name =
                name.and_then(|n| n.cast_into_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned()));
            return Some(Value::str(format!("<class {}>", name.unwrap_or_default())));
        }
        let kind = self.labelled_kind(obj)?;
        let name = match kind {
            "module" => obj.cast::<pyo3::types::PyModule>().ok().and_then(|m| m.name().ok()).map(|n| n.to_string()),
            "function" | "built-in function" | "coroutine" | "generator" | "async generator" => obj
                .getattr(pyo3::intern!(py, "__qualname__"))
                .ok()
                .and_then(|n| n.cast_into_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())),
            "method" => obj
                .getattr(pyo3::intern!(py, "__func__"))
                .ok()
                .filter(|f| f.get_type().is(self.builtins.labelled[0].0.bind(py)))
                .and_then(|f| f.getattr(pyo3::intern!(py, "__qualname__")).ok())
                .and_then(|n| n.cast_into_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())),
            _ => None,
        };
        Some(Value::str(match name {
            Some(n) => format!("<{kind} {n}>"),
            None => format!("<{kind}>"),
        }))
    }

    /// The label of `obj`'s exact type when it is one shown as a label.
    fn labelled_kind(&self, obj: &Bound<'_, PyAny>) -> Option<&'static str> {
        let ty = obj.get_type();
        self.builtins.labelled.iter().find(|(t, _)| t.bind(obj.py()).is(&ty)).map(|(_, kind)| *kind)
    }

    fn layout(&self, obj: &Bound<'_, PyAny>) -> Option<Arc<Layout>> {
        self.builtins.layout(obj.py(), &obj.get_type()).ok()
    }

    /// The type name shown on markers.
    pub(crate) fn type_name(&self, obj: &Bound<'_, PyAny>) -> String {
        match self.layout(obj) {
            Some(l) => l.name.clone(),
            None => "object".into(),
        }
    }

    fn scalar(&self, obj: &Bound<'_, PyAny>) -> Option<Value> {
        if obj.is_none() {
            return Some(Value::Null);
        }
        if obj.is_exact_instance_of::<PyBool>() {
            return Some(Value::Bool(obj.is_truthy().unwrap_or(false)));
        }
        if obj.is_exact_instance_of::<PyInt>() {
            if let Ok(i) = obj.extract::<i64>() {
                return Some(Value::Int(i));
            }
            if let Ok(u) = obj.extract::<u64>() {
                return Some(Value::UInt(u));
            }
            // Larger: its decimal text (C code for an exact int), or its size when even
            // that is refused (the interpreter's digit limit).
            return Some(match obj.str() {
                Ok(s) => self.text(&s.to_string_lossy(), None),
                Err(_) => Value::Cut(Cut { reason: CutReason::Unsupported, type_name: Some("int".into()), size: None }),
            });
        }
        if obj.is_exact_instance_of::<PyFloat>() {
            return Some(Value::Float(obj.extract::<f64>().unwrap_or(f64::NAN)));
        }
        if let Ok(s) = obj.cast_exact::<PyString>() {
            return Some(self.string(s));
        }
        if let Ok(b) = obj.cast_exact::<PyBytes>() {
            return Some(self.bytes(b.as_bytes()));
        }
        if let Ok(b) = obj.cast_exact::<PyByteArray>() {
            let cap = self.string_cap();
            let len = b.len();
            let head = b.to_vec();
            let mut v = self.bytes(&head[..head.len().min(cap)]);
            if let Value::Str(t) = &mut v
                && len > cap
            {
                t.original_len = Some(len as u64);
            }
            return Some(v);
        }
        if obj.is_exact_instance_of::<PyComplex>() {
            return obj.str().ok().map(|s| Value::str(s.to_string_lossy().into_owned()));
        }
        None
    }

    fn string_cap(&self) -> usize {
        self.limits.max_string_len as usize
    }

    /// A string, copied no further than the limit: a long one is sliced first (C code on
    /// an exact `str`), so a megabyte string costs what its kept prefix costs.
    fn string(&self, s: &Bound<'_, PyString>) -> Value {
        let cap = self.string_cap();
        let len = s.len().unwrap_or(0);
        if len > cap {
            let head = s.as_any().get_item(pyo3::types::PySlice::new(s.py(), 0, cap as isize, 1));
            let head = head.ok().and_then(|h| h.cast_into_exact::<PyString>().ok());
            let text = head.map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
            return Value::Str(Text { value: text, original_len: Some(len as u64) });
        }
        Value::str(s.to_string_lossy().into_owned())
    }

    fn text(&self, s: &str, original: Option<u64>) -> Value {
        let cap = self.string_cap();
        let chars = s.chars().count();
        if chars > cap {
            let kept: String = s.chars().take(cap).collect();
            return Value::Str(Text { value: kept, original_len: Some(original.unwrap_or(chars as u64)) });
        }
        Value::Str(Text { value: s.to_owned(), original_len: original })
    }

    /// Bytes as Python writes them (`b'...'` with escapes), cut to the string limit.
    fn bytes(&self, b: &[u8]) -> Value {
        let cap = self.string_cap();
        let mut out = String::from("b'");
        for &c in b.iter().take(cap) {
            match c {
                b'\\' => out.push_str("\\\\"),
                b'\'' => out.push_str("\\'"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                0x20..=0x7e => out.push(c as char),
                _ => out.push_str(&format!("\\x{c:02x}")),
            }
        }
        out.push('\'');
        let original = (b.len() > cap).then_some(b.len() as u64);
        Value::Str(Text { value: out, original_len: original })
    }

    /// The standard text of a standard-library value type (exact type checked by the
    /// caller).
    fn text_of(&self, obj: &Bound<'_, PyAny>, name: &str) -> Value {
        match obj.str() {
            Ok(s) => self.text(&s.to_string_lossy(), None),
            Err(_) => Value::Cut(Cut { reason: CutReason::Unsupported, type_name: Some(name.to_owned()), size: None }),
        }
    }

    /// Whether a value would be a container (and so be cut at the depth limit).
    fn is_container(&self, obj: &Bound<'_, PyAny>) -> bool {
        if obj.is_none()
            || obj.is_exact_instance_of::<PyBool>()
            || obj.is_exact_instance_of::<PyInt>()
            || obj.is_exact_instance_of::<PyFloat>()
            || obj.is_exact_instance_of::<PyString>()
            || obj.is_exact_instance_of::<PyBytes>()
            || obj.is_exact_instance_of::<PyByteArray>()
            || obj.is_exact_instance_of::<PyComplex>()
        {
            return false;
        }
        if obj.is_instance_of::<PyType>() || self.labelled_kind(obj).is_some() {
            return false;
        }
        !self.layout(obj).is_some_and(|l| l.as_text)
    }

    /// The depth marker for a container child of a container at the depth limit.
    fn depth_cut(&self, obj: &Bound<'_, PyAny>) -> Value {
        let size = if obj.cast::<PyList>().is_ok()
            || obj.cast::<PyTuple>().is_ok()
            || obj.cast::<PyDict>().is_ok()
            || obj.is_exact_instance_of::<PySet>()
            || obj.is_exact_instance_of::<PyFrozenSet>()
        {
            obj.len().ok().map(|n| n as u64)
        } else {
            None
        };
        Value::Cut(Cut { reason: CutReason::Depth, type_name: Some(self.type_name(obj)), size })
    }

    fn child(&mut self, obj: &Bound<'_, PyAny>, parent_level: u32) -> Value {
        if parent_level >= self.limits.max_depth && self.is_container(obj) {
            return self.depth_cut(obj);
        }
        self.read_at(obj, parent_level + 1)
    }

    fn list<'py>(
        &mut self,
        obj: &Bound<'py, PyAny>,
        len: usize,
        items: impl Iterator<Item = Bound<'py, PyAny>>,
        level: u32,
    ) -> Value {
        let keep = self.limits.max_items as usize;
        let kept: Vec<Value> = items.take(keep).map(|i| self.child(&i, level)).collect();
        let omitted = len.saturating_sub(kept.len()) as u64;
        Value::List(List { type_name: Some(self.type_name(obj)), items: kept, omitted })
    }

    fn dict(&mut self, obj: &Bound<'_, PyAny>, dict: &Bound<'_, PyDict>, level: u32) -> Value {
        let keep = self.limits.max_items as usize;
        let len = dict.len();
        let mut entries = Vec::with_capacity(len.min(keep));
        for (k, v) in dict.iter().take(keep) {
            let key = self.scalar(&k).unwrap_or_else(|| Value::str(format!("<{}>", self.type_name(&k))));
            let value = self.child(&v, level);
            entries.push((key, value));
        }
        let omitted = len.saturating_sub(entries.len()) as u64;
        Value::Map(Map { type_name: Some(self.type_name(obj)), entries, omitted })
    }

    /// Reads an exception without running its code: its type, `args` (through
    /// `BaseException`'s own descriptor) and its instance attributes.
    pub(crate) fn exception(&mut self, exc: &Bound<'_, PyAny>) -> Value {
        let py = exc.py();
        let mut fields: Vec<(String, Bound<'_, PyAny>)> = Vec::new();
        let base = py.get_type::<pyo3::exceptions::PyBaseException>();
        if let Ok(descriptor) = base.getattr(pyo3::intern!(py, "args"))
            && let Ok(args) = descriptor.call_method1("__get__", (exc, exc.get_type()))
        {
            fields.push(("args".into(), args));
        }
        if let Some(getter) = self.layout(exc).and_then(|l| l.dict.as_ref().map(|d| d.clone_ref(py)))
            && let Ok(d) = getter.bind(py).call_method1("__get__", (exc, exc.get_type()))
            && let Ok(d) = d.cast_exact::<PyDict>()
        {
            for (k, v) in d.iter() {
                if let Ok(k) = k.cast_exact::<PyString>() {
                    fields.push((k.to_string_lossy().into_owned(), v));
                }
            }
        }
        let name = self.type_name(exc);
        self.object(name, fields, 1)
    }

    fn object(&mut self, type_name: String, fields: Vec<(String, Bound<'_, PyAny>)>, level: u32) -> Value {
        let keep = self.limits.max_fields as usize;
        let total = fields.len();
        let kept: Vec<Field> =
            fields.into_iter().take(keep).map(|(name, v)| Field::new(name, self.child(&v, level))).collect();
        let omitted = total.saturating_sub(kept.len()) as u64;
        Value::Object(Object { type_name, fields: kept, omitted })
    }
}

/// A string attribute stored in an object's instance `__dict__` (a thread's `_name`),
/// read without attribute lookup.
pub(crate) fn instance_str(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> Option<String> {
    let b = builtins(py).ok()?;
    let layout = b.layout(py, &obj.get_type()).ok()?;
    let getter = layout.dict.as_ref()?;
    let d = getter.bind(py).call_method1("__get__", (obj, obj.get_type())).ok()?;
    let d = d.cast_exact::<PyDict>().ok()?;
    let v = d.get_item(name).ok().flatten()?;
    v.cast_exact::<PyString>().ok().map(|s| s.to_string_lossy().into_owned())
}
