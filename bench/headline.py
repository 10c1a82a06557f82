#!/usr/bin/env python3
"""The README's headline performance table, made from bench/results/results.json so the two
never disagree.

    python3 bench/headline.py           # rewrites the table in README.md
    python3 bench/headline.py --check   # exits 1 if README.md's table is not the results'
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "results.json"
README = ROOT / "README.md"
START, END = "<!-- headline:start (bench/headline.py) -->", "<!-- headline:end -->"
COLUMNS = [("nginx", "nginx"), ("pingora", "bare Pingora"), ("tokn", "**tokn**"), ("litellm", "LiteLLM"),
           ("portkey", "Portkey")]


def number(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def cell(name, text):
    return f"**{text}**" if name == "tokn" and text != "–" else text


def render(results):
    cases = results["cases"]

    def metric(case, name, key, digits=0):
        row = cases.get(case, {}).get(name) or {}
        if case.startswith("stream") and row.get("ok", 0) == 0:
            return "fails"
        return number(row.get(key), digits)

    tokn_cpu = cases["c32"]["tokn"]["cpu_us_per_req"]
    rows = [
        ("CPU µs per request", lambda n: metric("c32", n, "cpu_us_per_req", 1)),
        ("requests/s per core", lambda n: metric("c32", n, "rps_per_core")),
        ("tokn's CPU per request ÷ this",
         lambda n: number(tokn_cpu / cases["c32"][n]["cpu_us_per_req"], 2 if n != "litellm" else 3)
         if (cases["c32"].get(n) or {}).get("cpu_us_per_req") else "–"),
        ("added latency p50 / p99, c=1 (µs)",
         lambda n: f'{metric("c1", n, "added_p50_us")} / {metric("c1", n, "added_p99_us")}'),
        ("SSE, 64 streams × 20 chunks × 5 ms: CPU µs per chunk",
         lambda n: metric("stream_paced_64", n, "cpu_us_per_chunk", 1)),
        ("rejecting a bad key: CPU µs", lambda n: metric("invalid_key", n, "cpu_us_per_req", 1)),
    ]
    lines = ["| 1 KB chat completions, 32 connections | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for label, value in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, value(n)) for n, _ in COLUMNS) + " |")
    pingora = cases["c32"]["pingora"]["cpu_us_per_req"]
    lines += ["", f"tokn does everything the floor does not (key lookup, body parse, pool choice, `include_usage`",
              f"injection, SSE metering, a usage record per request) for {tokn_cpu / pingora:.2f}× the CPU of bare "
              f"Pingora per request."]
    return "\n".join(lines)


def main():
    results = json.loads(RESULTS.read_text())
    readme = README.read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render(results)}\n{END}{tail}"
    if "--check" in sys.argv[1:]:
        if new != readme:
            sys.exit("README.md's headline table differs from bench/results/results.json: "
                     "run python3 bench/headline.py")
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
