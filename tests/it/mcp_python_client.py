"""Drives Periscope's MCP server with the official Python MCP SDK (a client this project
did not write), the way an assistant would: find an agent, find a location, place a
snapshot and wait for its hits (with progress), read them again with a cursor, remove an
action. Prints one JSON line per step; exits non-zero on the first surprise.

Run by `tests/it/mcp.rs` with the interpreter at $PERISCOPE_PYTHON:

    python mcp_python_client.py URL API_KEY POOL FILE_SUFFIX FIELD
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def step(name, **facts):
    print(json.dumps({"step": name, **facts}), flush=True)


def check(cond, what):
    if not cond:
        step("failed", what=what)
        sys.exit(1)


def structured(result):
    return result.structured_content or {}


async def main(url, key, pool, file_suffix, field):
    headers = {"Authorization": f"Bearer {key}"}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                step("initialize", server=init.server_info.name, protocol=init.protocol_version)

                tools = {t.name: t for t in (await session.list_tools()).tools}
                step("tools", names=sorted(tools))
                check(len(tools) == 17, "seventeen tools (twelve for investigating; query_audit, the blocklist and the pause switch for admins)")
                snap_schema = tools["place_snapshot"].input_schema
                check(snap_schema["properties"]["max_hits"]["maximum"] == 50, "max_hits range in schema")

                prompts = [p.name for p in (await session.list_prompts()).prompts]
                step("prompts", names=sorted(prompts))
                check("investigate" in prompts, "investigate prompt")

                health = await session.call_tool("system_health", {})
                check(not health.is_error, "system_health succeeds")
                step("system_health", caller=structured(health)["caller"]["name"])

                agents = await session.call_tool("list_agents", {"pool": pool})
                items = structured(agents).get("items", [])
                check(len(items) >= 1, "an agent in the pool")
                step("list_agents", count=len(items), text=agents.content[0].text.splitlines()[0])

                source = None
                for _ in range(200):
                    sources = await session.call_tool("list_sources", {"pool": pool, "query": field})
                    found = [s for s in structured(sources).get("items", []) if s["file"].endswith(file_suffix)]
                    if found:
                        source = found[0]
                        break
                    await asyncio.sleep(0.05)
                check(source is not None, "the location in list_sources")
                step("list_sources", file=source["file"], line=source["line"], fields=source["fields"])

                progress = []

                async def on_progress(done, total, message):
                    progress.append({"progress": done, "total": total, "message": message})

                placed = await session.call_tool(
                    "place_snapshot",
                    {"pool": pool, "file": file_suffix, "line": source["line"], "max_hits": 2, "timeout_seconds": 60},
                    progress_callback=on_progress,
                )
                check(not placed.is_error, f"place_snapshot succeeds: {placed.content}")
                body = structured(placed)
                hits = body["hits"]
                check(len(hits) == 2, "two hits")
                check(field in hits[0]["fields"], "the field in the hit")
                action_id = body["action"]["action_id"]
                step(
                    "place_snapshot",
                    action_id=action_id,
                    hits=len(hits),
                    field=hits[0]["fields"][field],
                    progress=progress,
                    text=placed.content[0].text.splitlines()[0],
                )

                again = await session.call_tool("get_action", {"action_id": action_id, "since": 1})
                again_body = structured(again)
                check(len(again_body["hits"]) == 1 and again_body["hits"][0]["index"] == 2, "since skips seen hits")
                step("get_action", status=again_body["action"]["status"], next_cursor=again_body["next_cursor"])

                later = await session.call_tool(
                    "place_snapshot",
                    {"pool": pool, "file": file_suffix, "line": 1, "allow_pending": True, "wait": False},
                )
                check(not later.is_error, f"place_snapshot without waiting succeeds: {later.content}")
                later_id = structured(later)["action"]["action_id"]
                removed = await session.call_tool("remove_action", {"action_id": later_id})
                check(structured(removed)["action"]["status"] == "removed", "removed")
                step("remove_action", action_id=later_id)

                bad = await session.call_tool(
                    "place_snapshot", {"pool": pool, "file": file_suffix, "line": source["line"], "max_hits": 51}
                )
                check(bad.is_error and structured(bad)["error"]["code"] == "invalid_input", "invalid_input")
                step("invalid_input", message=structured(bad)["error"]["message"])
                step("done")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
