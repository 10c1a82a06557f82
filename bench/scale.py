#!/usr/bin/env python3
"""Configuration at marketplace scale: fills a control plane's store (SQLite, embedded mode:
keys travel in the configuration) directly with SCALE_KEYS buyer keys and SCALE_POOLS pools over
SCALE_SELLERS sellers, starts two proxies on it, then measures what a change costs:

- for a key creation and for a seller repricing a pool: bytes a proxy one version behind
  downloads (a delta), control-plane CPU per change and proxy CPU per applied change, and
  change → in effect at both proxies (polled every 5 ms),
- a cold proxy's start until it serves,
- key creations per second by 8 concurrent clients (the load generator), and their errors,
  on SQLite or (SCALE_STORE=postgres) on a fresh database of the local Postgres,
- request latency (p50, p99) and proxy CPU per request through one of the proxies, side by side
  with a store of one key and one pool (its own control plane and proxy), both pools on one fake
  upstream, interleaved rounds.

Release binaries must be built (`bash bench/run` builds them, or
`cargo build --release -p tokn-proxy -p tokn-control`). Results: BENCH_OUT/scale.json (default
bench/results/). Everything listens on 127.0.0.1 and every loop is bounded.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from procs import cpu_seconds, spool_empty, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
KEYS = int(os.environ.get("SCALE_KEYS", "100000"))
POOLS = int(os.environ.get("SCALE_POOLS", "10000"))
SELLERS = int(os.environ.get("SCALE_SELLERS", "1000"))
BUYERS = 100
CHANGES = int(os.environ.get("SCALE_CHANGES", "50"))
# The latency comparison: this model, this many connections, this many interleaved rounds.
LATENCY_MODEL, LATENCY_CONNS, LATENCY_ROUNDS = "scale-bench", 8, 3
# SCALE_STORE=postgres: a fresh database on the local Postgres (127.0.0.1:5432, trust auth).
STORE = os.environ.get("SCALE_STORE", "sqlite")
PG = ["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
CLIENTS, BURST_S = 8, float(os.environ.get("SCALE_BURST_S", "5"))


def log(msg):
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, token, body=None, timeout=60):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:  # not listening yet
        return 0, b""


def api(port, method, path, token, body=None):
    status, text = call(port, method, path, token, body)
    if status >= 300:
        raise RuntimeError(f"{method} {path}: {status} {text[:200]!r}")
    return json.loads(text) if text else None


def serves(port, key):
    status, _ = call(port, "GET", "/v1/models", key, timeout=5)
    return status == 200


def until(what, check, timeout_s):
    """Polls `check` every 5 ms; the seconds it took."""
    started = time.time()
    while time.time() - started < timeout_s:
        if check():
            return time.time() - started
        time.sleep(0.005)
    raise RuntimeError(f"{what}: not within {timeout_s} s")


class Proxy:
    def __init__(self, work, name, control_port, proxy_token):
        self.port, self.ops = free_port(), free_port()
        d = work / name
        d.mkdir()
        conf = d / "tokn.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
metrics_listen = "127.0.0.1:{self.ops}"
threads = 1
grace_period_s = 0
[limits]
allow_internal_upstreams = true
[usage]
path = ""
spool_dir = "{d}/spool"
[control]
url = "http://127.0.0.1:{control_port}"
token = "env:T_PROXY"
snapshot_path = "{d}/snapshot.sealed"
snapshot_key = "env:T_SNAP"
""")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [str(BIN / "tokn-proxy"), "--config", str(conf)],
            env=dict(os.environ, TOKN_LOG=os.environ.get("SCALE_PROXY_LOG", "error"), T_PROXY=proxy_token, T_SNAP=os.urandom(32).hex()),
            stdout=open(d / "out.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def median(xs):
    return sorted(xs)[len(xs) // 2]


def start_control(work, name, cport, store_conf):
    """A control plane on `cport`; (process, admin token, proxy token)."""
    admin, proxy_token = "admin-" + os.urandom(16).hex(), "proxy-" + os.urandom(16).hex()
    conf = work / f"{name}.toml"
    conf.write_text(
        f'listen = "127.0.0.1:{cport}"\n{store_conf}'
        f'admin_token = "env:T_ADMIN"\nproxy_token = "env:T_PROXY"\n'
        f'[[kek]]\nversion = 1\nkey = "env:T_KEK"\n[limits]\nversion_poll_ms = 100\n'
        f'[verify]\nallow_internal_endpoints = true\n')
    control = subprocess.Popen(
        [str(BIN / "tokn-control"), "--config", str(conf)],
        env=dict(os.environ, T_ADMIN=admin, T_PROXY=proxy_token, T_KEK=os.urandom(32).hex(),
                 TOKN_LOG="warn"),
        cwd=work, stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    if not wait_port(cport):
        sys.exit(f"{name}: the control plane did not start")
    api(cport, "PUT", "/v1/admin/settings", admin,
        {"fee_ratio_ppm": 150_000, "welcome_credit_micros": 0, "keys_per_account_max": 10_000,
         "default_requests_per_minute": None})
    return control, admin, proxy_token


def serving_market(cport, admin, fake_port):
    """Through the API: model `scale-bench` on a pool at the fake upstream, a buyer with
    credit and its key (returned)."""
    api(cport, "POST", "/v1/admin/catalog", admin,
        {"model_id": LATENCY_MODEL, "provider": "openai",
         "input_price_micros_per_mtok": 150_000, "output_price_micros_per_mtok": 600_000})
    seller = api(cport, "POST", "/v1/admin/accounts", admin,
                 {"email": "latency-seller@scale.example", "role": "seller"})
    cred = api(cport, "POST", "/v1/credentials", seller["token"], {"credential": {
        "provider": "openai", "api_key": "sk-latency-seller", "base_url": f"http://127.0.0.1:{fake_port}/v1"}})
    api(cport, "POST", f"/v1/credentials/{cred['id']}/verify", seller["token"])
    api(cport, "POST", f"/v1/admin/credentials/{cred['id']}/approve", admin)
    api(cport, "POST", "/v1/pools", seller["token"], {
        "credential_id": cred["id"], "face_value_micros": 1_000_000_000_000, "price_ratio_ppm": 600_000,
        "models": [LATENCY_MODEL]})
    buyer = api(cport, "POST", "/v1/admin/accounts", admin,
                {"email": "latency-buyer@scale.example", "role": "buyer"})
    api(cport, "POST", f"/v1/admin/accounts/{buyer['account']['id']}/credits", admin,
        {"amount_micros": 1_000_000_000, "memo": "latency", "reference": "latency"})
    return api(cport, "POST", "/v1/keys", buyer["token"], {"name": "latency"})["secret"]


def latency(proxy, key, body):
    """One closed-loop run of the load generator against `proxy`: (p50 µs, p99 µs, CPU µs per
    request of the proxy)."""
    cpu = cpu_seconds(proxy.proc.pid)
    out = subprocess.run(
        [str(BIN / "tokn-load"), "--mode", "closed", "--addr", f"127.0.0.1:{proxy.port}",
         "--body-file", str(body), "--header", f"authorization: Bearer {key}",
         "--conns", str(LATENCY_CONNS), "--duration-s", "2", "--warmup-s", "0.3", "--expect-usage"],
        capture_output=True, text=True, timeout=120)
    r = json.loads(out.stdout)
    if r["bad"] or not r["ok"]:
        raise RuntimeError(f"latency run: {r['bad']} bad answers of {r['all']}")
    cpu_us = (cpu_seconds(proxy.proc.pid) - cpu) * 1e6 / r["all"]
    return r["latency_us"]["p50"], r["latency_us"]["p99"], cpu_us


def status(proxy):
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ops}/status", timeout=10) as resp:
        return json.loads(resp.read())


def scale_key(i):
    """The i-th filled key (not in the issued `tok_live_` form, whose checksum it would fail)."""
    return f"scale-key-{i:06}"


# What the store counts as keys are created through its API, for the keys filled in directly.
LIVE_KEYS = ("UPDATE accounts SET live_keys = (SELECT COUNT(*) FROM api_keys k "
             "WHERE k.account_id = accounts.id AND k.revoked_at IS NULL)")


def fill_rows(sellers, creds, buyers, models, now):
    pools = ((f"pool_scale_{i:05}", sellers[i % len(sellers)], creds[i % len(creds)], 100_000_000,
              550_000 + (i % 100) * 1_000, json.dumps(models[i % len(models):][:3] or models[:3]),
              1_000_000 + i, now) for i in range(POOLS))
    keys = ((f"key_scale_{i:06}", buyers[i % len(buyers)],
             hashlib.sha256(scale_key(i).encode()).hexdigest(), now) for i in range(KEYS))
    return pools, keys


def fill_postgres(database, sellers, creds, buyers, models):
    """`fill` for a Postgres store: COPY through psql."""
    now = int(time.time() * 1000)
    pools, keys = fill_rows(sellers, creds, buyers, models, now)
    lines = [f"UPDATE credentials SET verify_status = 'valid', verified_at = {now};",
             "COPY pools (id, account_id, credential_id, face_value_micros, price_ratio_ppm, models, "
             "listed_seq, listed_at, status) FROM STDIN;"]
    lines += ["\t".join(str(v) for v in row) + "\tlive" for row in pools] + ["\\."]
    lines += ["COPY api_keys (id, account_id, key_sha256, created_at, name, lookup_prefix) FROM STDIN;"]
    lines += ["\t".join(str(v) for v in row) + "\tscale\ttok_live_sc" for row in keys] + ["\\."]
    lines += [LIVE_KEYS + ";", "UPDATE config_version SET version = version + 1;"]
    # What autovacuum would do soon after a bulk load: statistics for the planner, and the
    # visibility map that lets an index answer alone.
    lines += ["VACUUM ANALYZE;"]
    subprocess.run(PG + ["-d", database], input="\n".join(lines) + "\n", text=True, check=True)


def fill(db_path, sellers, creds, buyers, models):
    """Pools and keys straight into the store; the credentials were made through the API (they
    are sealed there) and are marked verified here."""
    now = int(time.time() * 1000)
    db = sqlite3.connect(db_path, timeout=60)
    with db:
        db.execute("UPDATE credentials SET verify_status = 'valid', verified_at = ?", (now,))
        pools, keys = fill_rows(sellers, creds, buyers, models, now)
        db.executemany(
            "INSERT INTO pools (id, account_id, credential_id, face_value_micros, price_ratio_ppm, "
            "models, status, expires_at, listed_seq, listed_at) VALUES (?, ?, ?, ?, ?, ?, 'live', NULL, ?, ?)",
            pools)
        db.executemany(
            "INSERT INTO api_keys (id, account_id, name, lookup_prefix, key_sha256, allowed_models, "
            "spend_cap_micros, requests_per_minute, created_at, revoked_at) "
            "VALUES (?, ?, 'scale', 'tok_live_sc', ?, NULL, NULL, NULL, ?, NULL)",
            keys)
        db.execute(LIVE_KEYS)
        db.execute("UPDATE config_version SET version = version + 1")
    db.close()


def main():
    for exe in ("tokn-control", "tokn-proxy", "tokn-load", "tokn-fake-upstream"):
        if not (BIN / exe).exists():
            sys.exit(f"{BIN / exe} is not built: cargo build --release -p tokn-proxy -p tokn-control")
    work = Path(tempfile.mkdtemp(prefix="tokn-scale-"))
    procs, database = [], None
    try:
        cport = free_port()
        if STORE == "postgres":
            database = f"tokn_scale_{os.urandom(4).hex()}"
            subprocess.run(PG + ["-d", "postgres", "-c", f"CREATE DATABASE {database}"], check=True)
            store_conf = f'database_url = "postgres://postgres@127.0.0.1:5432/{database}"\n'
        else:
            database = None
            store_conf = f'sqlite_path = "{work}/control.db"\n'
        control, admin, proxy_token = start_control(work, "control", cport, store_conf)
        procs.append(control)
        fake_port = free_port()
        procs.append(subprocess.Popen(
            [str(BIN / "tokn-fake-upstream"), "--listen", f"127.0.0.1:{fake_port}", "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        if not wait_port(fake_port):
            sys.exit("the fake upstream did not start")
        models = [m["model_id"] for m in api(cport, "GET", "/v1/catalog", admin)
                  if m["provider"] == "openai" and m["effective_at_ms"] == 0]
        # One model served by a pool on the fake upstream, beside the filled store: what the
        # latency comparison requests.
        latency_key = serving_market(cport, admin, fake_port)
        log(f"store: {SELLERS} sellers and their credentials through the API")
        sellers, seller_tokens, creds = [], [], []
        for i in range(SELLERS):
            s = api(cport, "POST", "/v1/admin/accounts", admin,
                    {"email": f"seller-{i}@scale.example", "role": "seller"})
            c = api(cport, "POST", "/v1/credentials", s["token"],
                    {"credential": {"provider": "openai", "api_key": f"sk-scale-{i:04}-" + "x" * 40}})
            sellers.append(s["account"]["id"])
            seller_tokens.append(s["token"])
            creds.append(c["id"])
        buyers, buyer_tokens = [], []
        for i in range(BUYERS):
            b = api(cport, "POST", "/v1/admin/accounts", admin,
                    {"email": f"buyer-{i}@scale.example", "role": "buyer"})
            buyers.append(b["account"]["id"])
            buyer_tokens.append(b["token"])
        log(f"store: {POOLS} pools and {KEYS} keys straight into SQLite")
        if database:
            fill_postgres(database, sellers, creds, buyers, models)
        else:
            fill(work / "control.db", sellers, creds, buyers, models)

        def published():
            status, body = call(cport, "GET", "/internal/v1/config?after=0", proxy_token)
            return body if status == 200 else b""

        until("the filled store published",
              lambda: len(json.loads(published()).get("keys") or []) >= KEYS, 120)
        document = published()
        config = json.loads(document)
        log(f"published: {len(document):,} bytes, {len(config['pools'])} pools, {len(config['keys'])} keys")

        # Two proxies, started cold on the filled store.
        proxies = [Proxy(work, f"proxy-{i}", cport, proxy_token) for i in range(2)]
        procs.extend(p.proc for p in proxies)
        cold = []
        for p in proxies:
            until("a proxy serving", lambda: serves(p.port, scale_key(0)), 120)
            cold.append(time.time() - p.started)
        log(f"cold start until serving: {', '.join(f'{c:.2f} s' for c in cold)}")

        # Request latency at scale, side by side with a store of one key and one pool (its own
        # control plane and proxy, SQLite), interleaved.
        small_port = free_port()
        small_control, small_admin, small_token = start_control(
            work, "small", small_port, f'sqlite_path = "{work}/small.db"\n')
        procs.append(small_control)
        small_key = serving_market(small_port, small_admin, fake_port)
        small = Proxy(work, "proxy-small", small_port, small_token)
        procs.append(small.proc)
        body = work / "chat.json"
        body.write_text(json.dumps({"model": LATENCY_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        for p, k in [(proxies[0], latency_key), (small, small_key)]:
            until("the latency model served", lambda: call(
                p.port, "POST", "/v1/chat/completions", k, json.loads(body.read_text()))[0] == 200, 60)
        runs = {"scale": [], "one_key": []}
        for _ in range(LATENCY_ROUNDS):
            runs["scale"].append(latency(proxies[0], latency_key, body))
            runs["one_key"].append(latency(small, small_key, body))
        request_latency = {
            name: {"p50_us": median([r[0] for r in rs]), "p99_us": median([r[1] for r in rs]),
                   "proxy_cpu_us_per_request": round(median([r[2] for r in rs]), 1)}
            for name, rs in runs.items()}
        log(f"request latency, {LATENCY_CONNS} connections: {request_latency}")
        small.stop()

        # The latency runs' usage drained into the ledger first: what a change costs, alone.
        for p in proxies:
            until("the latency runs' usage drained", lambda: spool_empty(p.ops), 300)

        # One change at a time, in effect when both proxies run it (polled every 5 ms): a key
        # creation (the proxies serve the key), and a seller lowering a pool's price (the
        # proxies run the version after it).
        def new_key(i, name):
            key = api(cport, "POST", "/v1/keys", buyer_tokens[i % BUYERS], {"name": name})["secret"]
            return lambda p: serves(p.port, key)

        def repriced_pool(i, _name):
            before = [status(p)["config_version"] for p in proxies]
            pool = i * 37 % POOLS
            api(cport, "PATCH", f"/v1/pools/pool_scale_{pool:05}", seller_tokens[pool % SELLERS],
                {"price_ratio_ppm": 500_000 - i})
            return lambda p: status(p)["config_version"] > before[proxies.index(p)]

        changes = {}
        for kind, change in [("key", new_key), ("pool", repriced_pool)]:
            in_effect, api_s = [], []
            for i in range(CHANGES):
                t0 = time.time()
                done = change(i, f"change-{i}")
                api_s.append(time.time() - t0)
                for p in proxies:
                    until(f"the {kind} change in effect", lambda: done(p), 60)
                in_effect.append(time.time() - t0)
            log(f"{kind} change → in effect (ms): " + " ".join(f"{x * 1000:.0f}" for x in in_effect))
            # CPU per change, without the polling: each change is left 200 ms to arrive, then
            # each proxy's version is checked once (on its operations port: a request to the
            # API, even `/v1/models`, is metered, and its record's trip into the ledger is not
            # the change's cost).
            control_cpu, proxy_cpu = cpu_seconds(control.pid), [cpu_seconds(p.proc.pid) for p in proxies]
            for i in range(CHANGES):
                before = [status(p)["config_version"] for p in proxies]
                change(CHANGES + i, f"cpu-{i}")
                time.sleep(0.2)
                for p, v in zip(proxies, before):
                    until(f"the {kind} change in effect", lambda: status(p)["config_version"] > v, 60)
            spent = cpu_seconds(control.pid) - control_cpu, [cpu_seconds(p.proc.pid) - c for p, c in zip(proxies, proxy_cpu)]
            # Less what the same time costs with no change (the version poll, the idle watches):
            # the figure is what a change adds.
            control_cpu, proxy_cpu = cpu_seconds(control.pid), [cpu_seconds(p.proc.pid) for p in proxies]
            time.sleep(0.2 * CHANGES)
            idle = cpu_seconds(control.pid) - control_cpu, [cpu_seconds(p.proc.pid) - c for p, c in zip(proxies, proxy_cpu)]
            # What a proxy one version behind downloads for one more change (a delta).
            version = status(proxies[0])["config_version"]
            change(2 * CHANGES, "measured")
            status_code, answer = call(
                cport, "GET", f"/internal/v1/config?after={version}&wait_s=5&delta=true&pools=true", proxy_token)
            changes[kind] = {
                "bytes_per_change_per_proxy": len(answer) if status_code == 200 else None,
                "control_cpu_ms_per_change": round(max(0.0, spent[0] - idle[0]) / CHANGES * 1000, 1),
                "proxy_cpu_ms_per_change": [round(max(0.0, s - i) / CHANGES * 1000, 1)
                                            for s, i in zip(spent[1], idle[1])],
                "api_call_ms_median": round(median(api_s) * 1000, 1),
                "api_call_ms_max": round(max(api_s) * 1000, 1),
                "change_in_effect_ms_median": round(median(in_effect) * 1000, 1),
                "change_in_effect_ms_p90": round(sorted(in_effect)[int(len(in_effect) * 0.9)] * 1000, 1),
                "change_in_effect_ms_max": round(max(in_effect) * 1000, 1),
            }
            log(f"{kind} change: {changes[kind]}")

        # Eight clients creating keys at once, for BURST_S seconds: the load generator's closed
        # loop (a Python client would measure Python), every answer checked to be 201.
        body = work / "new-key.json"
        body.write_text(json.dumps({"name": "burst"}))
        burst_cpu = cpu_seconds(control.pid)
        out = subprocess.run(
            [str(BIN / "tokn-load"), "--mode", "closed", "--addr", f"127.0.0.1:{cport}", "--path", "/v1/keys",
             "--body-file", str(body), "--header", f"authorization: Bearer {buyer_tokens[0]}",
             "--header", "content-type: application/json", "--conns", str(CLIENTS),
             "--duration-s", str(BURST_S), "--warmup-s", "0", "--expect-status", "201"],
            capture_output=True, text=True, timeout=120)
        burst = json.loads(out.stdout)
        burst_cpu = cpu_seconds(control.pid) - burst_cpu

        result = {
            "keys": KEYS, "pools": POOLS, "sellers": SELLERS, "store": STORE, "proxies": 2,
            "key_change": changes["key"],
            "pool_change": changes["pool"],
            "cold_start_s": [round(c, 2) for c in cold],
            "key_creations_per_s_8_clients": round(burst["rps"], 1),
            "key_creation_errors": burst["bad"],
            "control_cpu_ms_per_key_in_burst": round(burst_cpu * 1000 / max(burst["all"], 1), 2),
            "request_latency": request_latency,
        }
        print(json.dumps(result, indent=2))
        OUT.mkdir(parents=True, exist_ok=True)
        name = "scale.json" if STORE == "sqlite" else f"scale-{STORE}.json"
        (OUT / name).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if database and os.environ.get("SCALE_KEEP"):
            log(f"kept database {database}")
        elif database:
            subprocess.run(PG + ["-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {database}"])
        if os.environ.get("SCALE_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
