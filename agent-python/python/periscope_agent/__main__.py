"""``periscope-agent run -- COMMAND...`` (also ``python -m periscope_agent run -- ...``):
runs a Python program with the agent attached, configured by ``PERISCOPE_*``
environment variables, without changing the program.

It puts a ``sitecustomize`` of its own first on ``PYTHONPATH``: every Python process the
command starts (the program, gunicorn's master and workers, multiprocessing children)
starts the agent before the program's own code, then runs the ``sitecustomize`` it
shadowed, if any.
"""

import os
import sys

USAGE = """usage: periscope-agent run -- COMMAND [ARGS...]

Runs COMMAND with Periscope's agent in every Python process it starts. Settings come
from the environment: PERISCOPE_BROKER_URL, PERISCOPE_AGENT_KEY (required),
PERISCOPE_POOL, PERISCOPE_TAGS, PERISCOPE_SERVICE, PERISCOPE_SERVICE_VERSION,
PERISCOPE_DISPLAY_NAME, PERISCOPE_QUEUE_CAPACITY, PERISCOPE_RECONNECT_INITIAL_MS,
PERISCOPE_CA_CERT."""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "run":
        print("periscope-agent: unknown command %r\n\n%s" % (argv[0], USAGE), file=sys.stderr)
        return 2
    rest = argv[1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        print("periscope-agent run: no command given\n\n%s" % USAGE, file=sys.stderr)
        return 2
    boot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = boot + (os.pathsep + existing if existing else "")
    env["PERISCOPE_AUTOSTART"] = "1"
    command = rest[0]
    if command in ("python", "python3") or os.path.basename(command) == os.path.basename(sys.executable):
        command = sys.executable
    try:
        os.execvpe(command, [rest[0]] + rest[1:], env)
    except OSError as e:
        print("periscope-agent run: cannot run %r: %s" % (rest[0], e), file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
