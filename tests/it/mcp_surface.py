"""The whole MCP surface through the official Python SDK: every tool's structuredContent
validated against its outputSchema with the reference JSON Schema implementation
(`jsonschema`, Draft 2020-12), actions as resources with `resources/subscribe`
notifications as hits arrive, `logging/setLevel` with notifications about the caller's
actions, `completion/complete` for pools, tags, files, lines and action ids, and the
`remove_all_actions` kill switch (a developer's own actions; a pool's for an admin).
Prints one JSON line per step; exits non-zero on the first surprise.

Run by `tests/it/mcp.rs` with the interpreter at $PERISCOPE_PYTHON:

    python mcp_surface.py URL API_KEY ADMIN_KEY POOL FILE_SUFFIX FIELD
"""

import asyncio
import json
import sys

import jsonschema
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import PromptReference, ResourceTemplateReference


def step(name, **facts):
    print(json.dumps({"step": name, **facts}), flush=True)


def check(cond, what):
    if not cond:
        step("failed", what=what)
        sys.exit(1)


class Surface:
    def __init__(self):
        self.schemas = {}
        self.validated = {}
        self.updated = []
        self.logs = []

    async def on_message(self, message):
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/resources/updated":
            self.updated.append(root.params.uri)

    async def on_log(self, params):
        self.logs.append({"level": params.level, "data": params.data})

    def validate(self, tool, result):
        """Validates a successful result against the tool's outputSchema."""
        check(not result.is_error, f"{tool} succeeds: {result.content}")
        schema = self.schemas[tool]
        jsonschema.Draft202012Validator.check_schema(schema)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(result.structured_content))
        check(not errors, f"{tool}: structuredContent fails its outputSchema: {[e.message for e in errors[:3]]}")
        self.validated[tool] = self.validated.get(tool, 0) + 1
        return result.structured_content


async def main(url, key, admin_key, pool, file_suffix, field):
    s = Surface()
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write, logging_callback=s.on_log, message_handler=s.on_message) as session:
                init = await session.initialize()
                caps = init.capabilities
                check(caps.logging is not None, "the logging capability")
                check(caps.completions is not None, "the completions capability")
                check(caps.resources is not None and caps.resources.subscribe, "resources with subscribe")
                tools = (await session.list_tools()).tools
                for t in tools:
                    check(t.output_schema is not None, f"{t.name} declares an outputSchema")
                    s.schemas[t.name] = t.output_schema
                step("tools", count=len(tools))
                check(len(tools) == 17, "seventeen tools")

                await session.set_logging_level("debug")
                s.validate("system_health", await session.call_tool("system_health", {}))
                s.validate("list_agents", await session.call_tool("list_agents", {"pool": pool}))
                source = None
                for _ in range(200):
                    found = s.validate("list_sources", await session.call_tool("list_sources", {"pool": pool, "query": field}))
                    hits = [x for x in found["items"] if x["file"].endswith(file_suffix)]
                    if hits:
                        source = hits[0]
                        break
                    await asyncio.sleep(0.05)
                check(source is not None, "the location")
                loc = {"pool": pool, "file": source["file"], "line": source["line"]}

                snap = s.validate("place_snapshot", await session.call_tool("place_snapshot", {**loc, "max_hits": 1}))
                snap_id = snap["action"]["action_id"]
                s.validate("get_action", await session.call_tool("get_action", {"action_id": snap_id, "since": 0}))

                # A snapshot followed as a resource: subscribe, then hits arrive as updates.
                follow = s.validate(
                    "place_snapshot",
                    await session.call_tool("place_snapshot", {**loc, "max_hits": 3, "timeout_seconds": 60, "wait": False}),
                )
                follow_id = follow["action"]["action_id"]
                uri = f"periscope://actions/{follow_id}/hits"
                templates = (await session.list_resource_templates()).resource_templates
                check(any(t.uri_template == "periscope://actions/{action_id}/hits" for t in templates), "templates")
                listed = [r.uri for r in (await session.list_resources()).resources]
                check(uri in listed and f"periscope://actions/{follow_id}" in listed, "the action is listed")
                await session.subscribe_resource(uri)
                for _ in range(400):
                    if s.updated.count(uri) >= 1:
                        break
                    await asyncio.sleep(0.05)
                check(uri in s.updated, "notifications/resources/updated for the followed action")
                content = (await session.read_resource(uri)).contents[0]
                body = json.loads(content.text)
                check(content.mime_type == "application/json" and len(body["hits"]) >= 1, "the hits resource")
                check(field in body["hits"][0]["fields"], "the captured field in the resource")
                action = json.loads((await session.read_resource(f"periscope://actions/{follow_id}")).contents[0].text)
                check(action["action"]["action_id"] == follow_id, "the action resource")
                step("resources", updates=s.updated.count(uri), hits=len(body["hits"]))
                await session.unsubscribe_resource(uri)

                log = s.validate(
                    "place_log",
                    await session.call_tool("place_log", {**loc, "template": "total {" + field + "}", "expire_seconds": 60}),
                )
                log_id = log["action"]["action_id"]
                metric = s.validate(
                    "place_metric",
                    await session.call_tool("place_metric", {**loc, "kind": "counter", "expire_seconds": 60}),
                )
                metric_id = metric["action"]["action_id"]
                got = None
                for _ in range(200):
                    got = await session.call_tool("get_action", {"action_id": log_id, "since": 0})
                    if got.structured_content["lines"]:
                        break
                    await asyncio.sleep(0.05)
                check(s.validate("get_action", got)["lines"], "log lines")
                s.validate("get_action", await session.call_tool("get_action", {"action_id": metric_id}))
                s.validate("list_actions", await session.call_tool("list_actions", {}))
                s.validate("list_actions", await session.call_tool("list_actions", {"limit": 1}))

                # Completion of what people type.
                async def complete(ref, name, value, context=None):
                    r = await session.complete(ref, {"name": name, "value": value}, context)
                    return r.completion.values

                prompt = PromptReference(name="inspect_location")
                check(pool in await complete(prompt, "pool", pool[:2]), "pools complete")
                check("env:test" in await complete(prompt, "tags", "env", {"pool": pool}), "tags complete")
                files = await complete(prompt, "file", source["file"][:3], {"pool": pool})
                check(source["file"] in files, f"files complete: {files}")
                lines = await complete(prompt, "line", "", {"pool": pool, "file": source["file"]})
                check(str(source["line"]) in lines, f"lines complete: {lines}")
                ids = await complete(ResourceTemplateReference(uri="periscope://actions/{action_id}"), "action_id", "act_")
                check(log_id in ids, "action ids complete")
                check(await complete(prompt, "pool", "no-such-pool-prefix") == [], "nothing for an unknown prefix")
                step("completion", files=len(files), lines=len(lines))

                s.validate("remove_action", await session.call_tool("remove_action", {"action_id": log_id}))
                # The kill switch: every live action of this key.
                killed = s.validate("remove_all_actions", await session.call_tool("remove_all_actions", {}))
                check(killed["scope"] == "mine" and killed["count"] >= 1, "remove_all_actions removed mine")
                check(all(a["status"] != "active" for a in killed["removed"]), "all ended")
                left = s.validate("list_actions", await session.call_tool("list_actions", {"status": "active"}))
                check(all(a["created_by"] != "tester" for a in left["items"]), "none of mine left")
                step("remove_all_actions", count=killed["count"])

                # Log notifications about this caller's actions.
                for _ in range(100):
                    if any(m["data"].get("event") == "ended" for m in s.logs):
                        break
                    await asyncio.sleep(0.05)
                events = sorted({m["data"].get("event") for m in s.logs})
                check("hits" in events and "ended" in events, f"log notifications of hits and endings: {events}")
                step("logging", events=events, messages=len(s.logs))

                err = await session.call_tool("get_action", {"action_id": "act_doesnotexist0000000000000"})
                check(err.is_error and err.structured_content["error"]["code"] == "not_found", "errors carry a code")

    # An administrator: the audit trail, and a pool's actions whoever placed them.
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {admin_key}"}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as admin:
                await admin.initialize()
                for t in (await admin.list_tools()).tools:
                    s.schemas[t.name] = t.output_schema
                s.validate("query_audit", await admin.call_tool("query_audit", {"limit": 5}))
                s.validate("place_snapshot", await admin.call_tool(
                    "place_snapshot", {**loc, "max_hits": 5, "timeout_seconds": 60, "wait": False}))
                pool_kill = s.validate("remove_all_actions", await admin.call_tool("remove_all_actions", {"pool": pool}))
                check(pool_kill["scope"] == "pool" and pool_kill["pool"] == pool, "an admin clears the pool")
                # Capture on error, the blocklist and the pause switch: each answer in its schema.
                errors = s.validate("capture_errors", await admin.call_tool(
                    "capture_errors", {"pool": pool, "expire_seconds": 60}))
                s.validate("list_errors", await admin.call_tool("list_errors", {"pool": pool}))
                s.validate("remove_action", await admin.call_tool(
                    "remove_action", {"action_id": errors["action"]["action_id"]}))
                s.validate("get_blocklist", await admin.call_tool("get_blocklist", {}))
                rules = [{"name": "vault", "effect": "no_actions", "file": "src/vault.rs", "reason": "credentials"}]
                s.validate("set_blocklist", await admin.call_tool("set_blocklist", {"rules": rules}))
                s.validate("set_blocklist", await admin.call_tool("set_blocklist", {"rules": []}))
                paused = s.validate("pause_actions", await admin.call_tool(
                    "pause_actions", {"pool": pool, "reason": "surface test"}))
                check(paused.get("changed") is True, "the pool paused")
                s.validate("resume_actions", await admin.call_tool("resume_actions", {"pool": pool}))
    missing = sorted(set(s.schemas) - set(s.validated))
    check(not missing, f"every tool validated: missing {missing}")
    step("validated", tools=sorted(s.validated))
    step("done")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
