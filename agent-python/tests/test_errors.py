"""Capture on error for Python: an exception escaping the application's own code is
captured once per location and type per second, with the locals of its application
frames, and every occurrence counted; exceptions raised and caught inside the standard
library, or escaping only library code, are not. Needs sys.monitoring (3.12+); older
interpreters answer the action with a clear error."""

import os

from conftest import WORKLOADS

FAILING = os.path.join(WORKLOADS, "failing.py")


def line_of(marker):
    for i, text in enumerate(open(FAILING), 1):
        if "# L:%s" % marker in text:
            return i
    raise AssertionError("no marker " + marker)


def version(interp):
    digits = interp.name.split("cpython")[1].split("-")[0]
    major, minor = digits.split(".")
    return int(major), int(minor)


def capture(broker, svc, pool):
    broker.wait_for("the service to start", lambda: "READY" in svc.output(), 60)
    broker.wait_agent(pool)
    placed = broker.post("/errors/capture", {"pool": pool})
    assert placed.get("kind") == "capture_errors", placed
    return placed["action_id"]


def agent_state(broker, action_id):
    agents = broker.action(action_id).get("agents", [])
    return agents[0] if agents else {}


def test_an_exception_escaping_app_code_is_captured_with_its_frames_locals_and_counted(broker, service, interp):
    pool = "failing"
    svc = service(interp, "failing.py", pool)
    action_id = capture(broker, svc, pool)
    if version(interp) < (3, 12):
        state = broker.wait_for("the agent's answer", lambda: agent_state(broker, action_id).get("state") == "error"
                                and agent_state(broker, action_id))
        assert "capture_errors" in (state.get("detail") or ""), state
        return
    broker.wait_for("the capture installed", lambda: agent_state(broker, action_id).get("state") == "installed")
    svc.proc.stdin.write(b"fail 5\n")
    svc.proc.stdin.flush()
    broker.wait_for("the workload to fail", lambda: "DONE" in svc.output())

    def listed():
        page = broker.get("/errors?pool=%s" % pool)
        errors = page.get("errors", []) if isinstance(page, dict) else []
        by_type = {e["error_type"]: e for e in errors}
        declined = by_type.get("__main__.Declined")
        return declined and declined["count"] == 5 and "KeyError" in by_type and errors

    errors = broker.wait_for("both errors counted", listed)
    types = sorted(e["error_type"] for e in errors)
    assert types == ["KeyError", "__main__.Declined"], "library exceptions are not captured: %s" % types
    assert errors[0]["error_type"] == "KeyError", "newest first"

    declined = next(e for e in errors if e["error_type"] == "__main__.Declined")
    assert (declined["captured"], declined["uncaptured"]) == (1, 4), declined
    assert declined["kind"] == "exception" and declined["line"] == line_of("raise"), declined
    assert declined["message"] == "card declined for order 4", "the latest message: %s" % declined
    snap = declined["snapshot"]
    assert snap["error"]["message"] == "card declined for order 0", "the captured one: %s" % snap["error"]
    assert snap["location"]["name"] == "charge", snap["location"]
    f = snap["fields"]
    assert f["order_id"] == {"type": "int", "value": 0}, f
    assert f["attempts"]["value"] == 3, f
    assert "4111" not in str(f["card_number"]), "redacted: %s" % f["card_number"]
    caller = snap["spans"][0]
    assert caller["name"] == "checkout", snap["spans"]
    assert caller["fields"]["total_cents"]["value"] == 4200, caller
    assert all("site-packages" not in (s.get("file") or "") for s in snap["spans"]), "app frames only"
    assert any("charge at" in frame for frame in snap["backtrace"]), snap["backtrace"]

    thread = next(e for e in errors if e["error_type"] == "KeyError")
    assert thread["line"] == line_of("thread") and thread["count"] == 1, thread
    pending = thread["snapshot"]["fields"]["pending"]
    assert pending["entries"][0]["value"]["value"] == "sku-7", pending
    assert thread["snapshot"]["location"]["name"] == "in_thread.<locals>.worker", thread["snapshot"]["location"]
    assert "Traceback" not in svc.output(), svc.output()[-2000:]
