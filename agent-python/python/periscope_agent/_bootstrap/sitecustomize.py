"""Started by ``periscope-agent run``: starts the agent in this Python process (from
``PERISCOPE_*`` variables), then runs the ``sitecustomize`` this file shadows, if any.
A configuration error is printed once and the program runs without the agent."""

import os
import sys


def _start():
    if os.environ.get("PERISCOPE_AUTOSTART") != "1":
        return
    try:
        import periscope_agent

        periscope_agent.start()
    except Exception as e:  # the program runs regardless
        print("periscope-agent: not started: %s" % (e,), file=sys.stderr)


def _chain():
    """Runs the next ``sitecustomize`` on the path (the one this file hides)."""
    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.util

    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_periscope_shadowed_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            return


_start()
_chain()
