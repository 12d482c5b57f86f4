"""The worker: a daemon thread that does the agent's interpreter-side work.

It waits for the network thread's commands with the GIL released, then, holding it:
resolves actions to the code objects of loaded modules, instruments them, hands the
native probes their table, publishes the catalog of loaded modules (a few modules per
tick, the application's first), and emits dynamic log lines through ``logging``.
Modules imported later are caught when they load: an import hook (first on
``sys.meta_path``, answering nothing itself) notes every import, and when a module
whose file holds a pending action is about to load it wraps that one module's loader
so the probes go in right after its body runs, before anything can call it.
"""

import itertools
import logging
import os
import site
import sys
import sysconfig
import threading

from . import _native
from ._code import catalog_entry, catalog_order, live_functions, own_lines, qualname, source_file, walk

#: Catalog entries computed per tick (each compiles one source file).
CATALOG_PER_TICK = 25
#: Most files published (application first); the broker bounds catalogs too.
MAX_CATALOG_FILES = 2_000
TICK_MS = 200

_keys = itertools.count(1)


def library_paths():
    """Directories whose files are not the application's own code, for capture on
    error: the standard library, site-packages and dist-packages (the interpreter's,
    the virtualenv's, the user's), and this agent's package. Absolute and resolved as
    code objects name their files."""
    paths = set()
    try:
        scheme = sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if scheme.get(key):
                paths.add(scheme[key])
    except Exception:
        pass
    for getter in ("getsitepackages", "getusersitepackages"):
        try:
            found = getattr(site, getter)()
            paths.update([found] if isinstance(found, str) else found)
        except Exception:
            pass
    for p in sys.path:
        if p and os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages"):
            paths.add(p)
    paths.add(os.path.dirname(os.path.abspath(__file__)))
    out = set()
    for p in paths:
        if p:
            out.add(os.path.abspath(p))
            out.add(os.path.realpath(p))
    return sorted(out)


class _Watcher:
    """First on ``sys.meta_path``: notes imports, and catches modules that hold pending
    actions as they load. Finds nothing itself."""

    def __init__(self, worker):
        self.worker = worker

    def find_spec(self, name, path=None, target=None):
        w = self.worker
        w.imported = True
        if not w.pending_files and not w.pending_modules:
            return None
        if any(_module_matches(m, name) for m in w.pending_modules):
            spec = None
            try:
                from importlib.machinery import PathFinder

                spec = PathFinder.find_spec(name, path)
            except Exception:
                return None
            if spec is None or spec.loader is None:
                return None
            spec.loader = _LoadHook(spec.loader, w)
            return spec
        try:
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(name, path)
        except Exception:
            return None
        if spec is None or not isinstance(spec.origin, str) or spec.loader is None:
            return None
        if not any(_native.file_matches(f, spec.origin) for f in w.pending_files):
            return None
        spec.loader = _LoadHook(spec.loader, w)
        return spec

    def invalidate_caches(self):
        pass


def _module_matches(wanted, name):
    """Whether module `name` is the module a function probe names (the same, or ending
    with it after a dot)."""
    return name == wanted or name.endswith("." + wanted)


class _LoadHook:
    """A module's own loader, plus the probes right after its body ran."""

    def __init__(self, loader, worker):
        self._loader = loader
        self._worker = worker

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            # The module keeps its own loader, as if we had never been there.
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        try:
            self._worker.loaded(module)
        except Exception:
            pass

    def __getattr__(self, name):
        return getattr(self._loader, name)


class Worker(threading.Thread):
    def __init__(self, inherited=None):
        super().__init__(name="periscope-agent-python", daemon=True)
        self.lock = threading.RLock()
        self.stopping = False
        self.imported = True
        self.pending_files = ()
        self.pending_modules = ()
        self.generation = 0
        self.actions = []
        self.published = set()
        self.known_modules = 0
        self.places = {}
        self.mechanism = None
        #: Set once the catalog holds every loaded module (and again after each import).
        self.settled = threading.Event()
        self.watcher = None
        if inherited is not None:
            # A forked child: the parent's probes are not this agent's.
            try:
                with inherited.lock:
                    if inherited.mechanism is not None:
                        inherited.mechanism.release()
                    inherited._remove_watcher()
            except Exception:
                pass

    def stop(self):
        self.stopping = True
        with self.lock:
            if self.mechanism is not None:
                self.mechanism.release()
                self.mechanism = None
            self._remove_watcher()

    def _remove_watcher(self):
        try:
            if self.watcher is not None and self.watcher in sys.meta_path:
                sys.meta_path.remove(self.watcher)
        except Exception:
            pass

    def run(self):
        self.watcher = _Watcher(self)
        sys.meta_path.insert(0, self.watcher)
        try:
            _native.set_library_paths(library_paths())
        except Exception:
            pass
        while not self.stopping:
            try:
                command = _native.next_command(TICK_MS)
            except Exception:
                break
            try:
                if command is None:
                    self._tick()
                elif command[0] == "stop":
                    break
                elif command[0] == "install":
                    with self.lock:
                        self.generation, self.actions = command[1], command[2]
                        self._install()
                elif command[0] == "reconnected":
                    # Places silenced (DISABLE) while no broker session was up report again.
                    with self.lock:
                        if self.mechanism is not None:
                            self.mechanism.restart()
                elif command[0] == "log":
                    _level, action_id, text = command[1], command[2], command[3]
                    logging.getLogger("periscope.dynamic_log").log(_level, text, extra={"periscope_action": action_id})
            except Exception:
                pass
        self._remove_watcher()

    # -- catalog ---------------------------------------------------------------------

    def _tick(self):
        modules = sys.modules
        if not self.imported and len(modules) == self.known_modules:
            self.settled.set()
            return
        self.settled.clear()
        self.imported = False
        self.known_modules = len(modules)
        _native.refresh_types()
        batch = []
        loaded = []
        for name, path in catalog_order(modules):
            if path in self.published:
                continue
            if len(self.published) >= MAX_CATALOG_FILES:
                break
            self.published.add(path)
            loaded.append(path)
            entry = catalog_entry(name, path)
            if entry is not None:
                batch.append(entry)
            if len(batch) >= CATALOG_PER_TICK:
                self.imported = True  # more next tick
                break
        if batch:
            _native.publish(batch)
        if self.pending_files and any(_native.file_matches(f, p) for f in self.pending_files for p in loaded):
            with self.lock:
                self._install()

    def loaded(self, module):
        """A module holding a pending action just ran its body: probe it now."""
        with self.lock:
            self._install()

    # -- installing --------------------------------------------------------------------

    def _modules_for(self, file):
        out = []
        for name, module in list(sys.modules.items()):
            path = source_file(module)
            if path is not None and _native.file_matches(file, path):
                out.append(module)
        return out

    def _function_codes(self, module_name, name, original):
        """The code objects of function `name` (a qualified name) in the loaded modules
        `module_name` names (any module when None), with the modules' top code objects."""
        tops = []
        found = []
        for mod_name, module in list(sys.modules.items()):
            if module_name is not None and not _module_matches(module_name, mod_name):
                continue
            if mod_name.startswith("periscope_agent"):
                continue
            funcs = live_functions(module)
            # Before 3.11 code objects carry no qualified name: the functions do.
            qualnames = {}
            for code, fs in funcs.items():
                for f in fs:
                    q = getattr(f, "__qualname__", None)
                    if type(q) is str:
                        qualnames[original(code)] = q
            module_tops = list({original(c): None for c in funcs})
            for top in module_tops:
                for c in walk(top):
                    q = qualnames.get(c) or qualname(c)
                    if q == name and c.co_name != "<module>" and c not in found:
                        found.append(c)
                        tops.append(top)
        return tops, found

    def _install(self):
        """Resolves the current actions to code objects and instruments them."""
        places = {}  # (role, code, line) -> (actions, ends)
        pending = set()
        pending_modules = set()
        codes_cache = {}

        original = self.mechanism.original if self.mechanism is not None else (lambda c: c)

        def codes_in(file):
            if file not in codes_cache:
                funcs = {}
                for module in self._modules_for(file):
                    funcs.update(live_functions(module))
                # Functions we injected into hold new code: resolve from the originals.
                tops = list({original(c): None for c in funcs})
                every = []
                seen = set()
                for top in tops:
                    for c in walk(top):
                        if id(c) not in seen and _native.file_matches(file, c.co_filename):
                            seen.add(id(c))
                            every.append(c)
                codes_cache[file] = (tops, every)
            return codes_cache[file]

        def add(role, code, line, index, end):
            actions, ends = places.setdefault((role, code, line), ([], []))
            (ends if end else actions).append(index)

        all_tops = []
        errors = False
        for index, file, line, end_file, end_line, whole, captures_errors, function, calls in self.actions:
            if captures_errors:
                # Armed everywhere at once (PY_UNWIND); nothing to resolve.
                errors = True
                continue
            if function is not None:
                # A function probe: found by module and qualified name, wherever it is.
                module_name, name = function
                tops, codes = self._function_codes(module_name, name, original)
                all_tops.extend(tops)
                for c in codes:
                    add("start", c, None, index, False)
                    if whole or calls:
                        add("exit", c, None, index, True)
                if not codes and module_name is not None:
                    pending_modules.add(module_name)
                continue
            tops, codes = codes_in(file)
            all_tops.extend(tops)
            starts = [c for c in codes if c.co_firstlineno == line and c.co_name != "<module>"]
            found = False
            if starts:
                for c in starts:
                    add("start", c, None, index, False)
                    if whole:
                        add("exit", c, None, index, True)
                found = True
            else:
                for c in codes:
                    if line in own_lines(c):
                        add("line", c, line, index, False)
                        found = True
            if not found:
                pending.add(file)
            if end_file is not None and end_line is not None:
                end_tops, end_codes = codes_in(end_file)
                all_tops.extend(end_tops)
                for c in end_codes:
                    if c.co_firstlineno == end_line and c.co_name != "<module>":
                        add("start", c, None, index, True)
                    elif end_line in own_lines(c):
                        add("line", c, end_line, index, True)
        self.pending_files = tuple(pending)
        self.pending_modules = tuple(pending_modules)
        if self.mechanism is None and (places or errors):
            from ._instrument import make

            self.mechanism = make()
        entries = []
        keyed = []
        for (role, code, line), (actions, ends) in places.items():
            k = (role, code, line)
            key = self.places.get(k)
            if key is None:
                key = next(_keys)
                self.places[k] = key
            keyed.append((role, code, line, key))
            entries.append((role, code, line or 0, key, actions, ends))
        self.places = {(r, c, l): k for r, c, l, k in keyed}
        # The table first: a probe that fires before its slot exists would disable its
        # own line.
        if not _native.install(self.generation, entries):
            return
        if self.mechanism is not None:
            if hasattr(self.mechanism, "set_modules_codes"):
                self.mechanism.set_modules_codes(all_tops)
            self.mechanism.apply(keyed, errors=errors)
