"""The Python agent end to end: a real broker, a real service process with the agent
attached (under each interpreter prepared: the virtualenv's CPython, and CPython 3.13
with sys.monitoring in a chroot when scripts/test prepared it), actions placed over
REST, hits read back."""

import os
import re
import time

import pytest

from conftest import AGENT_KEY, WORKLOADS, Broker, Service

SHOP = os.path.join(WORKLOADS, "shop.py")


def line_of(marker, path=SHOP):
    for i, text in enumerate(open(path), 1):
        if "# L:%s" % marker in text:
            return i
    raise AssertionError("no marker " + marker)


def ready(svc, broker, pool):
    broker.wait_for("the service to start", lambda: "READY" in svc.output(), 60)
    broker.wait_agent(pool)
    broker.wait_source(pool, "shop.py")


def one_hit(broker, action_id, wait=20):
    hits = broker.hits(action_id, wait)
    if not hits:
        page = broker.get("/actions/%s/hits?wait_seconds=%d" % (action_id, wait))
        hits = page.get("hits", []) if isinstance(page, dict) else []
    assert hits, "no hit for %s: %s" % (action_id, broker.action(action_id))
    return hits[0]


def hits_of(broker, action_id, wait=20):
    page = broker.get("/actions/%s/hits?wait_seconds=%d" % (action_id, wait))
    return page.get("hits", []) if isinstance(page, dict) else []


def no_mismatch(svc):
    out = svc.output()
    assert "MISMATCH" not in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]


def test_a_snapshot_brings_back_locals_and_the_stack_truncated_and_redacted(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    placed = broker.place(pool="py", file="shop.py", line=line_of("total"), max_hits=1)
    hit = hits_of(broker, placed["action_id"])[0]
    assert hit["location"]["name"] == "compute_total"
    assert hit["location"]["line"] == line_of("total")
    f = hit["fields"]
    assert f["discount"] == {"type": "int", "value": 50}
    assert f["subtotal"]["value"] == 600
    customer = f["customer"]["fields"]
    assert customer["name"]["value"] == "Ada Lovelace"
    assert customer["email"]["value"] == "[REDACTED:EMAIL]"
    assert customer["card_number"]["value"].startswith("[REDACTED")
    assert customer["address"]["type_name"] == "Address"
    # Strings cut at 255 characters with their length; depth 3.
    assert f["note"]["original_len"] == 1000 and len(f["note"]["value"]) == 255
    c = f["nested"]["entries"][0]["value"]["entries"][0]["value"]["entries"][0]["value"]
    assert c["type"] == "cut" and c["reason"] == "depth"
    # __slots__ are read; a user's __repr__, __getattr__ and property never run.
    assert f["point"]["fields"]["x"]["value"] == 3
    assert f["sneaky"]["type_name"] == "Sneaky"
    # Functions, built-ins, classes and bound methods are labels, not namespaces.
    helpers = [v.get("value") for v in f["helpers"]["items"]]
    assert helpers == ["<function risky>", "<built-in function len>", "<class Point>", "<method Customer.__init__>"], f["helpers"]
    # The call stack: file, function, line per frame, callers' locals.
    names = [s["name"] for s in hit["spans"]]
    assert names[0] in ("work", "Handler.do_GET"), names
    assert all("line" in s and "file" in s for s in hit["spans"])
    assert hit["truncation"]["strings_shortened"] >= 1
    time.sleep(0.3)
    no_mismatch(svc)


def test_a_condition_true_fires_and_a_false_one_never_does(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    yes = broker.place(pool="py", file="shop.py", line=line_of("raise"), condition="n % 4 == 1", max_hits=2)
    no = broker.place(pool="py", file="shop.py", line=line_of("raise"), condition="n < 0", max_hits=1)
    hits = hits_of(broker, yes["action_id"])
    assert hits and all(h["fields"]["n"]["value"] % 4 == 1 for h in hits)
    time.sleep(1.0)
    assert hits_of(broker, no["action_id"], 0) == []
    no_mismatch(svc)


def test_a_watch_reads_an_attribute_and_redacted_values_stay_redacted(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    placed = broker.place(
        pool="py",
        file="shop.py",
        line=line_of("total"),
        max_hits=1,
        watch=["customer.address.city", "subtotal - discount", "customer.email"],
    )
    hit = hits_of(broker, placed["action_id"])[0]
    watches = {w["expression"]: w for w in hit["watches"]}
    assert watches["customer.address.city"]["value"]["value"] == "London"
    assert watches["subtotal - discount"]["value"]["value"] == 550
    email = watches["customer.email"]
    assert "ada@example.com" not in str(email)


def test_a_log_line_and_a_counter(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    log = broker.post(
        "/logs",
        {"pool": "py", "file": "shop.py", "line": line_of("total"), "template": "total for {customer.name}: {subtotal - discount} to {customer.email}"},
    )
    assert "action_id" in log, log
    counter = broker.post(
        "/metrics",
        {"pool": "py", "file": "shop.py", "line": line_of("raise"), "kind": "counter", "expire_seconds": 60},
    )
    assert "action_id" in counter, counter

    def lines():
        page = broker.get("/actions/%s/lines?limit=5" % log["action_id"])
        return page.get("lines") if isinstance(page, dict) else None

    got = broker.wait_for("log lines", lines)
    assert got[0]["text"].startswith("total for Ada Lovelace: 550 to ")
    assert "ada@example.com" not in got[0]["text"]

    def counted():
        m = broker.get("/actions/%s" % counter["action_id"])
        total = (m.get("figures") or {}).get("total") or {}
        return total.get("count", 0) > 0 and m

    broker.wait_for("the counter to count", counted, 40)
    no_mismatch(svc)


def test_a_duration_between_two_lines_and_of_a_whole_function(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    tictoc = broker.post(
        "/metrics",
        {
            "pool": "py",
            "file": "shop.py",
            "line": line_of("timed-start"),
            "end_file": "shop.py",
            "end_line": line_of("timed-end"),
            "kind": "duration",
            "expire_seconds": 60,
        },
    )
    assert "action_id" in tictoc, tictoc
    timed_def = line_of("timed-start") - 1
    whole = broker.post(
        "/metrics", {"pool": "py", "file": "shop.py", "line": timed_def, "kind": "duration", "expire_seconds": 60}
    )
    assert "action_id" in whole, whole

    def measured(action_id):
        def check():
            m = broker.get("/actions/%s" % action_id)
            total = (m.get("figures") or {}).get("total") or {}
            return total.get("count", 0) > 0 and total

        return check

    t = broker.wait_for("tic-toc samples", measured(tictoc["action_id"]), 40)
    assert t["min"] >= 0
    w = broker.wait_for("whole-function samples", measured(whole["action_id"]), 40)
    assert w["count"] > 0
    no_mismatch(svc)


def test_a_line_with_no_code_answers_with_the_nearest_lines(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    blank = line_of("total") + 2  # the blank line after `return total`
    assert open(SHOP).read().splitlines()[blank - 1].strip() == ""
    answer = broker.place(pool="py", file="shop.py", line=blank, max_hits=1)
    error = answer["error"]
    assert error["code"] == "no_such_location", answer
    nearest = [n["line"] for n in error["details"]["nearest"]]
    assert line_of("total") + 1 in nearest, answer
    assert "compute_total" in error["message"], error["message"]


def test_threads_started_before_the_action_and_asyncio_tasks_are_covered(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    loop = broker.place(pool="py", file="shop.py", line=line_of("loop-body"), max_hits=1)
    task = broker.place(pool="py", file="shop.py", line=line_of("async-body"), max_hits=2)
    # The loop's frame has run since before the placement (on 3.9 to 3.11 it runs
    # the function's old code object).
    hit = hits_of(broker, loop["action_id"])[0]
    assert hit["thread"]["name"] == "looper"
    assert hit["fields"]["n"]["value"] > 0
    hits = hits_of(broker, task["action_id"])
    assert hits and "task" in (hits[0]["thread"].get("name") or ""), hits[0]["thread"]
    assert hits[0]["fields"]["i"]["type"] == "int"
    no_mismatch(svc)


def test_a_module_imported_after_the_placement_is_caught_when_it_loads(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    late = os.path.join(WORKLOADS, "latemod.py")
    placed = broker.place(pool="py", file="latemod.py", line=line_of("late", late), max_hits=1, allow_pending=True)
    assert "action_id" in placed, placed
    svc.proc.stdin.write(b"import latemod\n")
    svc.proc.stdin.flush()
    hit = hits_of(broker, placed["action_id"])[0]
    assert hit["location"]["name"] == "late_function"
    assert hit["fields"]["x"]["type"] == "int"


def test_the_hosts_exceptions_and_return_values_are_unchanged_under_probes(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    for marker in ("raise", "total", "timed-end"):
        broker.place(pool="py", file="shop.py", line=line_of(marker), max_hits=50, watch=["1/0"])
    broker.post("/logs", {"pool": "py", "file": "shop.py", "line": line_of("raise"), "template": "{n.missing.deeper}"})
    time.sleep(2.0)
    no_mismatch(svc)
    assert svc.proc.poll() is None


def test_a_forked_child_gets_an_agent_of_its_own(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    parent = re.search(r"READY port=\d+ agent=(\S+)", svc.output()).group(1)
    svc.proc.stdin.write(b"fork\n")
    svc.proc.stdin.flush()
    child = broker.wait_for("the child", lambda: re.search(r"CHILD agent=(\S+)", svc.output()), 30).group(1)
    assert child != parent
    agents = broker.wait_agent("py", 2)
    assert {a["agent_id"] for a in agents} >= {parent, child}
    broker.wait_source("py", "shop.py", agent_id=child)
    placed = broker.place(agent_ids=[child], file="shop.py", line=line_of("total"), max_hits=1)
    hit = hits_of(broker, placed["action_id"])[0]
    assert hit["agent_id"] == child
    assert hit["thread"]["name"] == "child-worker"


def test_the_agent_survives_a_broker_that_comes_up_after_it(interp, tmp_path):
    broker = Broker()
    svc = Service(interp, broker, "shop.py", "late-broker")
    try:
        deadline = time.time() + 60
        while "READY" not in svc.output() and time.time() < deadline:
            time.sleep(0.1)
        assert "READY" in svc.output(), svc.output()
        time.sleep(1.0)
        broker.start()
        broker.wait_agent("late-broker", timeout=40)
        broker.wait_source("late-broker", "shop.py")
        placed = broker.place(pool="late-broker", file="shop.py", line=line_of("total"), max_hits=1)
        assert hits_of(broker, placed["action_id"])
    finally:
        svc.stop()
        broker.stop()


def test_a_probe_quiet_while_its_broker_was_away_fires_again_once_the_broker_is_back(interp):
    # While no session is up a line holding only captures stops reporting (3.12+:
    # `sys.monitoring.DISABLE`) and counts what it drops; the same action, still
    # installed when the broker comes back on its data directory, must fire again.
    broker = Broker(persistent=True).start()
    svc = Service(interp, broker, "shop.py", "away")
    try:
        ready(svc, broker, "away")
        placed = broker.place(pool="away", file="shop.py", line=line_of("loop-body"), max_hits=50)
        action_id = placed["action_id"]
        broker.wait_for("a first hit", lambda: len(hits_of(broker, action_id, 0)) >= 1, 30)
        broker.stop()
        time.sleep(2.0)  # the loop runs its line ~200 times with nobody to deliver to
        broker.start()
        broker.wait_agent("away", timeout=40)
        before = len(hits_of(broker, action_id, 0))
        broker.wait_for("a hit after the broker came back", lambda: len(hits_of(broker, action_id, 0)) > before, 30)
        # What the agent could not deliver was counted, and reported once it was back.
        broker.wait_for(
            "the drops while disconnected",
            lambda: broker.agents("away")[0]["stats"]["hits_dropped_disconnected"] > 0,
            30,
        )
        no_mismatch(svc)
    finally:
        svc.stop()
        broker.stop()


def test_list_agents_shows_the_language_and_runtime(broker, service, interp):
    svc = service(interp, "shop.py", "py")
    ready(svc, broker, "py")
    a = broker.agents("py")[0]
    assert a["language"] == "python"
    assert a["runtime"].startswith("cpython 3.")
    assert a["locations"] > 50
