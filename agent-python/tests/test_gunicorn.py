"""A forking server with the agent attached from outside: ``periscope-agent run --
gunicorn wsgishop:app`` with two workers, against a real broker. Each worker process
gets an agent of its own (``os.register_at_fork``), a snapshot placed on the pool
brings back hits from the workers that served requests, and the application's answers
are the same with the probe as without."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import AGENT_KEY, WORKLOADS, free_port

APP = os.path.join(WORKLOADS, "wsgishop.py")
POOL = "gunicorn"


def line_of(marker):
    for i, text in enumerate(open(APP), 1):
        if "# L:%s" % marker in text:
            return i
    raise AssertionError("no marker " + marker)


def expected_total(n):
    return 6 * n - n // 2


def _check_gunicorn(interp):
    """Skips (saying why) where gunicorn cannot run under this interpreter."""
    env = dict(os.environ)
    env.update(interp.env_extra)
    probe = "import sys; print('%d %d' % sys.version_info[:2]); import gunicorn"
    r = subprocess.run(list(interp.argv_prefix) + ["-c", probe], capture_output=True, text=True, env=env, timeout=60)
    version = tuple(int(p) for p in (r.stdout.split() + ["0", "0"])[:2] if p.isdigit())
    if version and version < (3, 10):
        pytest.skip("gunicorn 27 (requirements-dev.txt) supports CPython 3.10+, not %d.%d" % version)
    if r.returncode != 0:
        pytest.skip("gunicorn is not importable under %s (scripts/test installs it into the virtualenv and "
                    "copies it into the 3.12/3.13 sites): %s" % (interp.name, r.stderr.strip()[-300:]))


def _console_scripts(interp):
    """Whether this is the virtualenv's interpreter, whose console scripts are on PATH."""
    return list(interp.argv_prefix) == [sys.executable]


def _command(interp, port):
    args = ["-w", "2", "-b", "127.0.0.1:%d" % port, "--chdir", interp.workload_dir,
            "--timeout", "60", "--graceful-timeout", "5", "wsgishop:app"]
    if _console_scripts(interp):
        # As users type it: the virtualenv's console scripts, found on PATH.
        return ["periscope-agent", "run", "--", "gunicorn"] + args
    python = interp.argv_prefix[-1]
    return list(interp.argv_prefix) + ["-m", "periscope_agent", "run", "--", python, "-m", "gunicorn"] + args


def get(port, n):
    with urllib.request.urlopen("http://127.0.0.1:%d/?n=%d" % (port, n), timeout=30) as resp:
        body = resp.read().decode()
    m = re.fullmatch(r"pid=(\d+) n=(-?\d+) total=(-?\d+)\n", body)
    assert m, body
    assert int(m.group(2)) == n and int(m.group(3)) == expected_total(n), body
    return int(m.group(1))


def drive(port, count, start=0):
    """`count` requests, eight at a time; returns the pids of the workers that answered."""
    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(lambda n: get(port, n), range(start, start + count)))


def test_gunicorn_workers_attached_by_periscope_agent_run_each_get_an_agent_and_send_hits(broker, interp):
    _check_gunicorn(interp)
    port = free_port()
    env = dict(os.environ)
    env.update(interp.env_extra)
    env.update({
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        "PERISCOPE_BROKER_URL": broker.ws,
        "PERISCOPE_AGENT_KEY": AGENT_KEY,
        "PERISCOPE_POOL": POOL,
        "PERISCOPE_RECONNECT_INITIAL_MS": "200",
        "PYTHONUNBUFFERED": "1",
    })
    log = tempfile.NamedTemporaryFile("w+", prefix="periscope-py-gunicorn-", suffix=".log", delete=False)
    proc = subprocess.Popen(_command(interp, port), stdout=log, stderr=subprocess.STDOUT, env=env)

    def output():
        log.flush()
        with open(log.name) as f:
            return f.read()

    try:
        def answers():
            if proc.poll() is not None:
                pytest.fail("gunicorn exited: %s" % output()[-3000:])
            try:
                return get(port, 1)
            except OSError:
                return None

        broker.wait_for("gunicorn to answer", answers, 60)
        # Both workers serve (eight requests at a time, each 20 ms long).
        pids = set()
        deadline = time.time() + 30
        while len(pids) < 2 and time.time() < deadline:
            pids |= drive(port, 32)
        assert len(pids) == 2 and proc.pid not in pids, (pids, proc.pid)

        # An agent per worker, and one in the master (which never loads the app).
        def agents_by_pid():
            by_pid = {a["pid"]: a for a in broker.agents(POOL)}
            return by_pid if pids | {proc.pid} <= set(by_pid) else None

        by_pid = broker.wait_for("an agent in the master and in each worker", agents_by_pid, 60)
        workers = {by_pid[p]["agent_id"]: p for p in pids}
        assert len(workers) == 2 and by_pid[proc.pid]["agent_id"] not in workers, by_pid
        assert all(a["language"] == "python" for a in by_pid.values()), by_pid
        if _console_scripts(interp):
            assert all(a["service"] == "gunicorn" for a in by_pid.values()), by_pid
        for agent_id in workers:
            broker.wait_source(POOL, "wsgishop.py", agent_id=agent_id)

        placed = broker.place(pool=POOL, file="wsgishop.py", line=line_of("price"), max_hits=50)
        assert "action_id" in placed, placed
        action_id = placed["action_id"]
        # Requests until each worker's agent has sent a hit (the agents' per-action rate
        # is one hit a second); every answer checked against the one computed here.
        seen = {}
        n = 100
        deadline = time.time() + 60
        while set(seen) != set(workers) and time.time() < deadline:
            drive(port, 32, n)
            n += 32
            page = broker.get("/actions/%s/hits?limit=100" % action_id)
            for hit in page.get("hits", []) if isinstance(page, dict) else []:
                seen.setdefault(hit["agent_id"], hit)
        assert set(seen) == set(workers), (seen.keys(), workers, broker.action(action_id))
        for agent_id, hit in seen.items():
            assert hit["location"]["name"] == "price", hit
            f = hit["fields"]
            k = f["n"]["value"]
            assert f["subtotal"] == {"type": "int", "value": 6 * k}, f
            assert [i["value"] for i in f["items"]["items"]] == [k, 2 * k, 3 * k], f
        out = output()
        assert "Traceback" not in out and "not started" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)
