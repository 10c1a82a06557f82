#!/usr/bin/env python3
"""Side-by-side gateway benchmark: direct vs floor (nginx, bare Pingora) vs tokn vs peers.

Run through `bench/run` (it builds the binaries and installs the tools). One worker per
contender, pinned to core 1; the load generator and the fake upstream share core 0. Contenders
are interleaved within every case over ROUNDS rounds and the median is reported. Every request
is validated by the load generator (status, usage present), so wrong answers never count.

Writes bench/results/{results.json, results.md, latency_vs_load.png, rss_vs_streams.png}.
"""

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import postgres
from procs import cpu_ns, rss_kib, spool_empty, tree_pids, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
# BENCH_PROXY: another tokn-proxy binary to measure (an A/B of two builds, run after run).
PROXY = Path(os.environ.get("BENCH_PROXY", BIN / "tokn-proxy"))
WORK = ROOT / "target" / "bench"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))  # BENCH_OUT: elsewhere, e.g. a partial run
CORE_CONTENDER = "1"
CORE_LOAD = "0"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "2"))
# Restrict a run (for development): BENCH_ONLY=pingora,tokn BENCH_CASES=c32,stream_unpaced.
ONLY = {n for n in os.environ.get("BENCH_ONLY", "").split(",") if n}
CASES = {n for n in os.environ.get("BENCH_CASES", "").split(",") if n}
# A proxy holds two sockets per open stream (client and upstream) plus the idle pooled upstream
# connections earlier points leave behind; this sandbox's hard limit of 20,000 open files per
# process therefore caps the curve at 6,000 streams (10,000 would need ~20,000 sockets alone).
HOLD_STREAMS = [int(n) for n in os.environ.get("BENCH_HOLD_STREAMS", "1000,3000,6000").split(",")]

FAKE_PORT = 9100
ANTHROPIC_PORT = 9101  # the fake Anthropic API, in the same process as the fake upstream
TLS_PORT = 9102  # the same fake over HTTPS (HTTP/2 by ALPN), its CA written to TMP / "tls"
KEY = "tok_bench_key_000000000001"
SELLER_KEY = "sk-bench-seller"
LITELLM_KEY = "sk-litellm-master-key-for-the-benchmark-0123456789"
EVENTS_PER_STREAM = 24  # role + 20 content + finish + usage + [DONE]

TMP = Path(tempfile.mkdtemp(prefix="tokn-bench-"))


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def body_file(name, model, stream, pad_bytes, api="chat"):
    """A request of `api` whose prompt is `pad_bytes` long: the same payload in each API's shape."""
    msg = "x" * pad_bytes
    if api == "responses":
        body = {"model": model, "input": msg, "max_output_tokens": 32, "store": False}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": msg}], "max_tokens": 32}
    if stream:
        body["stream"] = True
        if api == "chat":
            body["stream_options"] = {"include_usage": True}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(body))
    return path


class Contender:
    name = ""
    peer = False
    authenticates = False
    reject_status = 401
    proc = None

    def __init__(self, port):
        self.port = port

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def headers(self, valid_key=True):
        return [f"authorization: Bearer {KEY if valid_key else 'tok_invalid_key_0000000'}"]

    def model(self, model):
        return model

    def start(self):
        return True

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def spawn(self, argv, env=None, cwd=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            ["taskset", "-c", CORE_CONTENDER] + argv,
            env=full_env,
            cwd=cwd,
            stdout=open(TMP / f"{self.name}.out", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return wait_port(self.port, 120, self.proc)


class Direct(Contender):
    name = "direct"

    def __init__(self, fake):
        super().__init__(FAKE_PORT)
        self.fake = fake

    @property
    def pid(self):
        return None


class Nginx(Contender):
    name = "nginx"

    def start(self):
        conf = TMP / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
pid {TMP}/nginx.pid;
error_log {TMP}/nginx.err warn;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  client_max_body_size 64m;
  client_body_buffer_size 512k;
  upstream fake {{ server 127.0.0.1:{FAKE_PORT}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
        return self.spawn(["nginx", "-c", str(conf), "-g", "daemon off;"])


class Floor(Contender):
    name = "pingora"

    def start(self):
        return self.spawn([str(BIN / "tokn-bench-floor"), "--listen", f"127.0.0.1:{self.port}",
                           "--upstream", f"127.0.0.1:{FAKE_PORT}", "--threads", "1"])


class Tokn(Contender):
    name = "tokn"
    authenticates = True
    # Where its OpenAI pool goes, and what else its [server] says.
    upstream = f"http://127.0.0.1:{FAKE_PORT}/v1"
    server_extra = ""

    def start(self):
        models = "".join(f"""
[[models]]
id = "{m}"
provider = "openai"
input_price_micros_per_mtok = 150_000
output_price_micros_per_mtok = 600_000
""" for m in ["bench", "bench-paced", "bench-hold"])
        models += """
[[models]]
id = "bench-claude"
provider = "anthropic"
input_price_micros_per_mtok = 3_000_000
output_price_micros_per_mtok = 15_000_000
"""
        conf = TMP / "tokn.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
metrics_listen = "127.0.0.1:{self.port + 1000}"
threads = 1
grace_period_s = 0
{self.server_extra}
[limits]
request_body_bytes_max = 67108864
upstream_keepalive_pool_size = 4096
[usage]
path = "{TMP}/tokn-usage-{self.name}.jsonl"
{models}
[[pools]]
id = "bench-pool"
provider = "openai"
base_url = "{self.upstream}"
api_key = "{SELLER_KEY}"
models = ["bench", "bench-paced", "bench-hold"]
price_ratio = 0.6
[[pools]]
id = "bench-claude-pool"
provider = "anthropic"
base_url = "http://127.0.0.1:{ANTHROPIC_PORT}"
api_key = "{SELLER_KEY}"
models = ["bench-claude"]
price_ratio = 0.6
[[keys]]
id = "bench"
account = "bench"
key = "{KEY}"
""")
        return self.spawn([str(PROXY), "--config", str(conf)], env={"TOKN_LOG": "error"})


class ToknTls(Tokn):
    """`tokn` with its upstream over HTTPS, HTTP/2 by ALPN (one pooled connection multiplexes
    the streams): the open-streams row with TLS/h2 upstreams."""
    name = "tokn_tls_h2"
    upstream = f"https://localhost:{TLS_PORT}/v1"
    server_extra = f'upstream_ca_file = "{TMP}/tls/ca.pem"'


def api_call(port, method, path, token, body=None):
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read()
        return json.loads(text) if text else None


class ToknMarket(Contender):
    """tokn-proxy fed by a tokn-control, money on: every request reserves its maximum cost,
    settles, and is spooled and drained into the ledger. `fleet`: Postgres and Redis (the
    reservation is a Lua script in Redis); otherwise embedded (SQLite, the proxy's own book).
    The control plane, and in fleet mode a Redis and a Postgres of the contender's own, run on
    the load's core (so they never take the proxy's); their CPU is reported beside the proxy's,
    which is what the ratio compares."""
    authenticates = True

    def __init__(self, port, fleet):
        super().__init__(port)
        self.fleet = fleet
        self.name = "tokn_fleet" if fleet else "tokn_embedded"
        self.control = None
        self.key = None
        self.stores = []  # the fleet's own Redis and Postgres processes
        self.pgdata = None

    def headers(self, valid_key=True):
        return [f"authorization: Bearer {self.key if valid_key else 'tok_invalid_key_0000000'}"]

    def side_pids(self):
        """Processes beside the proxy doing this contender's work (for CPU accounting)."""
        out = {"control": self.control.pid} if self.control else {}
        if self.fleet and len(self.stores) == 2:
            out["redis"], out["postgres"] = (p.pid for p in self.stores)
        return out

    def quiesce(self, timeout_s=30.0):
        """Waits until the proxy's spool is empty: every record served so far is in the ledger."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if spool_empty(self.port + 1000):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        log(f"{self.name}: the spool did not drain within {timeout_s:.0f} s")

    def start_stores(self, redis_port, pg_port):
        """A Redis and a Postgres for this contender alone, pinned to the load's core."""
        pin = ["taskset", "-c", CORE_LOAD]
        self.stores.append(subprocess.Popen(
            pin + ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(TMP)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        pg, self.pgdata = postgres.start(pg_port, pin=CORE_LOAD)
        if pg is None:
            return False
        self.stores.append(pg)
        return wait_port(redis_port, 30)

    def start(self):
        exe = BIN / "tokn-control"
        if not exe.exists():
            log(f"{self.name}: tokn-control not built: skipped")
            return False
        cport = self.port + 50
        admin, proxy_token = "admin-" + os.urandom(16).hex(), "proxy-" + os.urandom(16).hex()
        d = TMP / self.name
        d.mkdir(exist_ok=True)
        conf = f'listen = "127.0.0.1:{cport}"\nsqlite_path = "{d}/control.db"\n' \
               f'admin_token = "env:T_ADMIN"\nproxy_token = "env:T_PROXY"\n[[kek]]\nversion = 1\nkey = "env:T_KEK"\n' \
               f'[verify]\nallow_internal_endpoints = true\n'  # the fake upstream is on loopback
        prefix = f"bench-{os.urandom(6).hex()}:"
        redis_url = f"redis://127.0.0.1:{self.port + 60}"
        if self.fleet:
            if not self.start_stores(self.port + 60, self.port + 61):
                log(f"{self.name}: its Redis or Postgres did not start")
                return False
            conf = f'database_url = "postgres://postgres@127.0.0.1:{self.port + 61}/postgres"\n' + conf
            conf = conf.replace("[[kek]]", f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n[[kek]]')
        (d / "control.toml").write_text(conf)
        self.control = subprocess.Popen(
            ["taskset", "-c", CORE_LOAD, str(exe), "--config", str(d / "control.toml")],
            env=dict(os.environ, T_ADMIN=admin, T_PROXY=proxy_token, T_KEK=os.urandom(32).hex(), TOKN_LOG="warn"),
            cwd=d, stdout=open(TMP / f"{self.name}-control.out", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        if not wait_port(cport, 60, self.control):
            log(f"{self.name}: the control plane did not start")
            return False
        api = lambda method, path, token, body=None: api_call(cport, method, path, token, body)
        api("PUT", "/v1/admin/settings", admin, {"fee_ratio_ppm": 150_000, "welcome_credit_micros": 1_000_000_000,
                                                  "keys_per_account_max": 10, "default_requests_per_minute": None})
        for m in ["bench", "bench-paced", "bench-hold"]:
            api("POST", "/v1/admin/catalog", admin, {"model_id": m, "provider": "openai",
                                                      "input_price_micros_per_mtok": 150_000,
                                                      "output_price_micros_per_mtok": 600_000})
        seller = api("POST", "/v1/admin/accounts", admin, {"email": "seller@bench.example", "role": "seller"})
        cred = api("POST", "/v1/credentials", seller["token"], {"credential": {
            "provider": "openai", "api_key": SELLER_KEY, "base_url": f"http://127.0.0.1:{FAKE_PORT}/v1"}})
        api("POST", f"/v1/credentials/{cred['id']}/verify", seller["token"])
        api("POST", f"/v1/admin/credentials/{cred['id']}/approve", admin)
        api("POST", "/v1/pools", seller["token"], {"credential_id": cred["id"], "face_value_micros": 1_000_000_000_000,
                                                    "price_ratio_ppm": 600_000,
                                                    "models": ["bench", "bench-paced", "bench-hold"]})
        buyer = api("POST", "/v1/admin/accounts", admin, {"email": "buyer@bench.example", "role": "buyer"})
        for i in range(5):  # $1,000 welcome + $5,000: more than any run spends
            api("POST", f"/v1/admin/accounts/{buyer['account']['id']}/credits", admin,
                {"amount_micros": 1_000_000_000, "memo": "bench", "reference": f"bench-{i}"})
        self.key = api("POST", "/v1/keys", buyer["token"], {"name": "bench"})["secret"]
        hot = f'[hot_state]\nredis_url = "{redis_url}"\nprefix = "{prefix}"\n' if self.fleet else ""
        pconf = d / "tokn.toml"
        pconf.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
metrics_listen = "127.0.0.1:{self.port + 1000}"
threads = 1
grace_period_s = 0
[limits]
request_body_bytes_max = 67108864
upstream_keepalive_pool_size = 4096
allow_internal_upstreams = true
[usage]
path = ""
spool_dir = "{d}/spool"
[control]
url = "http://127.0.0.1:{cport}"
token = "env:T_PROXY"
snapshot_path = "{d}/snapshot.sealed"
snapshot_key = "env:T_SNAP"
{hot}""")
        if not self.spawn([str(PROXY), "--config", str(pconf)],
                          env={"TOKN_LOG": "error", "T_PROXY": proxy_token, "T_SNAP": os.urandom(32).hex()}):
            return False
        # Served once the configuration arrived.
        body = TMP / "ready.json"
        body.write_text(json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}))
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", self.headers()[0],
                                  "-H", "content-type: application/json", "--data-binary", f"@{body}",
                                  f"http://127.0.0.1:{self.port}/v1/chat/completions"], capture_output=True, text=True)
            if out.stdout == "200":
                return True
            time.sleep(0.1)
        log(f"{self.name}: never served")
        return False

    def stop(self):
        super().stop()
        if self.control and self.control.poll() is None:
            os.killpg(self.control.pid, signal.SIGKILL)
            self.control.wait()
        self.control = None
        for p in self.stores:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.stores = []
        if self.pgdata:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            self.pgdata = None


class LiteLLM(Contender):
    name = "litellm"
    peer = True
    authenticates = True
    # Without a database LiteLLM cannot look keys up: unknown keys get 400 `no_db_connection`.
    reject_status = 400

    def headers(self, valid_key=True):
        return [f"authorization: Bearer {LITELLM_KEY if valid_key else 'sk-invalid-key-000'}"]

    def start(self):
        exe = WORK / "venv-litellm" / "bin" / "litellm"
        if not exe.exists():
            log("litellm: not installed (pip install 'litellm[proxy]' failed): skipped")
            return False
        conf = TMP / "litellm.yaml"
        conf.write_text("model_list:\n" + "".join(f"""  - model_name: {m}
    litellm_params:
      model: openai/{m}
      api_base: http://127.0.0.1:{FAKE_PORT}/v1
      api_key: {SELLER_KEY}
""" for m in ["bench", "bench-paced", "bench-hold"]) + "litellm_settings:\n  drop_params: true\n")
        return self.spawn([str(exe), "--config", str(conf), "--port", str(self.port), "--num_workers", "1"],
                          env={"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                               "LITELLM_LOG": "ERROR"})


class Portkey(Contender):
    name = "portkey"
    peer = True

    def headers(self, valid_key=True):
        return [f"authorization: Bearer {SELLER_KEY if valid_key else 'sk-invalid'}",
                "x-portkey-provider: openai",
                f"x-portkey-custom-host: http://127.0.0.1:{FAKE_PORT}/v1"]

    def start(self):
        script = WORK / "node" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
        if not script.exists():
            log("portkey: not installed (npm install @portkey-ai/gateway failed): skipped")
            return False
        return self.spawn(["node", str(script), f"--port={self.port}", "--headless"])


def run_load(contender, mode, body, conns=1, rate=0.0, valid_key=True, expect_usage=True,
             duration=DURATION_S, warmup=0.5, api="chat"):
    argv = ["taskset", "-c", CORE_LOAD, str(BIN / "tokn-load"), "--mode", mode, "--api", api,
            "--addr", f"127.0.0.1:{contender.port}", "--body-file", str(body),
            "--conns", str(conns), "--duration-s", str(duration), "--warmup-s", str(warmup),
            "--expect-status", "200" if valid_key else str(contender.reject_status)]
    if rate:
        argv += ["--rate", str(rate)]
    if expect_usage and valid_key:
        argv += ["--expect-usage"]
    for h in contender.headers(valid_key):
        argv += ["--header", h]
    if api == "messages":
        argv += ["--header", "anthropic-version: 2023-06-01"]
    pid = contender.pid
    cpu0 = cpu_ns(pid) if pid else 0
    side0 = side_cpu(contender)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if hasattr(contender, "quiesce"):
        # The run's work includes draining its usage (counted here, and never spilling into
        # the next contender's run).
        contender.quiesce()
    cpu1 = cpu_ns(pid) if pid else 0
    side1 = side_cpu(contender)
    try:
        result = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"error": out.stderr[-500:]}
    result["cpu_ns"] = cpu1 - cpu0
    result["side_cpu_ns"] = {k: side1[k] - side0.get(k, 0) for k in side1}
    result["rss_kib"] = rss_kib(pid) if pid else 0
    return result


def side_cpu(contender):
    """CPU of the processes beside a contender that do its work (a control plane, Redis)."""
    sides = contender.side_pids() if hasattr(contender, "side_pids") else {}
    return {k: cpu_ns(p) for k, p in sides.items()}


def run_wrk(contender, body, conns=32, duration=DURATION_S):
    """wrk's closed loop (lowest load-generator overhead): throughput and CPU per request.
    wrk checks only statuses; the same case under tokn-load checks every body."""
    if not shutil.which("wrk"):
        return {"error": "wrk not installed"}
    lua = TMP / f"wrk-{contender.name}.lua"
    headers = "".join(f'wrk.headers["{h.split(":", 1)[0]}"] = "{h.split(":", 1)[1].strip()}"\n'
                      for h in contender.headers())
    lua.write_text(f'wrk.method = "POST"\nwrk.body = io.open("{body}"):read("*a")\n'
                   f'wrk.headers["content-type"] = "application/json"\n{headers}')
    pid = contender.pid
    cpu0 = cpu_ns(pid) if pid else 0
    out = subprocess.run(["taskset", "-c", CORE_LOAD, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s",
                          "--latency", "-s", str(lua), f"http://127.0.0.1:{contender.port}/v1/chat/completions"],
                         capture_output=True, text=True, timeout=120)
    cpu1 = cpu_ns(pid) if pid else 0
    total, bad, rps = 0, 0, 0.0
    for line in out.stdout.splitlines():
        parts = line.split()
        if "requests in" in line:
            total = int(parts[0])
        elif line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            bad = int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            bad += sum(int(x.strip(",")) for x in parts[3::2])
    ok = total - bad
    return {"ok": ok, "bad": bad, "all": total, "rps": rps * ok / max(total, 1),
            "latency_us": {"p50": None, "p99": None, "p999": None}, "ttft_us": {"p50": None, "p99": None},
            "cpu_ns": cpu1 - cpu0, "rss_kib": rss_kib(pid) if pid else 0}


def hold(contender, body, streams):
    """Opens `streams` slow streams at once; returns RSS while all are open, and idle RSS."""
    pid = contender.pid
    idle = rss_kib(pid)
    argv = ["taskset", "-c", CORE_LOAD, str(BIN / "tokn-load"), "--mode", "hold",
            "--addr", f"127.0.0.1:{contender.port}", "--body-file", str(body),
            "--conns", str(streams), "--expect-usage"] + sum((["--header", h] for h in contender.headers()), [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # stderr says `holding` once every stream has its first byte; sample RSS then.
    holding = threading.Event()

    def watch():
        for line in proc.stderr:
            if "holding" in line:
                holding.set()

    threading.Thread(target=watch, daemon=True).start()
    peak = idle
    if holding.wait(timeout=30):
        time.sleep(0.3)
        peak = rss_kib(pid)
    out, _ = proc.communicate(timeout=120)
    result = json.loads(out) if out.strip() else {"ok": 0, "bad": streams}
    return {"streams": streams, "idle_rss_kib": idle, "holding_rss_kib": peak, "held": holding.is_set(),
            "ok": result.get("ok", 0), "bad": result.get("bad", 0),
            "ttft_p50_us": result.get("ttft_us", {}).get("p50")}


# What each API's cases need of a contender: the Messages lane an Anthropic pool (file-mode tokn
# has one), the Responses API a route to the fake (tokn, and the plain proxies that forward any
# path; the peers are left out).
LANE_CASES = {"messages_": {"tokn"}, "responses_": {"direct", "nginx", "pingora", "tokn", "tokn_embedded",
                                                      "tokn_fleet"}}


# Each lane case and the chat case with the same prompt it is compared with.
LANE_BASES = {"messages_c32": "c32", "responses_c32": "c32", "messages_stream": "stream_unpaced",
              "responses_stream": "stream_unpaced"}


def serves(contender, case):
    return all(contender.name in names for prefix, names in LANE_CASES.items() if case.startswith(prefix))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for f in ["tokn-load", "tokn-bench-floor", "tokn-proxy", "tokn-fake-upstream"]:
        if not (BIN / f).exists():
            sys.exit(f"missing {BIN / f}: run bench/run")
    started = time.time()
    (TMP / "tls").mkdir(exist_ok=True)  # the fake writes its CA there
    fake = subprocess.Popen(["taskset", "-c", CORE_LOAD, str(BIN / "tokn-fake-upstream"),
                             "--listen", f"127.0.0.1:{FAKE_PORT}", "--chunks", "20", "--threads", "1",
                             "--paced-interval-ms", "5", "--hold-interval-ms", "200",
                             "--anthropic-listen", f"127.0.0.1:{ANTHROPIC_PORT}",
                             "--tls-listen", f"127.0.0.1:{TLS_PORT}", "--tls-dir", str(TMP / "tls")],
                            stdout=open(TMP / "fake.out", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    if not wait_port(FAKE_PORT, 10, fake) or not wait_port(TLS_PORT, 10, fake):
        sys.exit("fake upstream did not start")

    contenders = [Direct(fake), Nginx(9201), Floor(9202), Tokn(9203), ToknMarket(9206, fleet=False),
                  ToknMarket(9207, fleet=True), ToknTls(9208), LiteLLM(9204), Portkey(9205)]
    contenders = [c for c in contenders if not ONLY or c.name in ONLY or c.name == "direct"]
    running, skipped = [], {}
    for c in contenders:
        log(f"starting {c.name}")
        if c.start():
            running.append(c)
        else:
            skipped[c.name] = "could not be installed or started (see log)"
            c.stop()
    names = [c.name for c in running]
    for c in running:
        if c.pid:
            c.idle_rss = rss_kib(c.pid)

    bodies = {
        "1k": body_file("b1k", "bench", False, 900),
        "32k": body_file("b32k", "bench", False, 32 * 1024),
        "256k": body_file("b256k", "bench", False, 256 * 1024),
        "stream": body_file("stream", "bench", True, 900),
        "paced": body_file("paced", "bench-paced", True, 900),
        "hold": body_file("hold", "bench-hold", True, 200),
        "messages": body_file("messages", "bench-claude", False, 900, api="messages"),
        "messages_stream": body_file("messages_stream", "bench-claude", True, 900, api="messages"),
        "responses": body_file("responses", "bench", False, 900, api="responses"),
        "responses_stream": body_file("responses_stream", "bench", True, 900, api="responses"),
    }
    cases = [
        ("c1", dict(mode="closed", body=bodies["1k"], conns=1)),
        ("c32", dict(mode="closed", body=bodies["1k"], conns=32)),
        ("c32_wrk", {}),
        ("c32_32k", dict(mode="closed", body=bodies["32k"], conns=32)),
        ("c32_256k", dict(mode="closed", body=bodies["256k"], conns=32)),
        ("stream_unpaced", dict(mode="closed", body=bodies["stream"], conns=32)),
        ("stream_paced_64", dict(mode="closed", body=bodies["paced"], conns=64)),
        ("stream_paced_256", dict(mode="closed", body=bodies["paced"], conns=256)),
        ("invalid_key", dict(mode="closed", body=bodies["1k"], conns=32, valid_key=False)),
        # The pass-through lanes of the other APIs, on the same prompt as c32 and stream_unpaced
        # (the fakes stream as many text deltas): compared with chat in `lanes`.
        ("messages_c32", dict(mode="closed", body=bodies["messages"], conns=32, api="messages")),
        ("messages_stream", dict(mode="closed", body=bodies["messages_stream"], conns=32, api="messages")),
        ("responses_c32", dict(mode="closed", body=bodies["responses"], conns=32, api="responses")),
        ("responses_stream", dict(mode="closed", body=bodies["responses_stream"], conns=32, api="responses")),
    ]
    cases = [(n, spec) for n, spec in cases if not CASES or n in CASES]
    # Noise check: direct c=1 p99 before every round; a round whose check is >3x the first is rerun.
    direct = next(c for c in running if c.name == "direct")
    results = {case: {n: [] for n in names} for case, _ in cases}
    noise = []
    for rnd in range(ROUNDS):
        for attempt in range(2):
            check = run_load(direct, "closed", bodies["1k"], conns=1, duration=1.0, warmup=0.2)
            p99 = check.get("latency_us", {}).get("p99")
            noise.append({"round": rnd, "attempt": attempt, "direct_c1_p99_us": p99})
            if p99 is None or not noise[0]["direct_c1_p99_us"] or p99 <= 3 * noise[0]["direct_c1_p99_us"]:
                break
            log(f"round {rnd}: noise check p99 {p99} us is off; rerunning the check")
            time.sleep(2)
        order = running[rnd % len(running):] + running[:rnd % len(running)]
        for case, spec in cases:
            for c in order:
                if case == "invalid_key" and not c.authenticates:
                    continue  # nothing to reject: direct and the bare proxies check no key
                if not serves(c, case):
                    continue
                r = run_wrk(c, bodies["1k"]) if case == "c32_wrk" else run_load(c, **spec)
                results[case][c.name].append(r)
                log(f"round {rnd} {case:17s} {c.name:8s} ok={r.get('ok')} bad={r.get('bad')} "
                    f"rps={r.get('rps', 0):.0f} p50={r.get('latency_us', {}).get('p50')}us")

    # Fixed-rate tail latency: rates up to what the slowest contender sustained at c=32.
    c32_rps = {n: median([r.get("rps") for r in results.get("c32", {}).get(n, [])]) or 0 for n in names}
    slowest = min(v for v in c32_rps.values() if v) if any(c32_rps.values()) else 100
    common_rate = max(10, int(slowest * 0.5))
    rates = sorted({common_rate, 1000, 3000, 6000}) if not CASES or "rate" in CASES else []
    rate_results = {n: {} for n in names}
    for rate in rates:
        for rnd in range(ROUNDS):
            order = running[rnd % len(running):] + running[:rnd % len(running)]
            for c in order:
                if rate > 1.5 * max(c32_rps.get(c.name, 0), 1):
                    continue  # beyond what it sustains closed-loop: it would only queue
                r = run_load(c, "rate", bodies["1k"], rate=rate, duration=1.5, warmup=0.3)
                rate_results[c.name].setdefault(rate, []).append(r)
        log(f"fixed rate {rate}/s done")

    # Open streams: RSS per stream (one round: memory does not jitter like latency).
    hold_results = {}
    start_rss = {c.name: getattr(c, "idle_rss", 0) for c in running}
    for c in running:
        if c.name == "direct" or c.peer or (CASES and "hold" not in CASES):
            continue
        hold_results[c.name] = []
        for n in HOLD_STREAMS:
            h = hold(c, bodies["hold"], n)
            hold_results[c.name].append(h)
            log(f"hold {c.name} {n} streams: rss {h['idle_rss_kib']} -> {h['holding_rss_kib']} KiB, ok={h['ok']}")

    for c in running:
        c.stop()
    os.killpg(fake.pid, signal.SIGKILL)

    for n, hs in hold_results.items():
        for h in hs:
            h["start_rss_kib"] = start_rss.get(n, 0)
    report = summarise(names, cases, results, rate_results, common_rate, hold_results, skipped,
                       noise, running, time.time() - started)
    (OUT / "results.json").write_text(json.dumps(report, indent=2))
    (OUT / "results.md").write_text(render_markdown(report))
    plot(report)
    log(f"done in {time.time() - started:.0f} s; wrote {OUT}")
    print(render_markdown(report))


def summarise(names, cases, results, rate_results, common_rate, hold_results, skipped, noise, running, elapsed_s):
    direct = {}
    table = {}
    for case, spec in cases:
        table[case] = {}
        for n in names:
            rs = [r for r in results[case][n] if "error" not in r]
            if not rs:
                continue
            reqs = [r["all"] for r in rs]
            row = {
                "rps": median([r["rps"] for r in rs]),
                "p50_us": median([r["latency_us"]["p50"] for r in rs if r["ok"]]),
                "p99_us": median([r["latency_us"]["p99"] for r in rs if r["ok"]]),
                "p999_us": median([r["latency_us"]["p999"] for r in rs if r["ok"]]),
                "ttft_p50_us": median([r["ttft_us"]["p50"] for r in rs if r["ok"]]),
                "ttft_p99_us": median([r["ttft_us"]["p99"] for r in rs if r["ok"]]),
                "ok": sum(r["ok"] for r in rs),
                "bad": sum(r["bad"] for r in rs),
                "cpu_us_per_req": median([r["cpu_ns"] / 1000 / max(r["all"], 1) for r in rs]) if n != "direct" else None,
                "rss_kib": median([r["rss_kib"] for r in rs]) if n != "direct" else None,
                "requests": sum(reqs),
            }
            sides = {k for r in rs for k in r.get("side_cpu_ns", {})}
            for k in sides:
                row[f"{k}_cpu_us_per_req"] = median([r["side_cpu_ns"].get(k, 0) / 1000 / max(r["all"], 1)
                                                     for r in rs if "side_cpu_ns" in r])
            # One core for the contender: throughput per core is its requests per CPU-second.
            if row["cpu_us_per_req"]:
                row["rps_per_core"] = 1e6 / row["cpu_us_per_req"]
            if case.startswith("stream") and row["cpu_us_per_req"]:
                row["cpu_us_per_chunk"] = row["cpu_us_per_req"] / EVENTS_PER_STREAM
            table[case][n] = row
        direct[case] = table[case].get("direct")
        for n, row in table[case].items():
            d = direct[case]
            if d and n != "direct":
                for key in ["p50_us", "p99_us", "p999_us", "ttft_p50_us"]:
                    if row[key] is not None and d[key] is not None:
                        row["added_" + key] = row[key] - d[key]
    rates = {}
    for n, per_rate in rate_results.items():
        rates[n] = {str(rate): {
            "p50_us": median([r["latency_us"]["p50"] for r in rs if "latency_us" in r]),
            "p99_us": median([r["latency_us"]["p99"] for r in rs if "latency_us" in r]),
            "p999_us": median([r["latency_us"]["p999"] for r in rs if "latency_us" in r]),
            "bad": sum(r.get("bad", 0) for r in rs),
            # The same offered load for every contender: CPU per request compared without the
            # batching a faster closed loop gives (a contender whose side processes share the
            # load's core runs its closed loop slower, so fewer requests share each wake-up).
            "cpu_us_per_req": median([r["cpu_ns"] / 1000 / max(r["all"], 1) for r in rs
                                      if "cpu_ns" in r and r.get("all")]) if n != "direct" else None,
        } for rate, rs in per_rate.items()}
    holds = {}
    for n, hs in hold_results.items():
        # Against the RSS the contender had before any load: allocators keep what they grew.
        holds[n] = [dict(h, kib_per_stream=(h["holding_rss_kib"] - h["start_rss_kib"]) / h["streams"])
                    for h in hs if h["held"]]
    ratios = {}
    for case in table:
        t = table[case]
        ratios[case] = {}
        for mine in [n for n in t if n.startswith("tokn")]:
            tokn = t[mine]
            for n, row in t.items():
                if n.startswith("tokn") or n == "direct" or not row.get("ok"):
                    continue  # no ratio against a contender that failed the case
                if row.get("cpu_us_per_req") and tokn.get("cpu_us_per_req"):
                    ratios[case][f"cpu_per_req_{mine}_over_{n}"] = tokn["cpu_us_per_req"] / row["cpu_us_per_req"]
                if row.get("rps_per_core") and tokn.get("rps_per_core"):
                    ratios[case][f"rps_per_core_{mine}_over_{n}"] = tokn["rps_per_core"] / row["rps_per_core"]
    ratios["fixed_rate"] = {}
    for rate in sorted({int(x) for v in rates.values() for x in v}):
        for mine in [n for n in rates if n.startswith("tokn")]:
            for n in [n for n in rates if not n.startswith("tokn") and n != "direct"]:
                a = rates[mine].get(str(rate), {}).get("cpu_us_per_req")
                b = rates[n].get(str(rate), {}).get("cpu_us_per_req")
                if a and b:
                    ratios["fixed_rate"][f"cpu_per_req_{mine}_over_{n}_at_{rate}"] = a / b
    # The other APIs' pass-through lanes against chat on the same prompt: CPU per request of the
    # lane ÷ chat's, per tokn contender (the line: ≤ 1.2).
    lanes = {}
    for lane, chat in LANE_BASES.items():
        for n, row in table.get(lane, {}).items():
            base = table.get(chat, {}).get(n)
            if n.startswith("tokn") and row.get("ok") and base and base.get("cpu_us_per_req") and row.get("cpu_us_per_req"):
                lanes.setdefault(n, {})[lane] = {"cpu_us_per_req": row["cpu_us_per_req"], "chat_case": chat,
                                                 "chat_cpu_us_per_req": base["cpu_us_per_req"],
                                                 "ratio": row["cpu_us_per_req"] / base["cpu_us_per_req"]}
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "cpu_model": cpu_model(), "pinning": "contender on core 1; load + fake on core 0"},
        "settings": {"rounds": ROUNDS, "duration_s": DURATION_S, "fixed_rate_common": common_rate,
                     "hold_streams": HOLD_STREAMS},
        "contenders": names,
        "skipped": skipped,
        "noise_checks": noise,
        "cases": table,
        "fixed_rate": rates,
        "open_streams": holds,
        "ratios": ratios,
        "lanes": lanes,
        "elapsed_s": elapsed_s,
    }


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def render_markdown(r):
    names = r["contenders"]
    lines = [f"# Gateway benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {r['machine']['cpus']} cores, {r['machine']['cpu_model']}; {r['machine']['pinning']}. "
             f"{r['settings']['rounds']} interleaved rounds × {r['settings']['duration_s']} s per case, medians. "
             f"Whole run {r['elapsed_s']:.0f} s.", ""]
    if r["skipped"]:
        for n, why in r["skipped"].items():
            lines.append(f"- skipped **{n}**: {why}")
        lines.append("")
    def table(case, cols):
        t = r["cases"].get(case, {})
        lines.append(f"### {case}")
        lines.append("")
        lines.append("| metric | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for label, key, digits in cols:
            cells = []
            for n in names:
                row = t.get(n, {})
                failed = row and not row.get("ok") and key != "bad"
                cells.append("fails" if failed else fmt(row.get(key), digits))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lat = [("req/s", "rps", 0), ("CPU µs / request", "cpu_us_per_req", 1),
           ("control plane CPU µs / request", "control_cpu_us_per_req", 1),
           ("Redis CPU µs / request", "redis_cpu_us_per_req", 1),
           ("Postgres CPU µs / request", "postgres_cpu_us_per_req", 1), ("req/s per core", "rps_per_core", 0),
           ("p50 µs", "p50_us", 0), ("added p50 µs", "added_p50_us", 0), ("added p99 µs", "added_p99_us", 0),
           ("added p99.9 µs", "added_p999_us", 0), ("RSS KiB", "rss_kib", 0), ("invalid responses", "bad", 0)]
    for case in ["c1", "c32"]:
        table(case, lat)
    table("c32_wrk", [("req/s (wrk)", "rps", 0), ("CPU µs / request", "cpu_us_per_req", 1),
                      ("req/s per core", "rps_per_core", 0), ("non-2xx / socket errors", "bad", 0)])
    for case in ["c32_32k", "c32_256k"]:
        table(case, lat)
    stream_cols = [("streams/s", "rps", 0), ("CPU µs / stream", "cpu_us_per_req", 1), ("CPU µs / chunk", "cpu_us_per_chunk", 2),
                   ("control plane CPU µs / stream", "control_cpu_us_per_req", 1),
                   ("Redis CPU µs / stream", "redis_cpu_us_per_req", 1),
                   ("Postgres CPU µs / stream", "postgres_cpu_us_per_req", 1),
                   ("TTFT p50 µs", "ttft_p50_us", 0), ("added TTFT p50 µs", "added_ttft_p50_us", 0),
                   ("total p50 µs", "p50_us", 0), ("added total p50 µs", "added_p50_us", 0), ("added total p99 µs", "added_p99_us", 0),
                   ("invalid responses", "bad", 0)]
    for case in ["stream_unpaced", "stream_paced_64", "stream_paced_256"]:
        table(case, stream_cols)
    table("invalid_key", [("rejections/s", "rps", 0), ("CPU µs / rejection", "cpu_us_per_req", 1),
                          ("unexpected responses", "bad", 0)])
    for case in LANE_BASES:
        table(case, lat if case.endswith("c32") else stream_cols)
    if r.get("lanes"):
        lines.append("### other APIs' pass-through lanes against chat (same prompt; CPU µs per request)")
        lines.append("")
        lines.append("| contender | lane | lane CPU µs | chat case | chat CPU µs | lane ÷ chat |")
        lines.append("|---|---|---|---|---|---|")
        for n, per_lane in r["lanes"].items():
            for lane, v in per_lane.items():
                lines.append(f"| {n} | {lane} | {v['cpu_us_per_req']:.1f} | {v['chat_case']} | "
                             f"{v['chat_cpu_us_per_req']:.1f} | {v['ratio']:.2f} |")
        lines.append("")
    lines.append(f"### fixed rate (latency from the scheduled send time)")
    lines.append("")
    lines.append("| rate/s | " + " | ".join(f"{n} p50 / p99 / p99.9 µs" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    all_rates = sorted({int(x) for v in r["fixed_rate"].values() for x in v})
    for rate in all_rates:
        cells = []
        for n in names:
            v = r["fixed_rate"].get(n, {}).get(str(rate))
            cells.append("–" if not v else f"{fmt(v['p50_us'])} / {fmt(v['p99_us'])} / {fmt(v['p999_us'])}")
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("### fixed rate: CPU µs per request (the same offered load for every contender)")
    lines.append("")
    cpu_names = [n for n in names if n != "direct"]
    lines.append("| rate/s | " + " | ".join(cpu_names) + " |")
    lines.append("|---|" + "---|" * len(cpu_names))
    for rate in all_rates:
        cells = []
        for n in cpu_names:
            v = r["fixed_rate"].get(n, {}).get(str(rate))
            cells.append("–" if not v or not v.get("cpu_us_per_req") else f"{v['cpu_us_per_req']:.1f}")
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("### open streams (RSS)")
    lines.append("")
    lines.append("| contender | streams | RSS before any load KiB | RSS with all open KiB | KiB / stream | completed |")
    lines.append("|---|---|---|---|---|---|")
    for n, hs in r["open_streams"].items():
        for h in hs:
            lines.append(f"| {n} | {h['streams']} | {h['start_rss_kib']} | {h['holding_rss_kib']} | {h['kib_per_stream']:.1f} | {h['ok']} |")
    lines.append("")
    lines.append("### ratios (tokn ÷ other)")
    lines.append("")
    for case, rs in r["ratios"].items():
        if rs:
            lines.append(f"- **{case}**: " + ", ".join(f"{k} = {v:.2f}" for k, v in rs.items()))
    lines.append("")
    return "\n".join(lines)


def plot(r):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, per_rate in r["fixed_rate"].items():
        pts = sorted((int(k), v["p99_us"]) for k, v in per_rate.items() if v["p99_us"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 1000 for p in pts], marker="o", label=n)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("p99 latency (ms, from scheduled send)")
    ax.set_title("Latency vs offered load (non-streaming, 1 KB body)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "latency_vs_load.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, hs in r["open_streams"].items():
        ax.plot([h["streams"] for h in hs], [h["holding_rss_kib"] / 1024 for h in hs], marker="o", label=n)
    ax.set_xlabel("open streams")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Memory vs open SSE streams")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "rss_vs_streams.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
