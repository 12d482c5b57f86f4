"""Starting and stopping the agent, and keeping one per process across forks."""

import atexit
import os
import sys
import threading

from . import _native

_lock = threading.Lock()
_worker = None
_options = None


def _default_service():
    """The service name when none is configured: the script or module being run."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0)
    for suffix in (".py", ".pyz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name in ("", "-c", "-m", "__main__.py", "__main__"):
        name = os.path.basename(sys.executable or "python")
    return name or "python"


def _runtime():
    v = sys.version_info
    impl = sys.implementation.name
    return "%s %d.%d.%d (%s)" % (impl, v.major, v.minor, v.micro, sys.platform)


def start(
    broker_url=None,
    agent_key=None,
    pool=None,
    tags=None,
    service=None,
    service_version=None,
    build=None,
    display_name=None,
    ca_cert=None,
    queue_capacity=None,
    reconnect_initial_ms=None,
):
    """Starts the agent: its network thread (which never holds the GIL) and its worker.

    ``build`` is the git commit the service runs (default: ``PERISCOPE_BUILD``, else
    ``GIT_COMMIT``, ``SOURCE_VERSION``, ``GITHUB_SHA``, ``CI_COMMIT_SHA`` and the like).
    Arguments override the ``PERISCOPE_*`` environment variables. Returns the agent's
    id. Raises ``ValueError`` naming the setting when the configuration is unusable, and
    ``RuntimeError`` when an agent already runs in this process.
    """
    global _worker, _options
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    options = {
        "broker_url": broker_url,
        "agent_key": agent_key,
        "pool": pool,
        "tags": list(tags) if tags is not None else None,
        "service": service,
        "service_version": service_version,
        "build": build,
        "display_name": display_name,
        "ca_cert": ca_cert,
        "queue_capacity": queue_capacity,
        "reconnect_initial_ms": reconnect_initial_ms,
        "default_service": _default_service(),
        "runtime": _runtime(),
    }
    with _lock:
        agent = _native.start(options)
        _options = options
        from ._worker import Worker

        _worker = Worker()
        _worker.start()
        _register_fork_hooks()
    return agent


def stop(timeout=1.0):
    """Removes every probe, says goodbye to the broker and stops the agent."""
    global _worker
    with _lock:
        worker, _worker = _worker, None
        if worker is not None:
            worker.stop()
        _native.stop(int(timeout * 1000))


def agent_id():
    """This process's agent id, or ``None`` when no agent runs."""
    return _native.agent_id()


def stats():
    """Counters: hits sent and dropped (queue full, rate, broker away), probe errors."""
    return _native.stats()


_fork_hooks = False


def _register_fork_hooks():
    global _fork_hooks
    if _fork_hooks or not hasattr(os, "register_at_fork"):
        return
    _fork_hooks = True
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


def _before_fork():
    _native.before_fork()


def _after_fork_parent():
    _native.after_fork_parent()


def _after_fork_child():
    """A forked child gets an agent of its own: a new network thread and id, a new
    worker, and none of the parent's probes (the broker sends the child the actions
    aimed at its pool and tags when it registers)."""
    global _worker
    try:
        if _native.after_fork_child() is None:
            return
        from ._worker import Worker

        old = _worker
        _worker = Worker(inherited=old)
        _worker.start()
    except Exception:  # never break the host's fork
        pass


@atexit.register
def _at_exit():
    try:
        stop(0.5)
    except Exception:
        pass
