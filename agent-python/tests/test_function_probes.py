"""Function probes on a real Python agent through MCP (the official SDK): a snapshot of
whole calls of `module:qualname` (arguments at entry, the return value or exception at
exit, the duration) that `min_duration_ms` keeps to the slow ones; an async def timed
from its first run to its end; a duration metric on a function; an unknown function
refused with suggestions; list_sources naming functions. The slowness is a sleep
argument: fast calls sleep 0 ms, slow ones far over the threshold."""

import asyncio
import time

import pytest

from conftest import API_KEY

mcp = pytest.importorskip("mcp")
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

POOL = "probed"


def structured(result):
    return result.structured_content or {}


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


def command(svc, broker, cmd):
    """Runs one workload command and waits until it is done."""
    before = svc.output().count("DONE %s\n" % cmd)
    svc.proc.stdin.write((cmd + "\n").encode())
    svc.proc.stdin.flush()
    broker.wait_for("`%s` to run" % cmd, lambda: svc.output().count("DONE %s\n" % cmd) > before, 60)


def start(broker, service, interp):
    svc = service(interp, "probed.py", POOL)
    broker.wait_for("the service to start", lambda: "READY" in svc.output(), 60)
    broker.wait_agent(POOL)
    broker.wait_source(POOL, "checkout.py")
    return svc


async def session_for(broker, body):
    url = "http://127.0.0.1:%d/mcp" % broker.port
    async with create_mcp_http_client(headers={"Authorization": "Bearer " + API_KEY}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await body(session)


async def installed(session, action_id):
    for _ in range(300):
        got = structured(await session.call_tool("get_action", {"action_id": action_id}))
        states = [a.get("state") for a in got.get("action", got).get("agents", [])]
        if "installed" in states:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError("not installed: %r" % got)


def test_a_function_probe_catches_the_slow_call_with_its_arguments_and_return_value(broker, service, interp):
    if not qualified(interp):
        pytest.skip("catalogs on 3.9 and 3.10 carry plain function names, not qualified ones")
    svc = start(broker, service, interp)
    command(svc, broker, "fast 1")

    async def flow(session):
        listed = await session.call_tool("list_sources", {"pool": POOL, "name": "Checkout.checkout"})
        assert "function=checkout:Checkout.checkout" in text_of(listed), text_of(listed)
        items = [s for s in structured(listed)["items"] if s["name"] == "Checkout.checkout"]
        assert items and items[0]["function"] == "checkout:Checkout.checkout", items

        placed = await session.call_tool(
            "place_snapshot",
            {"pool": POOL, "function": "checkout:Checkout.checkout", "min_duration_ms": 250, "max_hits": 1,
             "wait": False, "timeout_seconds": 120},
        )
        assert not placed.is_error, text_of(placed)
        action_id = structured(placed)["action"]["action_id"]
        await installed(session, action_id)
        await asyncio.to_thread(command, svc, broker, "fast 50")
        await asyncio.to_thread(command, svc, broker, "call Slow_Sam 400")
        await asyncio.to_thread(command, svc, broker, "fast 50")
        got = await session.call_tool("get_action", {"action_id": action_id, "since": 0, "wait_seconds": 30})
        assert not got.is_error, text_of(got)
        hits = structured(got)["hits"]
        assert len(hits) == 1, hits
        hit = hits[0]
        f = hit["fields"]
        assert f["delay_ms"] == {"type": "int", "value": 400}, f
        assert f["cart"]["fields"]["owner"]["value"] == "Slow_Sam", f
        assert f["return"] == {"type": "int", "value": 3000}, f
        assert "exception" not in f
        assert hit["call"]["outcome"] == "returned"
        assert hit["call"]["duration_ms"] >= 400
        assert hit["location"]["name"] == "Checkout.checkout"
        assert "call returned after" in text_of(got)
        return hit

    asyncio.run(session_for(broker, flow))
    out = svc.output()
    assert "MISMATCH" not in out and "Traceback" not in out, out[-2000:]


def qualified(interp):
    """Whether the interpreter's catalogs name functions by qualified name (3.11+:
    `co_qualname`). On 3.9 and 3.10 catalogs carry plain names, so a method cannot be
    named `Class.method` at placement: a known limitation, documented."""
    return "3.9" not in interp.name and "3.10" not in interp.name


def monitoring(interp):
    """Whether the interpreter has sys.monitoring (3.12+): the only way a probe sees a
    function end by an exception (bytecode injection on 3.9 to 3.11 probes returns)."""
    return "3.11" not in interp.name and "3.10" not in interp.name and "3.9" not in interp.name


def test_a_function_probe_catches_an_exception_with_its_arguments(broker, service, interp):
    if not monitoring(interp):
        pytest.skip("a call that raises is seen through sys.monitoring (3.12+) only")
    svc = start(broker, service, interp)
    command(svc, broker, "fast 1")

    async def flow(session):
        raised = await session.call_tool(
            "place_snapshot",
            {"pool": POOL, "function": "checkout:Checkout.checkout", "min_duration_ms": 100, "max_hits": 1,
             "wait": False},
        )
        assert not raised.is_error, text_of(raised)
        action_id = structured(raised)["action"]["action_id"]
        await installed(session, action_id)
        await asyncio.to_thread(command, svc, broker, "fast 20")
        await asyncio.to_thread(command, svc, broker, "call Failing_Fay 200 fail")
        got = await session.call_tool("get_action", {"action_id": action_id, "since": 0, "wait_seconds": 30})
        hit = structured(got)["hits"][0]
        assert hit["call"]["outcome"] == "raised", hit
        assert hit["fields"]["cart"]["fields"]["owner"]["value"] == "Failing_Fay", hit
        exc = hit["fields"]["exception"]
        assert exc["type"] == "object" and exc["type_name"].endswith("CardDeclined"), exc
        assert "card declined for Failing_Fay" in str(exc) and "402" in str(exc), exc
        assert "return" not in hit["fields"]
        assert "call raised after" in text_of(got)

    asyncio.run(session_for(broker, flow))
    out = svc.output()
    assert "MISMATCH" not in out and "Traceback" not in out, out[-2000:]


def test_a_function_probe_on_an_async_def_times_it_from_first_run_to_end(broker, service, interp):
    if not qualified(interp):
        pytest.skip("catalogs on 3.9 and 3.10 carry plain function names, not qualified ones")
    svc = start(broker, service, interp)
    command(svc, broker, "acall warm 0")

    async def flow(session):
        slow_async = await session.call_tool(
            "place_snapshot",
            {"pool": POOL, "function": "Checkout.checkout_async", "min_duration_ms": 200, "max_hits": 1,
             "wait": False},
        )
        assert not slow_async.is_error, text_of(slow_async)
        # The module was filled in from the catalog: the only module with that function.
        action = structured(slow_async)["action"]
        assert action["function"]["module"] == "checkout", action
        await installed(session, action["action_id"])
        await asyncio.to_thread(command, svc, broker, "acall quick 0")
        await asyncio.to_thread(command, svc, broker, "acall Slow_Async 300")
        got = await session.call_tool("get_action", {"action_id": action["action_id"], "since": 0, "wait_seconds": 30})
        hits = structured(got)["hits"]
        assert len(hits) == 1, hits
        # Awaits included: the coroutine slept 300 ms between its first run and its end.
        assert hits[0]["call"]["duration_ms"] >= 300, hits[0]
        assert hits[0]["fields"]["return"]["value"] == 20, hits[0]
        assert hits[0]["fields"]["cart"]["fields"]["owner"]["value"] == "Slow_Async", hits[0]

    asyncio.run(session_for(broker, flow))
    out = svc.output()
    assert "MISMATCH" not in out and "Traceback" not in out, out[-2000:]


def test_a_duration_metric_on_a_function_and_an_unknown_function_refused_with_suggestions(broker, service, interp):
    if not qualified(interp):
        pytest.skip("catalogs on 3.9 and 3.10 carry plain function names, not qualified ones")
    svc = start(broker, service, interp)
    command(svc, broker, "fast 1")

    async def flow(session):
        unknown = await session.call_tool("place_snapshot", {"pool": POOL, "function": "checkout:Checkout.chekout"})
        assert unknown.is_error
        assert structured(unknown)["error"]["code"] == "no_such_location", text_of(unknown)
        assert "checkout:Checkout.checkout" in text_of(unknown), text_of(unknown)
        metric = await session.call_tool(
            "place_metric", {"pool": POOL, "kind": "duration", "function": "checkout:Checkout.checkout"}
        )
        assert not metric.is_error, text_of(metric)
        action_id = structured(metric)["action"]["action_id"]
        await installed(session, action_id)
        for delay in (20, 30, 40):
            await asyncio.to_thread(command, svc, broker, "call timed %d" % delay)
        total = {}
        for _ in range(300):
            got = structured(await session.call_tool("get_action", {"action_id": action_id}))
            total = ((got.get("action") or got).get("figures") or {}).get("total") or {}
            if total.get("count") == 3:
                break
            await asyncio.sleep(0.1)
        assert total.get("count") == 3, total
        assert total["min"] >= 20 and total["max"] >= 40, total

        # A log on a function is written as each call ends and reads its duration.
        log = await session.call_tool(
            "place_log",
            {"pool": POOL, "function": "checkout:Checkout.checkout",
             "template": "checkout by {cart.owner} returned {return} slow={duration_ms >= 50}"},
        )
        assert not log.is_error, text_of(log)
        log_id = structured(log)["action"]["action_id"]
        await installed(session, log_id)
        await asyncio.to_thread(command, svc, broker, "call Logged_Lou 60")
        lines = []
        for _ in range(300):
            lines = structured(await session.call_tool("get_action", {"action_id": log_id, "since": 0})).get("lines")
            if lines:
                break
            await asyncio.sleep(0.1)
        assert lines and lines[0]["text"] == "checkout by Logged_Lou returned 3000 slow=true", lines

    asyncio.run(session_for(broker, flow))
    stats = None
    svc.proc.stdin.write(b"stats\n")
    svc.proc.stdin.flush()
    broker.wait_for("stats", lambda: "STATS" in svc.output(), 30)
    stats = svc.output().split("STATS", 1)[1]
    assert "'calls_in_flight': 0" in stats, stats
