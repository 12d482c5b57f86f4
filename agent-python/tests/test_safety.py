"""Code-version safety and blocklists with the Python agent: agents of another version
(or build) refuse an action with the reason in their status while the placement
counts both, and a blocklist rule added after placement makes the agent drop the
action (matched by the function its catalog reports)."""

from conftest import Broker  # noqa: F401  (the fixtures' module)
from test_agent import line_of, ready


def agent_state(broker, action_id, agent_id):
    action = broker.action(action_id)
    for a in action.get("agents", []):
        if a["agent_id"] == agent_id:
            return a["state"], a.get("detail") or ""
    return None, ""


def test_agents_of_another_version_refuse_the_action_and_the_placement_counts_them(broker, service, interp):
    old = service(interp, "shop.py", "pyv", extra_env={"PERISCOPE_SERVICE_VERSION": "1.0", "PERISCOPE_BUILD": "aaaa1111"})
    new = service(interp, "shop.py", "pyv", extra_env={"PERISCOPE_SERVICE_VERSION": "2.0", "GIT_COMMIT": "bbbb2222"})
    for svc in (old, new):
        broker.wait_for("the service to start", lambda svc=svc: "READY" in svc.output(), 60)
    broker.wait_agent("pyv", count=2)
    ready(new, broker, "pyv")
    agents = {a["build"]: a for a in broker.agents("pyv")}
    assert agents["aaaa1111"]["service_version"] == "1.0", agents
    assert agents["bbbb2222"]["service_version"] == "2.0", agents
    page = broker.get("/agents?pool=pyv")
    assert page["versions"][0]["mixed"] is True, page["versions"]

    placed = broker.place(pool="pyv", file="shop.py", line=line_of("total"), max_hits=1, expected_version="2.0")
    check = placed["code_check"]
    assert (check["matched"], check["mismatched"]) == (1, 1), placed
    old_id = agents["aaaa1111"]["agent_id"]
    assert check["agents"][0]["agent_id"] == old_id
    state = broker.wait_for(
        "the old agent refusing the action",
        lambda: (lambda s: s if s[0] == "error" else None)(agent_state(broker, placed["action_id"], old_id)),
    )
    assert "code version differs" in state[1] and "`2.0`" in state[1], state

    # The file's hash as the Python agent reports it matches both copies.
    source = broker.wait_source("pyv", "shop.py")[0]
    assert source["hash"].startswith("sha256:"), source
    placed = broker.place(pool="pyv", file="shop.py", line=line_of("total"), max_hits=1, file_hash=source["hash"])
    assert placed["code_check"]["matched"] == 2, placed


def test_a_rule_added_after_placement_makes_the_python_agent_drop_the_action(broker, service, interp):
    svc = service(interp, "shop.py", "pyb")
    ready(svc, broker, "pyb")
    rule = {"name": "totals", "effect": "no_actions", "function": "compute_total", "reason": "pricing secrets"}
    assert broker.request("PUT", "/blocklist", {"rules": [rule]})["version"] == 1
    refused = broker.place(pool="pyb", file="shop.py", line=line_of("total"), max_hits=1)
    assert refused["status"] == 403 and refused["error"]["code"] == "blocked", refused
    assert "`totals`" in refused["error"]["message"], refused

    broker.request("PUT", "/blocklist", {"rules": []})
    placed = broker.post(
        "/logs", {"pool": "pyb", "file": "shop.py", "line": line_of("total"), "template": "t", "max_lines": 1000000}
    )
    broker.wait_for("lines", lambda: broker.action(placed["action_id"])["lines"] > 0)
    broker.request("PUT", "/blocklist", {"rules": [rule]})
    agent_id = broker.agents("pyb")[0]["agent_id"]
    state = broker.wait_for(
        "the agent dropping the action",
        lambda: (lambda s: s if s[0] == "error" else None)(agent_state(broker, placed["action_id"], agent_id)),
    )
    assert "`totals`" in state[1] and "dropped" in state[1], state
