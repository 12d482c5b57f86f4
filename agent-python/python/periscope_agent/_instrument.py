"""Putting probes into code: ``sys.monitoring`` on 3.12+, bytecode injection on 3.9 to
3.11. Both receive the same list of places, ``(role, code, line, key)`` with role
``line`` (before a line runs), ``start`` (a function is entered) or ``exit`` (it
returns), and undo everything they did when told to clear.

``sys.monitoring`` instruments the code object itself, so frames already running it
(a loop in a thread started long ago, a suspended coroutine) see the probe at their
next line. Injection replaces the code objects of the functions that hold them (and of
the enclosing functions, so closures made later get the new code too); a frame already
running the old code object keeps running it until it returns.
"""

import gc
import sys
import types

from . import _native
from ._code import walk

_FunctionType = types.FunctionType


class Monitoring:
    """``sys.monitoring`` with a tool id of our own: ``LINE``, ``PY_START`` and
    ``PY_RETURN`` enabled only on the code objects that hold probes (every other line
    answers ``DISABLE`` the first time it reports), ``PY_UNWIND`` (a global event) only
    while a whole-function duration or an error capture is live."""

    #: Tried in order: ids 0 (debuggers), 1 (coverage), 2 (profilers) and 5
    #: (optimizers) are conventionally taken by other tools.
    TOOL_IDS = (4, 3)

    def __init__(self):
        m = sys.monitoring
        self.m = m
        self.tool = None
        for tool in self.TOOL_IDS:
            if m.get_tool(tool) is None:
                m.use_tool_id(tool, "periscope")
                self.tool = tool
                break
        if self.tool is None:
            raise RuntimeError("no free sys.monitoring tool id (3 and 4 are taken)")
        E = m.events
        _native.set_disable(m.DISABLE)
        m.register_callback(self.tool, E.LINE, _native._line)
        m.register_callback(self.tool, E.PY_START, _native._start)
        m.register_callback(self.tool, E.PY_RETURN, _native._return)
        m.register_callback(self.tool, E.PY_UNWIND, _native._unwind)
        self.codes = {}

    def apply(self, places, errors=False):
        E = self.m.events
        wanted = {}
        unwind = errors
        for role, code, _line, _key in places:
            ev = {"line": E.LINE, "start": E.PY_START, "exit": E.PY_RETURN}[role]
            wanted[code] = wanted.get(code, 0) | ev
            unwind = unwind or role == "exit"
        changed = False
        for code in list(self.codes):
            if code not in wanted:
                self.m.set_local_events(self.tool, code, 0)
                del self.codes[code]
                changed = True
        for code, ev in wanted.items():
            if self.codes.get(code) != ev:
                self.m.set_local_events(self.tool, code, ev)
                self.codes[code] = ev
                changed = True
        self.m.set_events(self.tool, E.PY_UNWIND if unwind else 0)
        if changed:
            # Lines answered DISABLE earlier may hold a probe now.
            self.m.restart_events()
        return [(role, code, line, key) for role, code, line, key in places]

    def original(self, code):
        """Monitoring instruments code objects in place: a live one is the original."""
        return code

    def restart(self):
        """Re-enables the places that answered ``DISABLE``: the probes silenced theirs
        while no broker session was up."""
        self.m.restart_events()

    def clear(self):
        self.apply([])

    def release(self):
        """Frees the tool id (a forked child's new worker takes it again)."""
        try:
            self.clear()
            self.m.free_tool_id(self.tool)
        except Exception:
            pass


class Injection:
    """Bytecode injection with the ``bytecode`` package: a call to the native probe
    (``_hook(key)``) inserted before each probed line, after a function's prologue
    (entry) and before each of its returns (exit)."""

    def __init__(self):
        import bytecode  # noqa: F401  (fails early and clearly when missing)

        self.bytecode = bytecode
        #: original code -> (injected code, owners changed: [(function, original)])
        self.active = {}
        #: injected code -> original code
        self.originals = {}

    def original(self, code):
        """The code object a live function held before we injected into it."""
        return self.originals.get(code, code)

    def restart(self):
        """Injected probes are never silenced: nothing to re-enable."""

    def _exit_instrs(self, key, lineno):
        """``_hook_exit(value, key)`` with the value about to be returned (left on the
        stack for the return)."""
        from bytecode import Instr

        if sys.version_info >= (3, 11):
            return [
                Instr("COPY", 1, lineno=lineno),
                Instr("PUSH_NULL", lineno=lineno),
                Instr("SWAP", 2, lineno=lineno),
                Instr("LOAD_CONST", _native._hook_exit, lineno=lineno),
                Instr("SWAP", 2, lineno=lineno),
                Instr("LOAD_CONST", key, lineno=lineno),
                Instr("PRECALL", 2, lineno=lineno),
                Instr("CALL", 2, lineno=lineno),
                Instr("POP_TOP", lineno=lineno),
            ]
        return [
            Instr("DUP_TOP", lineno=lineno),
            Instr("LOAD_CONST", _native._hook_exit, lineno=lineno),
            Instr("ROT_TWO", lineno=lineno),
            Instr("LOAD_CONST", key, lineno=lineno),
            Instr("CALL_FUNCTION", 2, lineno=lineno),
            Instr("POP_TOP", lineno=lineno),
        ]

    def _hook_instrs(self, key, lineno):
        from bytecode import Instr

        v = sys.version_info
        if v >= (3, 11):
            return [
                Instr("PUSH_NULL", lineno=lineno),
                Instr("LOAD_CONST", _native._hook, lineno=lineno),
                Instr("LOAD_CONST", key, lineno=lineno),
                Instr("PRECALL", 1, lineno=lineno),
                Instr("CALL", 1, lineno=lineno),
                Instr("POP_TOP", lineno=lineno),
            ]
        return [
            Instr("LOAD_CONST", _native._hook, lineno=lineno),
            Instr("LOAD_CONST", key, lineno=lineno),
            Instr("CALL_FUNCTION", 1, lineno=lineno),
            Instr("POP_TOP", lineno=lineno),
        ]

    def _inject(self, code, probes):
        """`code` with probes: `probes` maps ("line", n) / ("start", None) / ("exit",
        None) to keys."""
        from bytecode import Bytecode, Instr

        bc = Bytecode.from_code(code)
        out = []
        prev_line = None
        start_key = probes.get(("start", None))
        exit_key = probes.get(("exit", None))
        prologue = {"RESUME", "GEN_START", "MAKE_CELL", "COPY_FREE_VARS", "RETURN_GENERATOR", "POP_TOP", "NOP"}
        in_prologue = True
        for ins in bc:
            if isinstance(ins, Instr):
                if in_prologue and ins.name not in prologue:
                    in_prologue = False
                    if start_key is not None:
                        out.extend(self._hook_instrs(start_key, code.co_firstlineno))
                if ins.lineno != prev_line and ins.lineno is not None:
                    key = probes.get(("line", ins.lineno))
                    if key is not None and not in_prologue:
                        out.extend(self._hook_instrs(key, ins.lineno))
                    prev_line = ins.lineno
                if exit_key is not None and ins.name == "RETURN_VALUE":
                    out.extend(self._exit_instrs(exit_key, ins.lineno))
                out.append(ins)
            else:
                out.append(ins)
        bc.clear()
        bc.extend(out)
        return bc.to_code()

    def apply(self, places, errors=False):
        # Error captures need PY_UNWIND (3.12+); this agent does not offer them here.
        by_code = {}
        for role, code, line, key in places:
            by_code.setdefault(code, {})[(role, line if role == "line" else None)] = key
        for code in list(self.active):
            if code not in by_code:
                self._restore(code)
        replaced = []
        for code, probes in by_code.items():
            signature = tuple(sorted(probes.items(), key=repr))
            current = self.active.get(code)
            if current is not None and current[2] == signature:
                continue
            if current is not None:
                self._restore(code)
            try:
                new = self._inject(code, probes)
            except Exception:
                continue
            owners = self._swap(code, new)
            self.active[code] = (new, owners, signature)
            self.originals[new] = code
            for _func, old in owners:
                if old is not code:
                    self.originals.setdefault(_func.__code__, old)
            replaced.append(code)
        if replaced:
            # Frames already running the old code (a loop in a thread started before
            # the action) are reached through their thread's trace function.
            try:
                _native.trace_running(replaced, _native._trace)
            except Exception:
                pass
        return list(places)

    def _swap(self, old, new):
        """Points every function holding `old` at `new` (and, for a nested function,
        the enclosing functions at code whose constants hold `new`)."""
        owners = []
        for ref in gc.get_referrers(old):
            if type(ref) is _FunctionType and ref.__code__ is old:
                ref.__code__ = new
                owners.append((ref, old))
        parents = self._parents.get(old, ())
        for parent in parents:
            try:
                consts = tuple(new if c is old else c for c in parent.co_consts)
                new_parent = parent.replace(co_consts=consts)
            except Exception:
                continue
            owners.extend(self._swap(parent, new_parent))
        return owners

    _parents = {}

    def set_modules_codes(self, codes):
        """Remembers which code objects enclose which (from the live functions)."""
        parents = {}
        for top in codes:
            for c in walk(top):
                for n in c.co_consts:
                    if isinstance(n, types.CodeType):
                        parents.setdefault(n, []).append(c)
        self._parents = parents

    def _restore(self, code):
        entry = self.active.pop(code, None)
        if entry is None:
            return
        new, owners, _sig = entry
        self.originals.pop(new, None)
        for func, original in owners:
            try:
                func.__code__ = original
            except Exception:
                pass

    def clear(self):
        for code in list(self.active):
            self._restore(code)

    def release(self):
        self.clear()


def make():
    """The mechanism for this interpreter."""
    if sys.version_info >= (3, 12):
        return Monitoring()
    return Injection()
