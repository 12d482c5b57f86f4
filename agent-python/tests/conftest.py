"""The Python agent's test harness: a real broker (the ``periscope`` binary) on a free
loopback port, workloads run as real processes with the agent attached (under the
virtualenv's CPython and, when prepared by scripts/test, under CPython 3.13 in a
minimal Debian root entered with chroot), and a small REST client.

Environment (set by scripts/test): ``PERISCOPE_BIN`` (the broker binary),
``PERISCOPE_AGENT_WHEEL_DIR`` (the built wheel unpacked, importable),
``PERISCOPE_PY313_ROOT`` (the chroot with python3.13; its tests skip without it);
optionally ``PERISCOPE_EXTRA_PYTHONS`` and ``PERISCOPE_EXTRA_PYTHONPATH`` (more
interpreters, see ``_interpreters``).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads")
API_KEY = "test-api-key-0123456789"
AGENT_KEY = "test-agent-key-0123456789"
#: Where the workloads live inside the 3.13 root.
ROOT_DIR = "/periscope-test"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Broker:
    """``periscope serve`` on a loopback port with a test API key and agent key."""

    def __init__(self, port=None, persistent=False):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="periscope-py-broker-")
        self.proc = None
        #: With a data directory, actions survive a restart of the broker.
        self.persistent = persistent

    @property
    def ws(self):
        return "ws://127.0.0.1:%d" % self.port

    @property
    def base(self):
        return "http://127.0.0.1:%d/api/v1" % self.port

    def start(self):
        binary = os.environ.get("PERISCOPE_BIN") or shutil.which("periscope")
        if not binary:
            pytest.fail("PERISCOPE_BIN is not set: run the tests through scripts/test")
        config = os.path.join(self.dir, "periscope.toml")
        with open(config, "w") as f:
            f.write('listen = "127.0.0.1:%d"\n' % self.port)
            if self.persistent:
                f.write('data_dir = "%s"\n' % os.path.join(self.dir, "data"))
            f.write(
                "[agents]\nheartbeat_interval_secs = 1\n"
                "[[api_keys]]\nname = \"tester\"\nkey = \"%s\"\nrole = \"company_admin\"\n"
                "[api_keys.quotas]\ncalls_per_minute = 60000\ncall_burst = 10000\n"
                "[[agent_keys]]\nkey = \"%s\"\n"
                "[org_quotas]\ncalls_per_minute = 600000\ncall_burst = 100000\n"
                # The agent under test is an unoptimized build on a shared two-core
                # machine, where a firing costs many times what it does in a release
                # build and the agent's clock also counts time its thread waits to be
                # scheduled: under the production budget (1% of a core) a busy machine
                # pauses steady workloads for `quota_cpu`, which is the budget doing its
                # job, not what these tests are about (the Rust suite does the same).
                "[quotas]\ncpu_fraction = 0.5\ncpu_burst_micros = 200000\n" % (API_KEY, AGENT_KEY)
            )
        env = dict(os.environ, PERISCOPE_LOG="warn")
        for var in ("PERISCOPE_API_KEY", "PERISCOPE_DATA_DIR", "PERISCOPE_LISTEN"):
            env.pop(var, None)
        self.log = open(os.path.join(self.dir, "broker.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.get("/health")
                return self
            except Exception:
                if self.proc.poll() is not None:
                    pytest.fail("the broker exited: %s" % open(self.log.name).read())
                time.sleep(0.1)
        pytest.fail("the broker did not answer within 30 s")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def request(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + API_KEY)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return {"status": e.code, **json.loads(payload)}
            except ValueError:
                return {"status": e.code, "body": payload.decode(errors="replace")}

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body):
        return self.request("POST", path, body)

    def wait_for(self, what, check, timeout=30.0):
        """Polls `check` until it returns something truthy; fails naming `what`."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.1)
        pytest.fail("timed out waiting for %s (last: %r)" % (what, last))

    def agents(self, pool=None):
        page = self.get("/agents?status=online" + ("&pool=%s" % pool if pool else ""))
        return page.get("items", []) if isinstance(page, dict) else []

    def wait_agent(self, pool, count=1, timeout=30.0):
        return self.wait_for(
            "%d agent(s) in pool %s" % (count, pool), lambda: (a := self.agents(pool)) and len(a) >= count and a, timeout
        )

    def wait_source(self, pool, file, timeout=30.0, agent_id=None):
        def found():
            who = "agent_id=%s" % agent_id if agent_id else "pool=%s" % pool
            page = self.get("/sources?%s&file=%s&limit=200" % (who, file))
            return [s for s in page.get("items", [])] if isinstance(page, dict) else []

        return self.wait_for("the catalog of %s to list %s" % (pool, file), found, timeout)

    def place(self, **body):
        return self.post("/actions", body)

    def hits(self, action_id, wait=20):
        page = self.get("/actions/%s/hits?wait_seconds=%d" % (action_id, wait))
        return page.get("items", []) if isinstance(page, dict) else []

    def action(self, action_id):
        return self.get("/actions/%s" % action_id)


@pytest.fixture
def broker():
    b = Broker().start()
    yield b
    b.stop()


class Interpreter:
    """A way to run a workload: this virtualenv's Python, or python3.13 in a chroot."""

    def __init__(self, name, argv_prefix, workload_dir, env_extra):
        self.name = name
        self.argv_prefix = argv_prefix
        self.workload_dir = workload_dir
        self.env_extra = env_extra

    def workload(self, name):
        return os.path.join(self.workload_dir, name)


def _interpreters():
    out = [Interpreter(
        "cpython%d.%d" % sys.version_info[:2], [sys.executable], WORKLOADS, {}
    )]
    root = os.environ.get("PERISCOPE_PY313_ROOT")
    if root and os.path.isdir(root):
        # The workloads and the unpacked wheel are copied into the root by scripts/test.
        out.append(Interpreter(
            "cpython3.13-chroot",
            ["chroot", root, "python3.13"],
            ROOT_DIR + "/workloads",
            {"PYTHONPATH": ROOT_DIR + "/site"},
        ))
    # More interpreters when there are some (e.g. pyenv's 3.9 and 3.12 on a developer's
    # machine): PERISCOPE_EXTRA_PYTHONS lists their executables, and
    # PERISCOPE_EXTRA_PYTHONPATH makes the unpacked wheel (and, for 3.9 to 3.11, a
    # `bytecode` release that supports them) importable.
    extra_path = os.environ.get("PERISCOPE_EXTRA_PYTHONPATH", "")
    for exe in os.environ.get("PERISCOPE_EXTRA_PYTHONS", "").split():
        try:
            version = subprocess.run(
                [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        out.append(Interpreter("cpython%s-extra" % version, [exe], WORKLOADS, {"PYTHONPATH": extra_path}))
    return out


INTERPRETERS = _interpreters()


@pytest.fixture(params=INTERPRETERS, ids=[i.name for i in INTERPRETERS])
def interp(request):
    return request.param


class Service:
    """A workload process with the agent attached."""

    def __init__(self, interp, broker, script, pool, args=(), attach="env", extra_env=None):
        self.interp = interp
        env = dict(os.environ)
        env.update(interp.env_extra)
        env.update({
            "PERISCOPE_BROKER_URL": broker.ws,
            "PERISCOPE_AGENT_KEY": AGENT_KEY,
            "PERISCOPE_POOL": pool,
            "PERISCOPE_RECONNECT_INITIAL_MS": "200",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        self.log_path = tempfile.mktemp(prefix="periscope-py-service-", suffix=".log")
        self.log = open(self.log_path, "w")
        argv = list(interp.argv_prefix) + [interp.workload(script)] + list(args)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()


@pytest.fixture
def service(broker):
    started = []

    def start(interp, script, pool, **kw):
        s = Service(interp, broker, script, pool, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
