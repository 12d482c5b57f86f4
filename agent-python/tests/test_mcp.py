"""The same MCP flow an assistant runs against Rust agents, against a Python agent,
through the official MCP Python SDK: list_agents shows a Rust agent (the demo shop,
`periscope shop-instance`) and the Python agent side by side; list_sources finds a
Python function; place_snapshot waits for its hit with locals; place_log and
place_metric work; remove_action ends an action."""

import asyncio
import os
import re
import subprocess
import tempfile

import pytest

from conftest import AGENT_KEY, API_KEY
from test_agent import line_of, ready

mcp = pytest.importorskip("mcp")
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402


def structured(result):
    return result.structured_content or {}


async def flow(broker):
    url = "http://127.0.0.1:%d/mcp" % broker.port
    async with create_mcp_http_client(headers={"Authorization": "Bearer " + API_KEY}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                agents = None
                for _ in range(300):
                    agents = structured(await session.call_tool("list_agents", {}))
                    languages = {a["language"] for a in agents.get("items", [])}
                    if {"rust", "python"} <= languages:
                        break
                    await asyncio.sleep(0.1)
                languages = {a["language"]: a for a in agents.get("items", [])}
                assert {"rust", "python"} <= set(languages), agents
                assert languages["python"]["runtime"].startswith("cpython 3.")

                listed = await session.call_tool("list_sources", {"pool": "py", "query": "compute_total"})
                sources = structured(listed)
                # The text an assistant reads names the function and its lines with code.
                text = "".join(getattr(c, "text", "") for c in listed.content)
                assert re.search(r"shop\.py:\d+-\d+ function `compute_total`( function=\S+)? lines with code \[\d", text), text
                found = [s for s in sources["items"] if s["name"] == "compute_total"]
                assert found and found[0]["kind"] == "span" and found[0]["lines"], sources
                line = line_of("total")

                placed = await session.call_tool(
                    "place_snapshot",
                    {"pool": "py", "file": "shop.py", "line": line, "max_hits": 1, "timeout_seconds": 30,
                     "condition": "discount == 50", "watch": ["customer.name"]},
                )
                assert not placed.is_error, placed.content
                snap = structured(placed)
                hits = snap.get("hits") or []
                assert hits, snap
                assert hits[0]["fields"]["subtotal"]["value"] == 600
                assert hits[0]["watches"][0]["value"]["value"] == "Ada Lovelace"

                log = await session.call_tool(
                    "place_log", {"pool": "py", "file": "shop.py", "line": line, "template": "subtotal={subtotal}"}
                )
                assert not log.is_error, log.content
                metric = await session.call_tool(
                    "place_metric",
                    {"pool": "py", "file": "shop.py", "line": line_of("raise"), "kind": "counter", "expire_seconds": 60},
                )
                assert not metric.is_error, metric.content
                log_id = structured(log)["action"]["action_id"]
                got = None
                for _ in range(200):
                    got = structured(await session.call_tool("get_action", {"action_id": log_id}))
                    if got.get("lines"):
                        break
                    await asyncio.sleep(0.1)
                assert got.get("lines"), got
                removed = await session.call_tool("remove_action", {"action_id": log_id})
                assert not removed.is_error, removed.content

                nowhere = await session.call_tool(
                    "place_snapshot", {"pool": "py", "file": "shop.py", "line": line + 2, "max_hits": 1}
                )
                assert nowhere.is_error
                assert "no_such_location" in nowhere.content[0].text


def test_the_mcp_flow_works_against_a_python_agent_beside_a_rust_one(broker, service, interp):
    rust_log = tempfile.NamedTemporaryFile(prefix="periscope-rust-shop-", suffix=".log", delete=False)
    rust = subprocess.Popen(
        [os.environ["PERISCOPE_BIN"], "shop-instance", "--broker-url", broker.ws + "/agents", "--agent-key", AGENT_KEY,
         "--pool", "shop", "--tags", "env:test", "--instance", "shop-rs", "--region", "eu", "--seed", "1", "--rps", "2"],
        stdin=subprocess.PIPE, stdout=rust_log, stderr=subprocess.STDOUT,
    )
    try:
        svc = service(interp, "shop.py", "py")
        ready(svc, broker, "py")
        asyncio.run(flow(broker))
    finally:
        rust.stdin.close()
        try:
            rust.wait(10)
        except subprocess.TimeoutExpired:
            rust.kill()
            rust.wait()
