#!/usr/bin/env python3
"""Drain throughput: how fast usage records reach the ledger in Postgres, end to end.

A market of 1,000 buyers and 100 pools is set up through the control plane's API (fleet mode:
Postgres and Redis). A proxy's spool is filled with RECORDS records of that market (as the
proxy writes them), then the proxy starts: its shipper reads the spool in batches and posts
them to the control plane, which applies each record with its ledger postings, running
balances and pool consumption, and mirrors the balances to Redis. The clock runs from the
proxy's start to the last record applied (the control plane's /v1/admin/drain count).

Run through `bench/run` (it builds the release binaries), or alone after
`cargo build --release -p tokn-proxy -p tokn-control -p tokn-testkit`:
    python3 bench/drain.py            # prints a JSON line a round; results/drain.json

DRAIN_ROUNDS rounds (3 by default), each on fresh servers: this machine's neighbours slow it by
a quarter at times, so the result is the median round, with every round's rate beside it.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import postgres
from procs import cpu_seconds, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
RECORDS = int(os.environ.get("DRAIN_RECORDS", "300000"))
BUYERS = 1_000
POOLS = 100
# Unset: a Postgres and a Redis of the run's own (bench/postgres.py says how it is configured).
PG = os.environ.get("DRAIN_POSTGRES")
REDIS = os.environ.get("DRAIN_REDIS")
OWN_PG_PORT, OWN_REDIS_PORT = 9305, 9306
CONTROL_PORT = 9301
PROXY_PORT = 9302
FAKE_PORT = 9303
TMP = Path(tempfile.mkdtemp(prefix="tokn-drain-"))
ADMIN = "admin-" + os.urandom(16).hex()
PROXY_TOKEN = "proxy-" + os.urandom(16).hex()


def log(msg):
    print(f"[drain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def api(method, path, token, body=None, base=f"http://127.0.0.1:{CONTROL_PORT}"):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {token}",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read()
        return json.loads(text) if text else None


def psql(sql):
    subprocess.run(["psql", f"{PG}/postgres", "-q", "-c", sql], check=True,
                   stdout=subprocess.DEVNULL)


def main():
    global PG, REDIS
    rounds = []
    for _ in range(int(os.environ.get("DRAIN_ROUNDS", "3"))):
        PG, REDIS = os.environ.get("DRAIN_POSTGRES"), os.environ.get("DRAIN_REDIS")
        rounds.append(one_round())
        print(json.dumps(rounds[-1]), flush=True)
    result = sorted(rounds, key=lambda r: r["records_per_s"])[len(rounds) // 2]
    result = dict(result, rounds_records_per_s=[r["records_per_s"] for r in rounds])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "drain.json").write_text(json.dumps(result, indent=2) + "\n")


def one_round():
    """One drain on fresh servers and a fresh directory; returns its figures."""
    global PG, REDIS, TMP
    TMP = Path(tempfile.mkdtemp(prefix="tokn-drain-"))
    db = f"tokn_drain_{os.getpid()}"
    procs, pgdata = [], None
    if REDIS is None:
        procs.append(subprocess.Popen(["redis-server", "--port", str(OWN_REDIS_PORT), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(TMP)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        REDIS = f"redis://127.0.0.1:{OWN_REDIS_PORT}"
    if PG is None:
        pg, pgdata = postgres.start(OWN_PG_PORT)
        if pg is None:
            sys.exit("the benchmark's Postgres did not start")
        procs.append(pg)
        PG = f"postgres://postgres@127.0.0.1:{OWN_PG_PORT}"
    psql(f"CREATE DATABASE {db}")
    try:
        fake = subprocess.Popen([str(BIN / "tokn-fake-upstream"), "--listen", f"127.0.0.1:{FAKE_PORT}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        procs.append(fake)
        prefix = f"drain-{os.urandom(6).hex()}:"
        conf = TMP / "control.toml"
        conf.write_text(f'listen = "127.0.0.1:{CONTROL_PORT}"\ndatabase_url = "{PG}/{db}"\n'
                        f'admin_token = "env:T_ADMIN"\nproxy_token = "env:T_PROXY"\n'
                        f'[[kek]]\nversion = 1\nkey = "env:T_KEK"\n'
                        f'[redis]\nurl = "{REDIS}"\nprefix = "{prefix}"\n'
                        f'[verify]\nallow_internal_endpoints = true\n')
        control = subprocess.Popen([str(BIN / "tokn-control"), "--config", str(conf)],
                                   env=dict(os.environ, T_ADMIN=ADMIN, T_PROXY=PROXY_TOKEN,
                                            T_KEK=os.urandom(32).hex(), TOKN_LOG="warn"),
                                   stdout=subprocess.DEVNULL, stderr=open(TMP / "control.log", "w"),
                                   start_new_session=True)
        procs.append(control)
        if not (wait_port(FAKE_PORT) and wait_port(CONTROL_PORT)):
            sys.exit("the control plane or the fake did not start")

        log(f"market: {BUYERS} buyers, {POOLS} pools")
        api("PUT", "/v1/admin/settings", ADMIN, {"fee_ratio_ppm": 150_000, "welcome_credit_micros": 1_000_000_000,
                                                  "keys_per_account_max": 10, "default_requests_per_minute": None})
        api("POST", "/v1/admin/catalog", ADMIN, {"model_id": "drain-model", "provider": "openai",
                                                  "input_price_micros_per_mtok": 150_000,
                                                  "output_price_micros_per_mtok": 600_000})
        seller = api("POST", "/v1/admin/accounts", ADMIN, {"email": "seller@drain.example", "role": "seller"})
        stoken, seller_id = seller["token"], seller["account"]["id"]
        cred = api("POST", "/v1/credentials", stoken, {"credential": {
            "provider": "openai", "api_key": "sk-drain", "base_url": f"http://127.0.0.1:{FAKE_PORT}/v1"}})
        api("POST", f"/v1/credentials/{cred['id']}/verify", stoken)
        api("POST", f"/v1/admin/credentials/{cred['id']}/approve", ADMIN)
        pools = [api("POST", "/v1/pools", stoken, {"credential_id": cred["id"], "face_value_micros": 1_000_000_000_000,
                                                    "price_ratio_ppm": 600_000, "models": ["drain-model"]})["id"]
                 for _ in range(POOLS)]
        buyers = []
        for i in range(BUYERS):
            b = api("POST", "/v1/admin/accounts", ADMIN, {"email": f"b{i}@drain.example", "role": "buyer"})
            buyers.append(b["account"]["id"])

        log(f"spool: {RECORDS} records")
        proxy_dir = TMP / "proxy"
        spool = proxy_dir / "spool"
        spool.mkdir(parents=True)
        rng = random.Random(7)
        now = int(time.time() * 1000)
        with open(spool / f"{1:020}.spool", "w") as f:
            for i in range(RECORDS):
                prompt, completion = rng.randint(10, 2000), rng.randint(1, 800)
                list_cost = (prompt * 150_000 + completion * 600_000) // 1_000_000 + 1
                f.write(json.dumps({
                    "request_id": f"req_drain_{i:09d}", "started_at_ms": now - 1000, "key_id": f"key_{i % BUYERS}",
                    "account": buyers[i % BUYERS], "pool_id": pools[rng.randrange(POOLS)], "seller": seller_id,
                    "model": "drain-model", "provider": "openai", "price_version": 1, "stream": i % 2 == 1,
                    "status": 200, "outcome": "ok",
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": 0,
                              "reasoning_tokens": 0},
                    "usage_source": "reported", "list_cost_micros": list_cost,
                    "buyer_cost_micros": list_cost * 6 // 10, "latency_ms": 100, "ttft_ms": 20,
                    "upstream_attempts": 1, "upstream_request_id": None}, separators=(",", ":")) + "\n")
        pconf = proxy_dir / "tokn.toml"
        # The shipper's own batch size unless DRAIN_BATCH sets one.
        batch = f'ship_batch_records_max = {os.environ["DRAIN_BATCH"]}\n' if "DRAIN_BATCH" in os.environ else ""
        pconf.write_text(f'[server]\nlisten = ["127.0.0.1:{PROXY_PORT}"]\nmetrics_listen = "127.0.0.1:{PROXY_PORT + 1}"\n'
                         f'threads = 1\n[limits]\nallow_internal_upstreams = true\n'
                         f'[usage]\nspool_dir = "{spool}"\n{batch}'
                         f'[control]\nurl = "http://127.0.0.1:{CONTROL_PORT}"\ntoken = "env:T_PROXY"\n'
                         f'snapshot_path = "{proxy_dir}/snapshot.sealed"\nsnapshot_key = "env:T_SNAP"\n'
                         f'[hot_state]\nredis_url = "{REDIS}"\nprefix = "{prefix}"\n')
        before = api("GET", "/v1/admin/drain", ADMIN)["applied"]
        cpu0 = cpu_seconds(control.pid)
        others0 = {name: cpu_of(name) for name in ("postgres", "redis-server")}
        started = time.time()
        proxy = subprocess.Popen([str(BIN / "tokn-proxy"), "--config", str(pconf)],
                                 env=dict(os.environ, T_PROXY=PROXY_TOKEN, T_SNAP=os.urandom(32).hex(),
                                          TOKN_LOG="warn"),
                                 cwd=proxy_dir, stdout=subprocess.DEVNULL, stderr=open(TMP / "proxy.log", "w"),
                                 start_new_session=True)
        procs.append(proxy)
        applied = 0
        while time.time() - started < 600:
            applied = api("GET", "/v1/admin/drain", ADMIN)["applied"] - before
            if applied >= RECORDS:
                break
            time.sleep(0.05)
        elapsed = time.time() - started
        control_cpu = cpu_seconds(control.pid) - cpu0
        others = {name: round(cpu_of(name) - v, 2) for name, v in others0.items()}
        proxy_cpu = cpu_seconds(proxy.pid)
        check = api("GET", "/v1/admin/ledger/check", ADMIN)
        result = {"records": RECORDS, "applied": applied, "seconds": round(elapsed, 2),
                  "records_per_s": round(applied / elapsed), "control_plane_cpu_s": round(control_cpu, 2),
                  "proxy_cpu_s": round(proxy_cpu, 2), "postgres_cpu_s": others["postgres"],
                  "redis_cpu_s": others["redis-server"],
                  "buyers": BUYERS, "pools": POOLS, "ledger_check_holds":
                      check["imbalance_micros"] == 0 and not check["balance_mismatches"]
                      and not check["pool_mismatches"] and check["usage_records"] == RECORDS}
        return result
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
        subprocess.run(["psql", f"{PG}/postgres", "-q", "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if pgdata:
            shutil.rmtree(pgdata, ignore_errors=True)


def cpu_of(name):
    """CPU seconds of every process called `name` (the shared servers: Postgres and Redis)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == name:
                    total += cpu_seconds(int(d.name))
            except OSError:
                pass
    return total


if __name__ == "__main__":
    main()
