"""The Python agent's cost to its host, side by side in one run against the same
workload without the agent (the numbers in BENCHMARKS.md, section "Python agent").

    python agent-python/bench/bench.py            # this interpreter, the installed wheel

Cases, each timed as the median of rounds of N calls of `hot` (ten locals), in CPU time
of the calling thread (`time.thread_time_ns`: other processes on a busy machine do not
count; the agent's own threads do not either, as they never run the host's code):

- baseline: no agent running (stopped between idle rounds; rounds in ABBA order);
- idle: the agent running (connected to nothing), no action anywhere;
- other: a live snapshot on another function of the same module (`other`);
- false_condition: a snapshot on `hot`'s last line whose condition is false;
- capture_locals: a snapshot on `hot`'s last line that fires on every call, capturing
  its ten locals and the names and lines of the call stack (budgets that never refuse;
  the hits are dropped by the agent thread, which has no broker);
- capture: the same with the default limits: the callers' locals too (five frames);
- function_other: a function probe (a snapshot of whole calls) on `other`, never called:
  what a function probe costs the rest of the process;
- function_fast: a function probe on `hot` whose `min_duration_ms` (an hour) no call
  reaches: what each fast call pays while the probe waits for a slow one (entry and exit
  callbacks, the arguments read and held, then dropped);
- function_hit: the same with `min_duration_ms` 0: every call a hit (arguments, return
  value, duration, the call stack).
- errors_live (3.12+): a live error-capture action and no other, while `hot` raises
  nothing (`PY_UNWIND` enabled globally): what capture on error costs while nothing
  fails;
- errors_library: the same action while every call also runs `library_error`, which
  raises an exception inside the standard library that the standard library catches
  (not the application's: counted nowhere, captured never), beside
  `library_error_base`, the same calls with the agent idle.

Prints one JSON object per case: ns per call, ratio to the baseline, and ns per firing
(the difference to the baseline).
"""

import json
import os
import statistics
import sys
import time

N = int(os.environ.get("BENCH_CALLS", "200000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
#: Baseline and idle rounds each (the idle ratio is the one closest to noise).
IDLE_ROUNDS = int(os.environ.get("BENCH_IDLE_ROUNDS", "15"))


def hot(i):
    a = i + 1
    b = a * 2
    c = b - 3
    d = "order-%d" % (i & 1023)
    e = [a, b]
    f = {"k": c}
    g = a if b > c else c
    h = 3.5
    j = None
    return a + b + c + len(d) + len(e) + len(f) + g + int(h)  # the probed line


HOT_LINE = hot.__code__.co_firstlineno + 10


def other(x):
    y = x * 2
    return y


def library_error(i):
    """An exception raised and caught inside the standard library (ipaddress tries
    IPv4, fails, then IPv6): unwinds through library frames only."""
    import ipaddress

    return ipaddress.ip_address("::%x" % (i & 0xFFFF))


def run(n=N, f=hot):
    t0 = time.thread_time_ns()
    for i in range(n):
        f(i)
    return (time.thread_time_ns() - t0) / n


def rounds(setup=None, f=hot):
    samples = []
    for _ in range(ROUNDS):
        if setup:
            setup()
        samples.append(run(f=f))
    return statistics.median(samples)


def main():
    run(20000)  # warm up
    import periscope_agent
    from periscope_agent import _native

    here = os.path.abspath(__file__)

    from periscope_agent import _agent

    def start():
        if _native.agent_id() is None:
            periscope_agent.start(broker_url="ws://127.0.0.1:9", agent_key="bench", pool="bench", service="bench")
            # The worker first publishes the catalog of loaded modules: a start-up
            # cost, not an idle one.
            _agent._worker.settled.wait(60)

    # Baseline and idle interleaved, in ABBA order so that neither always runs first
    # after a start or a stop: the agent is stopped for baseline rounds.
    base, idle = [], []

    def baseline_round():
        if _native.agent_id() is not None:
            periscope_agent.stop(0.2)
        base.append(run())

    def idle_round():
        start()
        idle.append(run())

    for r in range(IDLE_ROUNDS):
        for step in ((baseline_round, idle_round) if r % 2 == 0 else (idle_round, baseline_round)):
            step()
    baseline = statistics.median(base)
    results = {"baseline": baseline, "idle": statistics.median(idle)}

    def settle():
        time.sleep(0.5)  # the worker resolves and instruments

    _native.install_for_bench(here, other.__code__.co_firstlineno + 1)
    settle()
    results["other"] = rounds()
    _native.install_for_bench(here, HOT_LINE, "i < 0")
    settle()
    results["false_condition"] = rounds()
    _native.install_for_bench(here, HOT_LINE, None, 0)
    settle()
    results["capture_locals"] = rounds()
    _native.install_for_bench(here, HOT_LINE)
    settle()
    results["capture"] = rounds()
    _native.install_function_for_bench("__main__", "other", 3_600_000)
    settle()
    results["function_other"] = rounds()
    _native.install_function_for_bench("__main__", "hot", 3_600_000)
    settle()
    results["function_fast"] = rounds()
    _native.install_function_for_bench("__main__", "hot", 0)
    settle()
    results["function_hit"] = rounds()
    if sys.version_info >= (3, 12):
        # Idle again, then a live error capture alone, side by side with it.
        _native.install_errors_for_bench()
        settle()
        periscope_agent.stop(0.2)
        start()
        both = {"idle_again": [], "errors_live": [], "library_error_base": [], "errors_library": []}
        for r in range(ROUNDS):
            order = ("idle", "errors") if r % 2 == 0 else ("errors", "idle")
            for mode in order:
                if mode == "errors":
                    _native.install_errors_for_bench()
                    settle()
                    both["errors_live"].append(run())
                    both["errors_library"].append(run(N // 10, library_error))
                    periscope_agent.stop(0.2)
                    start()
                else:
                    both["idle_again"].append(run())
                    both["library_error_base"].append(run(N // 10, library_error))
        for case, samples in both.items():
            results[case] = statistics.median(samples)
    stats = periscope_agent.stats()
    periscope_agent.stop(0.2)
    v = sys.version_info
    mechanism = "sys.monitoring" if v >= (3, 12) else "bytecode injection"
    for case, ns in results.items():
        print(json.dumps({
            "python": "%d.%d.%d" % v[:3],
            "mechanism": mechanism,
            "case": case,
            "ns_per_call": round(ns, 1),
            "ratio": None if case == "library_error_base" else round(ns / (
                results["library_error_base"] if case == "errors_library" else
                results["idle_again"] if case == "errors_live" else baseline), 3),
            "ns_per_firing": round(ns - baseline, 1) if case in ("false_condition", "capture_locals", "capture", "function_fast", "function_hit") else None,
        }))
    print(json.dumps({"hits_dropped_by_agent_thread": stats.get("dropped_disconnected", 0) + stats.get("dropped_queue_full", 0),
                      "probe_errors": stats.get("probe_errors")}))


def loop(mode, n):
    """One process for callgrind (``bench.py loop base|idle N``): the agent started and
    idle (or not loaded at all), then N calls of `hot`. The main thread's instructions
    at two values of N, subtracted, are what one call costs: run.sh --instructions."""
    run(20000)
    if mode == "idle":
        import periscope_agent
        from periscope_agent import _agent

        periscope_agent.start(broker_url="ws://127.0.0.1:9", agent_key="bench", pool="bench", service="bench")
        _agent._worker.settled.wait(600)
    elif mode != "base":
        raise SystemExit("usage: bench.py loop base|idle N")
    run(n)


if __name__ == "__main__":
    if sys.argv[1:2] == ["loop"] and len(sys.argv) == 4:
        loop(sys.argv[2], int(sys.argv[3]))
    else:
        main()
