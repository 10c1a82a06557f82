#!/usr/bin/env python3
"""Web pages' latency at marketplace scale: 10,000 accounts and 1,000,000 usage rows.

The control plane (release build, SQLite by default; PAGES_STORE=postgres for a Postgres of the
run's own) is given 10,000 buyer accounts, a seller with pools, and 1,000,000 usage records
through its ingest endpoint (as proxies ship them): 100,000 of them belong to one heavy buyer,
spread over 30 days, 5 models and 5 keys; the rest to the other buyers. People sign in through
the web app as a browser does (one-time link from the outbox); then every page is fetched
PAGES_REQUESTS times, one at a time on a kept-alive connection, after a warm-up, and its p50,
p99 and max latency are reported. The line: p99 under 50 ms.

Run after `cargo build --release -p tokn-control -p tokn-testkit`:
    python3 bench/pages.py            # prints the table; results/pages.md, pages.json
"""

import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import postgres
from procs import wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
ACCOUNTS = int(os.environ.get("PAGES_ACCOUNTS", "10000"))
ROWS = int(os.environ.get("PAGES_ROWS", "1000000"))
HEAVY_ROWS = ROWS // 10
REQUESTS = int(os.environ.get("PAGES_REQUESTS", "500"))
STORE = os.environ.get("PAGES_STORE", "sqlite")
CONTROL_PORT, FAKE_PORT, PG_PORT = 9401, 9402, 9403
TMP = Path(tempfile.mkdtemp(prefix="tokn-pages-"))
ADMIN = "admin-" + os.urandom(16).hex()
PROXY_TOKEN = "proxy-" + os.urandom(16).hex()
BASE = f"http://127.0.0.1:{CONTROL_PORT}"
MODELS = [f"pages-model-{i}" for i in range(5)]
DAY_MS = 86_400_000


def log(msg):
    print(f"[pages {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def api(method, path, token, body=None, content_type="application/json"):
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {token}", "content-type": content_type})
    with urllib.request.urlopen(req, timeout=120) as resp:
        text = resp.read()
        return json.loads(text) if text else None


class Browser:
    """Cookies by hand, redirects not followed, one kept-alive connection."""

    def __init__(self):
        self.cookies = {}
        self.conn = http.client.HTTPConnection("127.0.0.1", CONTROL_PORT, timeout=30)

    def request(self, method, path, form=None):
        headers = {"cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["content-type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        for c in resp.headers.get_all("set-cookie") or []:
            k, _, v = c.split(";")[0].partition("=")
            if v:
                self.cookies[k] = v
            else:
                self.cookies.pop(k, None)
        return resp.status, resp.headers.get("location"), text


def csrf(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def accept(browser, link_path):
    _, _, page = browser.request("GET", link_path)
    token = link_path.split("token=")[1]
    status, location, _ = browser.request("POST", "/signin/link", {"csrf": csrf(page), "token": token})
    assert status == 303, status
    return location


def sign_in(operator, email):
    b = Browser()
    _, _, form = b.request("GET", "/signin")
    status, _, _ = b.request("POST", "/signin", {"csrf": csrf(form), "email": email, "role": "buyer"})
    assert status == 200, status
    _, _, page = operator.request("GET", "/operator")
    link = re.search(r"(/signin/link\?token=[A-Za-z0-9_]+)", page).group(1)
    accept(b, link)
    return b


def measure(browser, path):
    for _ in range(20):
        status, _, _ = browser.request("GET", path)
        assert status == 200, (path, status)
    times = []
    for _ in range(REQUESTS):
        t0 = time.perf_counter()
        status, _, _ = browser.request("GET", path)
        times.append((time.perf_counter() - t0) * 1000)
        assert status == 200, (path, status)
    times.sort()
    return {"p50_ms": round(times[len(times) // 2], 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
            "max_ms": round(times[-1], 2)}


def seed():
    api("PUT", "/v1/admin/settings", ADMIN, {"fee_ratio_ppm": 150_000, "welcome_credit_micros": 10_000_000,
                                              "keys_per_account_max": 10, "default_requests_per_minute": None})
    for m in MODELS:
        api("POST", "/v1/admin/catalog", ADMIN, {"model_id": m, "provider": "openai",
                                                  "input_price_micros_per_mtok": 150_000,
                                                  "output_price_micros_per_mtok": 600_000})
    seller = api("POST", "/v1/admin/accounts", ADMIN, {"email": "seller@pages.example", "role": "seller"})
    stoken, seller_id = seller["token"], seller["account"]["id"]
    cred = api("POST", "/v1/credentials", stoken, {"label": "spare", "credential": {
        "provider": "openai", "api_key": "sk-pages", "base_url": f"http://127.0.0.1:{FAKE_PORT}/v1"}})
    api("POST", f"/v1/credentials/{cred['id']}/verify", stoken)
    api("POST", f"/v1/admin/credentials/{cred['id']}/approve", ADMIN)
    pools = [api("POST", "/v1/pools", stoken, {"credential_id": cred["id"], "face_value_micros": 1_000_000_000_000,
                                                "price_ratio_ppm": 600_000, "models": MODELS})["id"]
             for _ in range(20)]
    log(f"{ACCOUNTS} accounts")
    with ThreadPoolExecutor(8) as ex:
        made = list(ex.map(lambda i: api("POST", "/v1/admin/accounts", ADMIN,
                                         {"email": f"b{i}@pages.example", "role": "buyer"}), range(ACCOUNTS)))
    heavy = made[0]
    keys = [api("POST", "/v1/keys", heavy["token"], {"name": f"key-{k}"})["id"] for k in range(5)]
    buyers = [m["account"]["id"] for m in made]
    log(f"{ROWS} usage records ({HEAVY_ROWS} for the heavy buyer, over 30 days)")
    rng = random.Random(11)
    now = int(time.time() * 1000)
    started = time.time()

    def batch(first):
        lines = []
        for i in range(first, min(first + 5000, ROWS)):
            if i < HEAVY_ROWS:
                account, key = buyers[0], keys[i % 5]
            else:
                account, key = buyers[1 + i % (len(buyers) - 1)], f"key_other_{i % 997}"
            prompt, completion = rng.randint(10, 2000), rng.randint(1, 800)
            list_cost = (prompt * 150_000 + completion * 600_000) // 1_000_000 + 1
            lines.append(json.dumps({
                "request_id": f"req_pages_{i:09d}", "started_at_ms": now - rng.randrange(30 * DAY_MS),
                "key_id": key, "account": account, "pool_id": pools[i % len(pools)], "seller": seller_id,
                "model": MODELS[i % 5], "provider": "openai", "price_version": 1, "stream": False,
                "status": 200, "outcome": "ok",
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": 0,
                          "reasoning_tokens": 0},
                "usage_source": "reported", "list_cost_micros": list_cost,
                "buyer_cost_micros": list_cost * 6 // 10, "latency_ms": 100, "ttft_ms": 20,
                "upstream_attempts": 1, "upstream_request_id": None}, separators=(",", ":")))
        api("POST", "/internal/v1/usage", PROXY_TOKEN, "\n".join(lines).encode(), "application/x-ndjson")

    for first in range(0, ROWS, 5000):
        batch(first)
    log(f"usage applied in {time.time() - started:.0f} s")
    return "b0@pages.example"


def main():
    procs, pgdata = [], None
    try:
        fake = subprocess.Popen([str(BIN / "tokn-fake-upstream"), "--listen", f"127.0.0.1:{FAKE_PORT}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(fake)
        store = f'sqlite_path = "{TMP}/control.db"\n'
        if STORE == "postgres":
            pg, pgdata = postgres.start(PG_PORT)
            if pg is None:
                sys.exit("the benchmark's Postgres did not start")
            procs.append(pg)
            store = f'database_url = "postgres://postgres@127.0.0.1:{PG_PORT}/postgres"\n'
        conf = TMP / "control.toml"
        conf.write_text(f'listen = "127.0.0.1:{CONTROL_PORT}"\n{store}'
                        f'admin_token = "env:T_ADMIN"\nproxy_token = "env:T_PROXY"\n'
                        f'[[kek]]\nversion = 1\nkey = "env:T_KEK"\n'
                        f'[verify]\nallow_internal_endpoints = true\n')
        control = subprocess.Popen([str(BIN / "tokn-control"), "--config", str(conf)],
                                   env=dict(os.environ, T_ADMIN=ADMIN, T_PROXY=PROXY_TOKEN,
                                            T_KEK=os.urandom(32).hex(), TOKN_LOG="warn"),
                                   stdout=subprocess.DEVNULL, stderr=open(TMP / "control.log", "w"),
                                   start_new_session=True)
        procs.append(control)
        if not (wait_port(FAKE_PORT) and wait_port(CONTROL_PORT)):
            sys.exit("the control plane or the fake did not start")
        heavy_email = seed()

        operator = Browser()
        link = api("POST", "/v1/admin/signin-links", ADMIN)["url"]
        assert accept(operator, link[link.index("/signin"):]) == "/operator"
        buyer = sign_in(operator, heavy_email)
        seller = sign_in(operator, "seller@pages.example")
        anonymous = Browser()
        pages = [(anonymous, p) for p in ["/", "/models", "/docs", "/waitlist", "/signin"]]
        pages += [(buyer, p) for p in ["/app", "/app/usage", "/app/playground", "/app/purchases"]]
        pages += [(seller, "/sell"), (operator, "/operator")]
        results = {}
        for browser, path in pages:
            results[path] = measure(browser, path)
            log(f"{path}: {results[path]}")
        rows = [f"| `{p}` | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |" for p, r in results.items()]
        worst = max(r["p99_ms"] for r in results.values())
        table = "\n".join([
            f"Pages, {STORE}: {ACCOUNTS} accounts, {ROWS} usage rows ({HEAVY_ROWS} the signed-in buyer's, "
            f"30 days), {REQUESTS} sequential requests a page after 20 warm-up, release build, this machine.",
            "", "| page | p50 ms | p99 ms | max ms |", "|---|---|---|---|", *rows, "",
            f"Worst p99: {worst} ms (line: 50 ms) — {'met' if worst < 50 else 'NOT met'}.", ""])
        print(table)
        OUT.mkdir(parents=True, exist_ok=True)
        name = "pages" if STORE == "sqlite" else f"pages-{STORE}"
        (OUT / f"{name}.md").write_text(table)
        (OUT / f"{name}.json").write_text(json.dumps({"store": STORE, "accounts": ACCOUNTS, "rows": ROWS,
                                                      "requests": REQUESTS, "pages": results}, indent=1))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(TMP, ignore_errors=True)
        if pgdata:
            shutil.rmtree(pgdata, ignore_errors=True)


if __name__ == "__main__":
    main()
