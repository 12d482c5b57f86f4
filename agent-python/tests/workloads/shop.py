"""A small plain-stdlib service for the agent's tests: an HTTP server, pure functions
called in a loop, a thread started before any action (a long-running loop), asyncio
tasks, and a function that raises. Every result is checked against what it must be,
so a probe that changed behaviour prints MISMATCH. Lines the tests target carry a
`# L:name` marker. Reads commands on stdin (`import NAME`, `fork`); exits at EOF."""

import asyncio
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import periscope_agent  # noqa: E402

periscope_agent.start(service="shop-py")


class Address:
    def __init__(self, street, city):
        self.street = street
        self.city = city


class Customer:
    def __init__(self, name, email, card_number, address):
        self.name = name
        self.email = email
        self.card_number = card_number
        self.address = address


class Point:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x = x
        self.y = y


class Sneaky:
    """Every hook a careless reader would call runs code here, and says so."""

    touched = []

    def __repr__(self):
        Sneaky.touched.append("repr")
        return "sneaky"

    def __getattr__(self, name):
        Sneaky.touched.append("getattr " + name)
        raise AttributeError(name)

    @property
    def secret(self):
        Sneaky.touched.append("property")
        return 1


CUSTOMER = Customer("Ada Lovelace", "ada@example.com", "4111 1111 1111 1111", Address("12 Analytical Way", "London"))


def compute_total(items, discount, customer):
    subtotal = sum(price * qty for price, qty in items)
    note = "x" * 1000
    nested = {"a": {"b": {"c": {"d": 1}}}}
    point = Point(3, 4)
    sneaky = Sneaky()
    helpers = (risky, len, Point, CUSTOMER.__init__)
    total = subtotal - discount  # L:total
    return total


def risky(n):
    if n % 2:
        raise ValueError("odd %d" % n)  # L:raise
    return n // 2


def timed(n):
    acc = 0  # L:timed-start
    for i in range(n):
        acc += i
    return acc  # L:timed-end


def long_loop(state):
    n = 0
    while not state["stop"]:
        n += 1
        tick = n * 2  # L:loop-body
        state["ticks"] = tick
        time.sleep(0.01)


async def handle(i):
    value = i * 3  # L:async-body
    await asyncio.sleep(0.005)
    return value


async def async_main(state):
    while not state["stop"]:
        results = await asyncio.gather(*(handle(i) for i in range(3)))
        if results != [0, 3, 6]:
            print("MISMATCH async", results, flush=True)
        await asyncio.sleep(0.01)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        total = compute_total([(250, 2), (100, 1)], 50, CUSTOMER)
        body = ("total=%d" % total).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def work(state):
    i = 0
    while not state["stop"]:
        i += 1
        if compute_total([(250, 2), (100, 1)], 50, CUSTOMER) != 550:
            print("MISMATCH total", flush=True)
        try:
            r = risky(i)
            if i % 2 or r != i // 2:
                print("MISMATCH risky", i, r, flush=True)
        except ValueError as e:
            if not i % 2 or str(e) != "odd %d" % i:
                print("MISMATCH raise", i, e, flush=True)
        if timed(50) != 1225:
            print("MISMATCH timed", flush=True)
        if Sneaky.touched:
            print("MISMATCH touched", Sneaky.touched, flush=True)
            Sneaky.touched.clear()
        time.sleep(0.01)


def main():
    state = {"stop": False, "ticks": 0}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    threading.Thread(target=long_loop, args=(state,), daemon=True, name="looper").start()
    threading.Thread(target=lambda: asyncio.run(async_main(state)), daemon=True, name="asyncio").start()
    threading.Thread(target=work, args=(state,), daemon=True, name="worker").start()
    print("READY port=%d agent=%s pid=%d" % (server.server_address[1], periscope_agent.agent_id(), os.getpid()), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd.startswith("import "):
            __import__(cmd.split()[1])
            print("IMPORTED", flush=True)
        elif cmd == "fork":
            pid = os.fork()
            if pid == 0:
                print("CHILD agent=%s pid=%d" % (periscope_agent.agent_id(), os.getpid()), flush=True)
                threading.Thread(target=work, args=(state,), daemon=True, name="child-worker").start()
                while True:
                    time.sleep(0.2)
                    if os.getppid() == 1:
                        os._exit(0)
            print("FORKED child=%d" % pid, flush=True)
        elif cmd == "stats":
            print("STATS", periscope_agent.stats(), flush=True)
    state["stop"] = True
    server.shutdown()
    periscope_agent.stop()
    print("BYE", flush=True)


if __name__ == "__main__":
    main()
