"""Periscope's Python agent.

Attach it to a running service and a Periscope broker can place snapshots (the locals
and the call stack at a line), dynamic logs and metrics on any executable line of any
loaded module, without code changes, restarts or redeploys::

    import periscope_agent
    periscope_agent.start(broker_url="ws://broker:7070", agent_key="...", pool="web")

or with no code at all::

    periscope-agent run -- gunicorn app:app

Settings left out come from the same ``PERISCOPE_*`` environment variables as the Rust
agent (``PERISCOPE_BROKER_URL``, ``PERISCOPE_AGENT_KEY``, ``PERISCOPE_POOL``,
``PERISCOPE_TAGS``, ``PERISCOPE_SERVICE``, ...).

Guarantees to the host: with no live action nothing is installed; with live actions
only the code objects that hold them pay anything; a probe never raises into the host,
never calls the host's code (objects are read through their ``__dict__``, ``__slots__``
and the built-in containers' storage), and never waits on the network; a forked child
(gunicorn, multiprocessing) gets an agent of its own.
"""

from ._agent import agent_id, start, stats, stop

__all__ = ["start", "stop", "agent_id", "stats"]
