"""Code objects: the lines each holds, the live ones of a module, and a module's
catalog entry (its executable lines, functions and content hash)."""

import hashlib
import os
import sys
import sysconfig
import types

_FunctionType = types.FunctionType
_CodeType = types.CodeType
_type_dict = type.__dict__["__dict__"]  # CPython's own getter: no metaclass code runs

#: Source files larger than this are left out of the catalog (still instrumentable).
MAX_SOURCE_BYTES = 2 * 1024 * 1024


def own_lines(code):
    """The lines that hold code in `code` itself (not in functions nested in it)."""
    lines = set()
    if hasattr(code, "co_lines"):
        for _start, _end, line in code.co_lines():
            if line is not None and line > 0:
                lines.add(line)
    else:  # 3.9
        import dis

        for _offset, line in dis.findlinestarts(code):
            if line is not None and line > 0:
                lines.add(line)
    return lines


def nested(code):
    """The code objects defined directly in `code`."""
    return [c for c in code.co_consts if isinstance(c, _CodeType)]


def walk(code):
    """`code` and every code object nested in it, depth first."""
    stack = [code]
    while stack:
        c = stack.pop()
        yield c
        stack.extend(nested(c))


def qualname(code):
    return getattr(code, "co_qualname", code.co_name)


def is_function(code):
    return code.co_name not in ("<module>", "<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def live_functions(module):
    """Functions reachable from a module's namespace (module-level functions, methods,
    static and class methods, properties, the originals behind ``functools.wraps``),
    with the code objects they hold. Read through plain dicts: no user code runs."""
    found = {}
    seen = set()
    try:
        namespace = module.__dict__
    except Exception:
        return found
    if type(namespace) is not dict:
        return found
    name = namespace.get("__name__")
    stack = list(namespace.values())
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        t = type(obj)
        if t is _FunctionType:
            found.setdefault(obj.__code__, []).append(obj)
            wrapped = obj.__dict__.get("__wrapped__") if type(obj.__dict__) is dict else None
            if wrapped is not None:
                stack.append(wrapped)
        elif t is staticmethod or t is classmethod:
            stack.append(obj.__func__)
        elif t is property:
            stack.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif isinstance(obj, type):
            try:
                cls_dict = _type_dict.__get__(obj)
                if cls_dict.get("__module__") != name:
                    continue
                stack.extend(cls_dict.values())
            except Exception:
                continue
    return found


def _kind(path):
    """0 for the application, 1 for installed packages, 2 for the standard library: the
    catalog's order, so that a bound keeps the service's own code."""
    if "site-packages" in path or "dist-packages" in path:
        return 1
    stdlib = sysconfig.get_paths().get("stdlib") or ""
    if stdlib and path.startswith(stdlib):
        return 2
    return 0


def source_file(module):
    f = getattr(module, "__file__", None) if type(module) is types.ModuleType else None
    if type(f) is not str or not f.endswith(".py"):
        return None
    return os.path.abspath(f)


def catalog_entry(name, path):
    """`(file, module, hash, lines, functions)` for one source file, or None."""
    try:
        if os.path.getsize(path) > MAX_SOURCE_BYTES:
            return None
        with open(path, "rb") as fh:
            source = fh.read()
        code = compile(source, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError, MemoryError):
        return None
    digest = "sha256:" + hashlib.sha256(source).hexdigest()
    lines = set()
    functions = []
    for c in walk(code):
        own = own_lines(c)
        lines |= own
        if c is not code and is_function(c):
            last = max([c.co_firstlineno] + [l for n in walk(c) for l in own_lines(n)])
            functions.append((qualname(c), c.co_firstlineno, last))
    functions.sort(key=lambda f: f[1])
    return (path, name, digest, sorted(lines), functions)


def catalog_order(modules):
    """(name, path) of modules with a source file: application first."""
    out = []
    for name, module in list(modules.items()):
        path = source_file(module)
        if path is not None and not name.startswith("periscope_agent"):
            out.append((_kind(path), name, path))
    out.sort()
    return [(n, p) for _k, n, p in out]


def runtime_has_monitoring():
    return sys.version_info >= (3, 12) and hasattr(sys, "monitoring")
