"""A workload for function probes (the functions live in `checkout.py`): a checkout whose slowness is an argument (no timing
luck), its async twin, and a function that raises, each run on command from stdin
(`call OWNER DELAY_MS [fail]`, `acall OWNER DELAY_MS`, `fast N`), answering `DONE`.
Results are checked against what they must be, so a probe that changed behaviour
prints MISMATCH. Exits at EOF."""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import periscope_agent  # noqa: E402

periscope_agent.start(service="probed-py")


from checkout import CardDeclined, Cart, Checkout  # noqa: E402

SHOP = Checkout()


def run(cmd):
    parts = cmd.split()
    if parts[0] == "fast":
        for i in range(int(parts[1])):
            if SHOP.checkout(Cart("fast%d" % i, [1]), 0) != 1000:
                print("MISMATCH fast", flush=True)
    elif parts[0] == "call":
        owner, delay, fail = parts[1], int(parts[2]), parts[3:] == ["fail"]
        try:
            got = SHOP.checkout(Cart(owner, [1, 2, 3]), delay, fail)
            if fail or got != 3000:
                print("MISMATCH call", got, flush=True)
        except CardDeclined as e:
            if not fail or e.code != 402 or str(e) != "card declined for %s" % owner:
                print("MISMATCH raise", e, flush=True)
    elif parts[0] == "acall":
        got = asyncio.run(SHOP.checkout_async(Cart(parts[1], [1, 2]), int(parts[2])))
        if got != 20:
            print("MISMATCH acall", got, flush=True)
    elif parts[0] == "stats":
        print("STATS", periscope_agent.stats(), flush=True)


def main():
    print("READY agent=%s pid=%d" % (periscope_agent.agent_id(), os.getpid()), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd:
            run(cmd)
            print("DONE", cmd, flush=True)
    periscope_agent.stop()
    print("BYE", flush=True)


if __name__ == "__main__":
    main()
