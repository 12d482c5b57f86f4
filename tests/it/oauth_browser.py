"""Signs a person in to Periscope the way an MCP client does it for real: the official
Python MCP SDK's OAuth client discovers the broker's authorization server, registers
itself, and hands the authorization URL to a browser (Debian's Chromium, headless,
driven through Playwright) where the person signs in and, on the consent page, removes
one scope. Then: tool calls; the removed scope answers 403 `insufficient_scope`, the
SDK asks the person again (step-up) and they approve; a refresh; a revocation, after
which the next call is 401. Prints one JSON line per step; exits non-zero on the first
surprise.

Run by `tests/it/oauth_browser.rs` with the interpreter at $PERISCOPE_PYTHON:

    python oauth_browser.py MCP_URL USER PASSWORD CHROMIUM
"""

import asyncio
import http.server
import json
import sys
import threading
import time
import urllib.parse

import httpx2
from mcp import ClientSession
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata
from playwright.async_api import async_playwright

# The flags Chromium needs to stay offline and quiet in a test.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def step(name, **facts):
    print(json.dumps({"step": name, **facts}), flush=True)


def check(cond, what):
    if not cond:
        step("failed", what=what)
        sys.exit(1)


class Storage:
    """Token storage in memory (what a client keeps between runs)."""

    def __init__(self):
        self.tokens = None
        self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, info):
        self.client_info = info


class Callback:
    """The loopback redirect URI a native client listens on (RFC 8252): a real HTTP
    server that receives the browser after the consent page."""

    def __init__(self):
        self.results = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/callback":  # the browser's own requests (favicon)
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.results.append(dict(urllib.parse.parse_qsl(url.query)))
                body = b"<!doctype html><title>Done</title><p>Signed in. You can close this window.</p>"
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.port}/callback"


async def main(mcp_url, user, password, chromium):
    callback = Callback()
    storage = Storage()
    seen = []  # (status, www-authenticate) of every MCP response
    plan = {"consents": [], "allow_again": True}

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context()

        async def redirect_handler(authorization_url):
            """The person: a browser opens the authorization URL."""
            if not plan["allow_again"]:
                raise RuntimeError("the person does not sign in again")
            page = await context.new_page()
            await page.goto(authorization_url)
            if await page.locator("#sign-in").count() > 0:
                check("Periscope browser test" in await page.content(), "the sign-in page names the client")
                await page.fill("#username", user)
                await page.fill("#password", password)
                # Wait for the page the form leads to (consent, or the callback): a bare
                # `wait_for_load_state` can answer for the sign-in page itself, before the
                # navigation starts, and the consent step would be looked for too early.
                async with page.expect_navigation():
                    await page.click("#sign-in")
                step("signed_in")
            await page.wait_for_load_state()
            if await page.locator("#approve").count() > 0:
                boxes = await page.locator("input[name=scope]").evaluate_all("els => els.map(e => e.value)")
                first = not plan["consents"]
                plan["consents"].append(boxes)
                if first:
                    # The person narrows the request: no placing or removing actions.
                    await page.uncheck("#scope-mcp\\:actions\\:write")
                step("consent", offered=boxes, removed=["mcp:actions:write"] if first else [])
                await page.click("#approve")
            await page.wait_for_url(f"{callback.url()}*")
            check("Signed in" in await page.content(), "the browser reached the client's callback")
            await page.close()

        async def callback_handler():
            deadline = time.monotonic() + 30
            while not callback.results and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            check(callback.results, "the callback received the code")
            q = callback.results.pop(0)
            check("code" in q, f"a code, not {q}")
            return AuthorizationCodeResult(code=q["code"], state=q.get("state"), iss=q.get("iss"))

        oauth = OAuthClientProvider(
            server_url=mcp_url,
            client_metadata=OAuthClientMetadata(
                client_name="Periscope browser test",
                redirect_uris=[callback.url()],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                token_endpoint_auth_method="none",
            ),
            storage=storage,
            redirect_handler=redirect_handler,
            callback_handler=callback_handler,
        )

        async def record(response):
            if response.request.url.path.endswith("/mcp"):
                seen.append((response.status_code, response.headers.get("www-authenticate", "")))

        try:
            await run_session(mcp_url, oauth, storage, plan, seen, record, user)
        except BaseException as e:  # noqa: BLE001
            # After the revocation the SDK tries to sign in again and the person refuses:
            # the session's task group ends with that refusal, which is the expected end.
            if not (plan.get("finished") and "does not sign in again" in repr(e)):
                raise
        await browser.close()
    step("done")


async def run_session(mcp_url, oauth, storage, plan, seen, record, user):
    """The MCP session: calls, step-up, refresh, revocation."""
    async with create_mcp_http_client(auth=oauth) as http:
        http.event_hooks["response"].append(record)
        async with streamable_http_client(mcp_url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                check(any(s == 401 for s, _ in seen), "the first request was refused with 401")
                check(storage.tokens is not None, "the SDK holds tokens")
                granted = set(storage.tokens.scope.split())
                step("token", scope=sorted(granted))
                check("mcp:actions:write" not in granted, "the removed scope is not granted")
                check("mcp:agents:read" in granted, "the kept scopes are granted")

                health = await session.call_tool("system_health", {})
                check(not health.is_error, f"system_health works: {health.content}")
                caller = (health.structured_content or {}).get("caller", {})
                step("system_health", caller=caller.get("name"))
                check(caller.get("name") == user, "the call runs as the person")

                agents = await session.call_tool("list_agents", {})
                check(not agents.is_error, "list_agents works")

                # The removed scope: 403 insufficient_scope naming it; the SDK asks the
                # person again, who now approves everything.
                seen.clear()
                removed = await session.call_tool("remove_action", {"action_id": "act_0000000000000000000000000"})
                challenge = next((w for s, w in seen if s == 403), "")
                step("insufficient_scope", challenge=challenge)
                check('error="insufficient_scope"' in challenge, "403 with the insufficient_scope challenge")
                check('scope="mcp:actions:write"' in challenge, "the challenge names the scope")
                check(len(plan["consents"]) == 2, "the person was asked again")
                check("mcp:actions:write" in plan["consents"][1], "for the missing scope")
                check(removed.is_error, "the retried call reached the tool")
                code = (removed.structured_content or {}).get("code") or json.dumps(removed.content[0].text)
                step("step_up", tool_error=code)
                check("not_found" in code, "the tool answered not_found: the scope now holds")

                # Refresh: the SDK's token is made to look expired; it refreshes by itself.
                before = storage.tokens.access_token
                oauth.context.token_expiry_time = time.time() - 1
                again = await session.call_tool("system_health", {})
                check(not again.is_error, "a call after the refresh works")
                check(storage.tokens.access_token != before, "a new access token was issued")
                step("refreshed")

                # Revocation (RFC 7009) of the refresh token: the next call is 401.
                plan["allow_again"] = False
                revoked_access = storage.tokens.access_token
                async with httpx2.AsyncClient() as raw:
                    meta = (await raw.get(mcp_url.rsplit("/mcp", 1)[0] + "/.well-known/oauth-authorization-server")).json()
                    r = await raw.post(
                        meta["revocation_endpoint"],
                        data={
                            "token": storage.tokens.refresh_token,
                            "token_type_hint": "refresh_token",
                            "client_id": storage.client_info.client_id,
                        },
                    )
                    check(r.status_code == 200, "revocation answered 200")
                    probe = await raw.post(
                        mcp_url,
                        headers={
                            "authorization": f"Bearer {revoked_access}",
                            "accept": "application/json, text/event-stream",
                            "content-type": "application/json",
                        },
                        json={"jsonrpc": "2.0", "id": 9, "method": "ping"},
                    )
                    step("revoked", status=probe.status_code, challenge=probe.headers.get("www-authenticate"))
                    check(probe.status_code == 401, "the revoked token gets 401")
                seen.clear()
                try:
                    await session.call_tool("system_health", {})
                    failed = False
                except BaseException:  # the SDK gives up once the person cannot sign in again
                    failed = True
                check(any(s == 401 for s, _ in seen), "the session's next call got 401")
                step("after_revocation", sdk_failed=failed)
                plan["finished"] = True


if __name__ == "__main__":
    try:
        asyncio.run(main(*sys.argv[1:5]))
    except SystemExit:
        raise
    except BaseException as e:  # report what failed, then fail
        step("failed", what=repr(e))
        sys.exit(1)
