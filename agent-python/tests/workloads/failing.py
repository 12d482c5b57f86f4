"""A plain-stdlib service that fails, for capture on error: an exception escaping the
application's own functions (on the main thread and in a thread, where it escapes
into `threading`), and exceptions raised and caught inside the standard library or
escaping only library code (never the application's). Reads commands on stdin
(`fail N`); prints DONE after each; exits at EOF."""

import ipaddress
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import periscope_agent  # noqa: E402

periscope_agent.start(service="failing-py")


class Declined(Exception):
    pass


def charge(order_id, total_cents):
    card_number = "4111 1111 1111 1111"
    attempts = 3
    raise Declined("card declined for order %d" % order_id)  # L:raise


def checkout(order_id):
    basket = ["book", "lamp"]
    total_cents = 4200 + order_id
    charge(order_id, total_cents)


def library_only():
    # Raised and caught inside the standard library (ipaddress tries v4, then v6), and
    # a ValueError escaping only library code, caught here.
    try:
        ipaddress.ip_address("not-an-address")
    except ValueError:
        pass
    try:
        json.loads("{broken")
    except ValueError:
        pass


def in_thread():
    def worker():
        pending = {"sku": "sku-7"}
        raise KeyError("sku-7")  # L:thread

    t = threading.Thread(target=worker, name="stock-worker")
    t.start()
    t.join()


threading.excepthook = lambda args: None

print("READY", flush=True)
for line in sys.stdin:
    parts = line.split()
    if parts and parts[0] == "fail":
        for i in range(int(parts[1])):
            library_only()
            try:
                checkout(i)
            except Declined:
                pass
        in_thread()
        print("DONE", flush=True)
