#!/usr/bin/env python3
"""Periscope's redaction engine and Microsoft Presidio, side by side, on one corpus.

    python3 benches/presidio_compare.py [--seed 1234] [--per-kind 300]

Creates benches/.venv (gitignored) with presidio-analyzer and faker on first run,
generates the labelled corpus with redaction/corpus/generate.py, runs the Rust engine
on it (`cargo run --release -p periscope-redaction --example corpus_eval -- --json`),
runs Presidio's AnalyzerEngine on the same samples, single thread, offline (the
`no_op` NLP engine: no spaCy model; tldextract uses its bundled suffix list), and
prints recall per kind, hard negatives touched and throughput for both.

A positive counts as caught by Presidio when every occurrence of its secret in the
input is covered by the union of Presidio's result spans (any entity, any score); a
negative counts as touched when Presidio returns any result. Periscope is scored by the
corpus rules (no 6-character window of the secret survives the redacted output).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
PY = os.path.join(VENV, "bin", "python")
PACKAGES = ["presidio-analyzer==2.2.366", "faker==40.54.0"]


def ensure_venv():
    if not os.path.exists(PY):
        print(f"creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    probe = subprocess.run([PY, "-c", "import presidio_analyzer, faker"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([PY, "-m", "pip", "install", "-q", *PACKAGES], check=True)


def in_venv():
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def build_presidio():
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    # Offline: no download of the public suffix list, no spaCy model.
    offline = tldextract.TLDExtract(suffix_list_urls=())
    tldextract.extract = offline
    try:
        from presidio_analyzer.predefined_recognizers import email_recognizer

        email_recognizer.tldextract.extract = offline
    except Exception:
        pass
    nlp = NlpEngineProvider(
        nlp_configuration={"nlp_engine_name": "no_op", "models": [{"lang_code": "en", "model_name": "none"}]}
    ).create_engine()
    return AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])


def covered(text, secret, spans):
    needles = {secret, json.dumps(secret)[1:-1]}
    found = False
    for needle in needles:
        start = text.find(needle)
        while start >= 0 and needle:
            found = True
            end = start + len(needle)
            if not all(any(s <= i < e for s, e in spans) for i in range(start, end)):
                return False
            start = text.find(needle, end)
    return found


def run_presidio(samples, threshold):
    """Counts, per kind, [n, caught at any score, caught with score >= threshold]."""
    analyzer = build_presidio()
    analyzer.analyze(text="warm up jane@example.com 4111 1111 1111 1111", language="en")
    pos, neg = {}, {}
    total_bytes, seconds = 0, 0.0
    for s in samples:
        text = s["input"]
        t = time.perf_counter()
        results = analyzer.analyze(text=text, language="en")
        seconds += time.perf_counter() - t
        total_bytes += len(text.encode())
        spans = [(r.start, r.end) for r in results]
        strong = [(r.start, r.end) for r in results if r.score >= threshold]
        if s["label"] == "positive":
            k = pos.setdefault(s["kind"], [0, 0, 0])
            k[0] += 1
            k[1] += covered(text, s["secret"], spans)
            k[2] += covered(text, s["secret"], strong)
        else:
            k = neg.setdefault(s["kind"], [0, 0, 0])
            k[0] += 1
            k[1] += bool(spans)
            k[2] += bool(strong)
    return {"positives": pos, "negatives": neg, "bytes": total_bytes, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description="Periscope redaction vs Presidio")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--per-kind", type=int, default=300)
    ap.add_argument("--threshold", type=float, default=0.5, help="second Presidio column: results at or above this score")
    ap.add_argument("--out", default=os.path.join(HERE, ".venv", "corpus.jsonl"))
    args = ap.parse_args()
    ensure_venv()
    if not in_venv():
        os.execv(PY, [PY, os.path.abspath(__file__), *sys.argv[1:]])

    subprocess.run(
        [PY, os.path.join(ROOT, "redaction", "corpus", "generate.py"), "--seed", str(args.seed),
         "--per-kind", str(args.per_kind), "--negatives-per-kind", str(args.per_kind), "--out", args.out],
        check=True,
    )
    with open(args.out, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]

    ours = json.loads(
        subprocess.run(
            ["cargo", "run", "-q", "--release", "-p", "periscope-redaction", "--example", "corpus_eval", "--",
             args.out, "--json"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    theirs = run_presidio(samples, args.threshold)

    pct = lambda a, b: f"{100.0 * a / b:6.2f}%" if b else "   n/a"
    t = f">={args.threshold}"
    print(f"corpus: {len(samples)} samples, {theirs['bytes']} bytes, seed {args.seed}\n")
    print("recall (secret fully redacted / fully covered by Presidio results)")
    print(f"{'kind':<22} {'n':>5}  {'periscope':>9}  {'presidio':>9}  {'presidio' + t:>12}")
    for kind, k in ours["positives"].items():
        p = theirs["positives"].get(kind, [k["n"], 0, 0])
        print(f"{kind:<22} {k['n']:>5}  {pct(k['redacted'], k['n']):>9}  {pct(p[1], p[0]):>9}  {pct(p[2], p[0]):>12}")
    print("\nhard negatives touched (output changed / any Presidio result)")
    print(f"{'category':<22} {'n':>5}  {'periscope':>9}  {'presidio':>9}  {'presidio' + t:>12}")
    ot = on = tt = tn = ts = 0
    for kind, k in ours["negatives"].items():
        p = theirs["negatives"].get(kind, [k["n"], 0, 0])
        ot, on, tt, tn, ts = ot + k["touched"], on + k["n"], tt + p[1], tn + p[0], ts + p[2]
        print(f"{kind:<22} {k['n']:>5}  {pct(k['touched'], k['n']):>9}  {pct(p[1], p[0]):>9}  {pct(p[2], p[0]):>12}")
    print(f"{'all hard negatives':<22} {on:>5}  {pct(ot, on):>9}  {pct(tt, tn):>9}  {pct(ts, tn):>12}")
    our_mbs = ours["bytes"] / ours["seconds"] / 1e6
    their_mbs = theirs["bytes"] / theirs["seconds"] / 1e6
    print(f"\nthroughput (single thread, same samples): periscope {our_mbs:.1f} MB/s, "
          f"presidio {their_mbs:.3f} MB/s, ratio {our_mbs / their_mbs:.0f}x")


if __name__ == "__main__":
    main()
