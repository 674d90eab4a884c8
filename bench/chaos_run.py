"""`splitserve chaos`: faults under load against a live cluster, then the invariants a user relies on.

    server   --url/--grpc (running), or launch `splitserve serve ARGS` on free ports and stop it afterwards
    baseline idle: KV blocks per worker, Ray resources (launched: read from its GCS), its process tree
    load     C client threads stream requests through the gRPC SDK until --duration ends; request i has a
             fixed random prompt of --prompt-tokens ids and --max-tokens new tokens (ignore_eos), greedy when
             i is even, seeded sampling when odd, so each one has exactly one right answer
    faults   every --kill-every s: SIGKILL a random live worker (kill) or POST /admin/drain it (drain); mixed
             alternates, starting with a kill; never the last serving decode worker
    checks   no failed request (unless it saw more faults than the migration limit), chunk seqs 1..n with no
             gap and no repeat (also in what the server sent, before the SDK's de-duplication), exactly
             max_tokens tokens, the same tokens as a fault-free run of the same request (a replay against the
             same server afterwards, or a local engine), KV blocks free on every live worker once idle, Ray
             resources back to baseline with no placement group left holding a dead worker's share, and
             (launched) no process of the server left once it has stopped
    stalls   per fault, the longest gap between consecutive chunks a client saw around it; p50/p99 over the
             requests the victim held (the n largest such gaps among the requests in flight, n = the victim's
             running + waiting requests from GetLoad just before a kill, migrated + recomputed for a drain);
             decode victims only (a prefill worker's requests have no chunk yet: it costs them TTFT)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import psutil

from splitserve.client import Client, SplitServeError
from splitserve.client._common import StreamState, build_request, deadline_after
from splitserve.client.sync_client import ChunkStream
from splitserve.cmd_chaos import DEFAULT_LAUNCH, MODES, REFERENCES, VICTIMS
from splitserve.ports import free_port



@dataclass(slots=True)
class ChaosConfig:
    duration_s: float = 120.0
    kill_every_s: float = 30.0
    mode: str = "mixed"
    url: str | None = None                  # a running server's HTTP address (else one is launched)
    grpc: str | None = None                 # its gRPC host:port (default: the URL's host, port 50051)
    launch: str = DEFAULT_LAUNCH            # `splitserve serve` arguments for the launched server
    concurrency: int = 4
    prompt_tokens: int = 448
    max_tokens: int = 64
    victims: str = "any"                    # which workers faults may hit
    drain_deadline_s: float = 30.0
    seed: int = 0
    reference: str = "replay"               # replay: same server after the faults; local: a local LLMEngine
    dtype: str = "float32"                  # the local reference engine's dtype
    controls: int = 4                       # unaffected requests also compared (checks the reference itself)
    compare: int = 0                        # compare at most this many requests in flight around a fault (0: all)
    request_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    api_key: str | None = None
    ray_address: str | None = None          # --url: the cluster's GCS, for the Ray resource check
    replace: bool = False                   # after each fault, add a fresh worker of the victim's role (and
                                            # remove a drained victim), as an autoscaler replacing the node would
    replace_delay_s: float = 3.0            # ... this long after the fault (a new node is not there at once)
    log_dir: str | None = None
    rounds: int = 1                         # runs on fresh servers, reported as one

    def __post_init__(self) -> None:
        for name in ("duration_s", "kill_every_s", "drain_deadline_s", "request_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if not self.replace_delay_s >= 0:
            raise ValueError(f"--replace-delay must be zero or more, got {self.replace_delay_s}")
        if self.rounds > 1 and self.url:
            raise ValueError("--rounds needs a launched server (a fresh one per round), not --url")
        if not isinstance(self.compare, int) or self.compare < 0:
            raise ValueError(f"--compare must be 0 (all) or a positive integer, got {self.compare!r}")
        for name in ("concurrency", "prompt_tokens", "max_tokens", "rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name, allowed in (("mode", MODES), ("victims", VICTIMS), ("reference", REFERENCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.grpc and not self.url:
            raise ValueError("--grpc needs --url (the same server's HTTP address)")
        if self.url and not self.grpc:
            host = httpx.URL(self.url).host or "127.0.0.1"
            self.grpc = f"{host}:50051"


def _flag(name: str) -> str:
    return name.removesuffix("_s").replace("_", "-")


# ---- the server ----------------------------------------------------------------------------------------------
class Target:
    """A running server: its admin routes over HTTP, its gRPC API through the SDK."""

    def __init__(self, url: str, grpc: str, api_key: str | None = None, ray_address: str | None = None) -> None:
        self.url, self.grpc, self.api_key, self.ray_address = url.rstrip("/"), grpc, api_key, ray_address
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30, trust_env=False)
        self._client = Client(grpc, api_key=api_key, timeout=30)

    def client(self, timeout_s: float) -> Client:
        return Client(self.grpc, api_key=self.api_key, timeout=timeout_s)

    def model_info(self):
        return self._client.model_info()

    def load(self):
        return self._client.load()

    def workers(self) -> list[dict]:
        r = self.http.get("/admin/workers")
        r.raise_for_status()
        return r.json()["workers"]

    def counter(self, name: str) -> float | None:
        """A Prometheus counter's value summed over its labels (`name` without `_total`); None if unreadable."""
        try:
            r = self.http.get("/metrics", timeout=10)
            r.raise_for_status()
        except httpx.HTTPError:
            return None
        total = None
        for line in r.text.splitlines():
            head, _, value = line.partition(" ")
            if head.split("{")[0] == f"{name}_total":
                total = (total or 0.0) + float(value)
        return total

    def held_by(self, worker_id: str) -> int:
        return next((w.num_running + w.num_waiting for w in self.load().workers if w.worker_id == worker_id), 0)

    def drain(self, worker_id: str, deadline_s: float) -> dict:
        r = self.http.post("/admin/drain", json={"target": worker_id, "deadline_s": deadline_s},
                           timeout=deadline_s + 60)
        if r.status_code != 200:
            raise RuntimeError(f"POST /admin/drain {worker_id}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def add_worker(self, role: str) -> dict:
        r = self.http.post("/admin/workers", json={"role": role}, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"POST /admin/workers {role}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def remove_worker(self, worker_id: str) -> None:
        r = self.http.delete(f"/admin/workers/{worker_id}", timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"DELETE /admin/workers/{worker_id}: HTTP {r.status_code}: {r.text[:300]}")

    def check_killable(self, w: dict) -> None:
        """Only a Ray worker process on this host is ever signalled."""
        if w["hostname"] and w["hostname"] != socket.gethostname():
            raise RuntimeError(f"{w['worker_id']} runs on {w['hostname']}, not here: it cannot be killed from here")
        name = " ".join(psutil.Process(w["pid"]).cmdline())
        if not name.startswith("ray::"):
            raise RuntimeError(f"pid {w['pid']} of {w['worker_id']} is not a Ray worker ({name[:80]!r})")

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def ray_gcs(self) -> tuple[str, dict] | None:
        return (self.ray_address, {}) if self.ray_address else None


class LaunchedServer(Target):
    """`splitserve serve ARGS` on free local ports, in its own session, logging to a file; every process it
    starts (Ray's GCS, raylet, workers) is remembered so that none may outlive it."""

    def __init__(self, launch: str, api_key: str | None = None, log_dir: str | None = None,
                 timeout_s: float = 300.0) -> None:
        http_port, grpc_port = free_port(), free_port()
        args = shlex.split(launch) + (["--api-key", api_key] if api_key else [])
        cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), *args]
        folder = Path(log_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = str(folder / f"splitserve-chaos-serve-{http_port}.log")
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes: dict[int, tuple[float, str]] = {}     # pid -> (create time, command line)
        self.gcs_address: str | None = None                     # its Ray cluster's, and a process that knows it
        self.gcs_pid = 0
        self.exit_code: int | None = None
        super().__init__(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", api_key)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.track()

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"splitserve serve exited with {self.proc.returncode}:\n{self.log_tail(40)}")
            try:
                if self.http.get("/health", timeout=2).status_code == 200 and self.workers():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"splitserve serve not healthy after {timeout_s:.0f} s:\n{self.log_tail(40)}")

    def track(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root] + root.children(recursive=True):
                if p.pid not in self.processes:
                    cmdline = " ".join(p.cmdline())
                    self.processes[p.pid] = (p.create_time(), cmdline[:200])
                    m = re.search(r"--gcs-address=(\S+)", cmdline)
                    if m and self.gcs_address is None:
                        self.gcs_address, self.gcs_pid = m.group(1), p.pid
        except psutil.Error:
            pass

    def check_killable(self, w: dict) -> None:
        super().check_killable(w)
        self.track()
        if w["pid"] not in self.processes:
            raise RuntimeError(f"pid {w['pid']} of {w['worker_id']} is not a process of the launched server")

    def ray_gcs(self) -> tuple[str, dict] | None:
        """The launched cluster's GCS address and auth token, read from its raylet's command line and environment."""
        self.track()
        if self.gcs_address is None:
            return None
        try:
            env = psutil.Process(self.gcs_pid).environ()
        except psutil.Error:
            return None
        return self.gcs_address, {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k in env}

    def stop(self, timeout_s: float = 90.0) -> int | None:
        if self.proc.poll() is None:
            self.track()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.exit_code is None:
            self.exit_code = self.proc.returncode
            self.http.close()
            self._client.close()
        return self.exit_code

    def leak_check(self, grace_s: float = 20.0) -> dict:
        """Every process the server started has exited (Ray's own shutdown may take a few seconds)."""
        end = time.monotonic() + grace_s
        while True:
            alive = {pid: cmd for pid, (created, cmd) in self.processes.items() if _running(pid, created)}
            if not alive or time.monotonic() > end:
                break
            time.sleep(0.5)
        if not alive:
            return {"ok": True, "detail": f"all {len(self.processes)} processes of the server exited "
                                          f"(exit code {self.exit_code})"}
        return {"ok": False, "detail": f"{len(alive)} of {len(self.processes)} processes still running "
                                       f"{grace_s:.0f} s after the server stopped: "
                                       + "; ".join(f"{pid} {cmd[:80]}" for pid, cmd in list(alive.items())[:5])}

    def log_tail(self, n: int) -> str:
        self._log.flush()
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


def _running(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


RAY_PROBE = """
import json, sys
import ray
reply = ray._raylet.GcsClient(address=sys.argv[1]).get_all_resource_usage(timeout=10)
print(json.dumps([{"total": dict(n.resources_total), "available": dict(n.resources_available)}
                  for n in reply.resource_usage_data.batch]))
"""


def ray_resources(target: Target) -> dict | None:
    """The cluster's plain resources (CPU, GPU, memory, ...) summed over nodes: available, and held outside any
    placement group (total - available - reserved by groups); the placement groups, and those whose reserved
    CPU/GPU is entirely unused (no live actor in them). None when the GCS is out of reach."""
    gcs = target.ray_gcs()
    if gcs is None:
        return None
    out = subprocess.run([sys.executable, "-c", RAY_PROBE, gcs[0]], env={**os.environ, **gcs[1]},
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return None
    return summarize_ray_usage(json.loads(out.stdout.strip().splitlines()[-1]))


def summarize_ray_usage(nodes: list[dict]) -> dict:
    """[{total, available} per node] (GCS resource usage) -> what `check_ray` compares."""
    total: dict[str, float] = {}
    available: dict[str, float] = {}
    groups: dict[str, dict[str, list[float]]] = {}        # group id -> resource -> [reserved, unused]
    for node in nodes:
        for name, amount in node["total"].items():
            free = node["available"].get(name, 0.0)
            m = re.fullmatch(r"(\w+?)_group_([0-9a-f]+)", name)
            if m and m.group(1) != "bundle":
                g = groups.setdefault(m.group(2), {}).setdefault(m.group(1), [0.0, 0.0])
                g[0], g[1] = g[0] + amount, g[1] + free
            elif "_group_" not in name and not name.startswith("node:"):
                total[name] = total.get(name, 0.0) + amount
                available[name] = available.get(name, 0.0) + free
    reserved = {k: sum(g.get(k, [0.0])[0] for g in groups.values()) for k in total}
    outside = {k: round(total[k] - available[k] - reserved[k], 6) for k in total}
    idle = sorted(pg[:12] for pg, g in groups.items()
                  if any(r > 0 for r, _ in g.values()) and all(free >= r - 1e-9 for r, free in g.values()))
    return {"available": available, "outside": outside, "groups": sorted(groups), "idle_groups": idle}


# ---- requests ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class RequestRecord:
    index: int
    request_id: str
    sampling: dict
    prompt: list[int]
    sent_at: float
    times: list[float] = field(default_factory=list)     # arrival of each chunk (monotonic)
    seqs: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    raw_seqs: list[int] = field(default_factory=list)    # every event seq the server sent, before de-duplication
    finish_reason: str | None = None
    error: str | None = None
    done_at: float = 0.0


def request_spec(i: int, cfg: ChaosConfig, vocab_size: int) -> tuple[list[int], dict]:
    """Request i: a fixed random prompt (ids clear of the special tokens at both ends of the vocabulary), greedy
    when i is even, seeded nucleus sampling when odd; always exactly max_tokens new tokens."""
    rng = random.Random(f"{cfg.seed}:{i}")
    prompt = [rng.randrange(200, max(201, vocab_size - 200)) for _ in range(cfg.prompt_tokens)]
    sampling = {"max_tokens": cfg.max_tokens, "ignore_eos": True, "temperature": 0.0}
    if i % 2:
        sampling.update(temperature=0.8, top_p=0.95, seed=10_000 + cfg.seed * 100_000 + i)
    return prompt, sampling


class _RecordingState(StreamState):
    """The SDK's stream bookkeeping, also keeping every seq the server sent (the SDK drops repeats silently)."""

    __slots__ = ("raw_seqs",)

    def accept(self, resp):
        self.raw_seqs.append(getattr(resp, resp.WhichOneof("event")).seq)
        return StreamState.accept(self, resp)


def stream_one(client: Client, index: int, prompt: list[int], sampling: dict, timeout_s: float) -> RequestRecord:
    request = build_request(prompt, None, None, None, sampling)
    state = _RecordingState(request.request_id, deadline_after(timeout_s))
    state.raw_seqs = []
    rec = RequestRecord(index, request.request_id, sampling, prompt, time.monotonic())
    stream = ChunkStream(client, request, state)
    try:
        for chunk in stream:
            rec.times.append(time.monotonic())
            rec.seqs.append(chunk.seq)
            rec.token_ids.extend(chunk.token_ids)
        rec.finish_reason = stream.finish_reason
    except SplitServeError as e:
        rec.error = f"{e.code}: {e}"
    except Exception as e:            # a bug in the harness or the SDK: still a failed request in the report
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        stream.close()
        rec.raw_seqs = list(state.raw_seqs)
        rec.done_at = time.monotonic()
    return rec


def run_load(target: Target, cfg: ChaosConfig, vocab_size: int, end: float) -> list[RequestRecord]:
    """C threads, each streaming one request after another until `end`; returns once all have finished."""
    records: list[RequestRecord] = []
    ids = itertools.count()
    lock = threading.Lock()

    def loop() -> None:
        with target.client(cfg.request_timeout_s) as client:
            while time.monotonic() < end:
                with lock:
                    i = next(ids)
                rec = stream_one(client, i, *request_spec(i, cfg, vocab_size), cfg.request_timeout_s)
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=loop, name=f"chaos-load-{k}", daemon=True) for k in range(cfg.concurrency)]
    _run_threads(threads)
    return sorted(records, key=lambda r: r.index)


def _run_threads(threads: list[threading.Thread]) -> None:
    """Start and wait for `threads`; joined with a timeout so that Ctrl-C reaches the main thread (and the
    launched server gets stopped)."""
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)


# ---- faults --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Fault:
    kind: str                     # kill | drain
    at: float                     # monotonic time it was injected
    worker_id: str = ""
    role: str = ""
    pid: int = 0
    held: int = 0                 # requests the victim held just before (kill: GetLoad; drain: the report)
    report: dict | None = None    # the drain's answer
    skipped: str = ""             # why nothing was injected
    error: str = ""
    replaced_by: str = ""         # --replace: the worker added in its place
    injected: bool = False        # the kill / drain happened (error may still say the replacement failed)
    reprefill_before: float | None = None    # the server's re-prefilled-token counter just before the fault
    reprefill_tokens: float | None = None    # how far it moved until the next fault (or the end of the load)


def eligible(kind: str, workers: list[dict], gone: set[str], victims: str = "any") -> list[dict]:
    """Workers a `kind` fault may hit: live, not draining, not already hit, never the last serving decode worker
    (nothing could take its requests); a drain only hits decode workers (a prefill worker has no live KV)."""
    live = [w for w in workers if w["alive"] and not w["draining"] and w["worker_id"] not in gone]
    serving_decode = sum(1 for w in live if w["role"] != "prefill")
    out = []
    for w in live:
        prefill = w["role"] == "prefill"
        if prefill and (kind == "drain" or victims == "decode"):
            continue
        if not prefill and (victims == "prefill" or serving_decode < 2):
            continue
        out.append(w)
    return out


REPREFILL_COUNTER = "splitserve_reprefill_tokens"


def attribute_reprefill(faults: list[Fault], final: float | None) -> None:
    """Each injected fault gets the re-prefilled tokens counted from just before it to just before the next one
    (the last: to `final`, read once the load has finished)."""
    injected = [f for f in faults if f.injected]
    for f, nxt in zip(injected, injected[1:] + [None]):
        end = nxt.reprefill_before if nxt is not None else final
        if f.reprefill_before is not None and end is not None:
            f.reprefill_tokens = end - f.reprefill_before


class FaultInjector(threading.Thread):
    def __init__(self, target: Target, cfg: ChaosConfig, start: float) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.target, self.cfg, self.start_at = target, cfg, start
        self.rng = random.Random(cfg.seed)
        self.faults: list[Fault] = []
        self.gone: set[str] = set()
        self.stopping = threading.Event()
        self.replacing: list[threading.Thread] = []     # --replace: replacements run beside the next faults

    def schedule(self) -> list[tuple[float, str]]:
        c = self.cfg
        times = [c.kill_every_s * k for k in range(1, int(c.duration_s / c.kill_every_s) + 1) if c.kill_every_s * k
                 < c.duration_s]
        return [(t, c.mode if c.mode != "mixed" else ("kill", "drain")[k % 2]) for k, t in enumerate(times)]

    def run(self) -> None:
        try:
            for offset, kind in self.schedule():
                if self.stopping.wait(max(0.0, self.start_at + offset - time.monotonic())):
                    return
                try:
                    self.faults.append(self.inject(kind))
                except Exception as e:         # the admin API failed: recorded, the run goes on
                    self.faults.append(Fault(kind, time.monotonic(), error=f"{type(e).__name__}: {e}"))
        finally:
            for t in self.replacing:
                t.join()

    def inject(self, kind: str) -> Fault:
        workers = self.target.workers()
        choices = eligible(kind, workers, self.gone, self.cfg.victims)
        if not choices:
            return Fault(kind, time.monotonic(), skipped="no eligible worker (the last serving decode worker is "
                                                        "never hit; killed workers are not replaced)")
        w = self.rng.choice(choices)
        fault = Fault(kind, 0.0, w["worker_id"], w["role"], w["pid"],
                      reprefill_before=self.target.counter(REPREFILL_COUNTER))
        if kind == "kill":
            fault.held = self.target.held_by(w["worker_id"])
            self.target.check_killable(w)
            fault.at = time.monotonic()
            self.target.kill(w["pid"])
            fault.injected = True
        else:
            fault.at = time.monotonic()
            fault.report = self.target.drain(w["worker_id"], self.cfg.drain_deadline_s)
            fault.injected = True
            fault.held = fault.report.get("migrated", 0) + fault.report.get("recomputed", 0)
        self.gone.add(w["worker_id"])
        if self.cfg.replace:        # as an autoscaler would, while the schedule goes on (a model load takes a while)
            t = threading.Thread(target=self.replace, args=(fault, w), name="chaos-replace", daemon=True)
            t.start()
            self.replacing.append(t)
        return fault

    def replace(self, fault: Fault, w: dict) -> None:
        time.sleep(self.cfg.replace_delay_s)   # the streams it held resume first (the stall is measured on them)
        try:
            if fault.kind == "drain":          # the drained node goes away, as it would at its deadline
                self.target.remove_worker(w["worker_id"])
            fault.replaced_by = self.target.add_worker(w["role"])["worker_id"]
        except Exception as e:
            fault.error = f"replacing {w['worker_id']}: {e}"


# ---- checks --------------------------------------------------------------------------------------------------
def check(ok: bool | None, detail: str) -> dict:
    return {"ok": ok, "detail": detail}


def faults_seen(rec: RequestRecord, faults: list[Fault]) -> int:
    return sum(1 for f in faults if f.injected and rec.sent_at <= f.at <= rec.done_at)


def timeline(r: RequestRecord, faults: list[Fault], start: float) -> dict:
    """Where a request was when things happened, for the report of a failed or wrong one (seconds from start)."""
    return {"request_id": r.request_id, "index": r.index, "sampling": r.sampling, "sent_s": round(r.sent_at - start, 2),
            "chunks": len(r.times), "tokens": len(r.token_ids),
            "first_chunk_s": round(r.times[0] - start, 2) if r.times else None,
            "last_chunk_s": round(r.times[-1] - start, 2) if r.times else None,
            "done_s": round(r.done_at - start, 2), "finish_reason": r.finish_reason, "error": r.error,
            "faults_during": [f"{f.kind} {f.worker_id} at {f.at - start:.2f}s" for f in faults
                              if f.injected and r.sent_at <= f.at <= r.done_at]}


def check_requests(records: list[RequestRecord], faults: list[Fault], max_tokens: int) -> tuple[dict, dict, dict]:
    failed, beyond = [], []
    for r in records:
        if r.error is None and r.finish_reason in ("length", "stop"):
            continue
        m = re.search(r"after (\d+) placements", r.error or "")
        (beyond if m and faults_seen(r, faults) >= int(m.group(1)) - 1 else failed).append(r)
    bad_seqs = [r for r in records if r.seqs != list(range(1, len(r.seqs) + 1))]
    repeats = [r for r in records if any(b <= a for a, b in zip(r.raw_seqs, r.raw_seqs[1:]) if b)]
    wrong_len = [r for r in records if r.error is None and len(r.token_ids) != max_tokens]
    no_fail = check(not failed, f"{len(records) - len(failed) - len(beyond)}/{len(records)} finished; "
                                f"{len(beyond)} over the migration limit" + _examples(failed, "failed"))
    seqs = check(not bad_seqs and not repeats,
                 f"{len(bad_seqs)} streams with a gap or repeat in chunk seqs, {len(repeats)} where the server "
                 f"re-sent a seq" + _examples(bad_seqs + repeats, "seqs"))
    count = check(not wrong_len, f"{len(wrong_len)} finished streams without exactly {max_tokens} tokens"
                  + _examples(wrong_len, "tokens"))
    return no_fail, seqs, count


def _examples(recs: list[RequestRecord], what: str, n: int = 3) -> str:
    if not recs:
        return ""
    show = []
    for r in recs[:n]:
        if what == "failed":
            show.append(f"{r.request_id}: {r.error or r.finish_reason}")
        elif what == "seqs":
            show.append(f"{r.request_id}: chunk seqs {_ranges(r.seqs)}, server seqs {_ranges(r.raw_seqs)}")
        else:
            show.append(f"{r.request_id}: {len(r.token_ids)} tokens")
    return "; e.g. " + " | ".join(show)


def _ranges(seqs: list[int]) -> str:
    if len(seqs) <= 12:
        return str(seqs)
    return f"[{', '.join(map(str, seqs[:6]))}, ..., {', '.join(map(str, seqs[-6:]))}] ({len(seqs)})"


def in_fault_window(rec: RequestRecord, faults: list[Fault], window: float) -> bool:
    return any(f.injected and rec.sent_at <= f.at + window and rec.done_at >= f.at for f in faults)


def reference_outputs(target: Target, cfg: ChaosConfig, recs: list[RequestRecord]) -> list[list[int] | None]:
    """The fault-free tokens of each record's request: replayed on the (now quiet) server, or a local engine."""
    if cfg.reference == "local":
        from splitserve.engine.config import EngineConfig
        from splitserve.engine.llm_engine import LLMEngine
        from splitserve.engine.sampling_params import SamplingParams

        engine = LLMEngine(EngineConfig(dtype=cfg.dtype, verbose=False))
        outs = engine.generate([r.prompt for r in recs], [SamplingParams(**r.sampling) for r in recs])
        return [list(o.token_ids) for o in outs]
    out: list[list[int] | None] = [None] * len(recs)
    todo = iter(range(len(recs)))
    lock = threading.Lock()

    def loop() -> None:
        with target.client(cfg.request_timeout_s) as client:
            while True:
                with lock:
                    k = next(todo, None)
                if k is None:
                    return
                again = stream_one(client, -1, recs[k].prompt, recs[k].sampling, cfg.request_timeout_s)
                out[k] = again.token_ids if again.error is None else None

    _run_threads([threading.Thread(target=loop, daemon=True) for _ in range(min(cfg.concurrency, len(recs)) or 1)])
    return out


def check_outputs(target: Target, cfg: ChaosConfig, records: list[RequestRecord], faults: list[Fault]) -> dict:
    done = [r for r in records if r.error is None]
    window = min(cfg.kill_every_s, 30.0)
    affected = [r for r in done if in_fault_window(r, faults, window)]
    controls = [r for r in done if r not in affected][: cfg.controls]
    if cfg.compare and len(affected) > cfg.compare:     # a long run: the ones that saw the most faults
        affected = sorted(affected, key=lambda r: (-faults_seen(r, faults), r.index))[: cfg.compare]
    if not affected + controls:
        return check(None, "no finished request to compare")
    refs = reference_outputs(target, cfg, affected + controls)
    diffs = [(r, ref) for r, ref in zip(affected + controls, refs) if ref is None or r.token_ids != ref]
    bad_controls = [r for r, _ in diffs if r in controls]
    detail = (f"{len(affected) + len(controls) - len(diffs)}/{len(affected) + len(controls)} equal to the "
              f"{'replayed' if cfg.reference == 'replay' else 'local engine'} reference ({len(affected)} in flight "
              f"around a fault, {len(controls)} controls)")
    for r, ref in diffs[:3]:
        if ref is None:
            detail += f"; {r.request_id}: the reference run failed"
            continue
        k = next((j for j, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), min(len(r.token_ids), len(ref)))
        greedy = "greedy" if r.sampling["temperature"] == 0 else f"seed {r.sampling['seed']}"
        detail += (f"; {r.request_id} ({greedy}) differs from token {k}: got {r.token_ids[k:k + 5]}, "
                   f"want {ref[k:k + 5]}")
    if bad_controls:
        detail += f"; {len(bad_controls)} controls differ too, so the reference itself is not reproducible here"
    return check(not diffs, detail)


def wait_idle(target: Target, timeout_s: float) -> dict:
    """KV blocks back to baseline: every live worker idle with all its blocks free."""
    end = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            last = target.load()
            live = [w for w in last.workers if w.state == "ready"]
            if live and all(w.num_free_blocks == w.num_total_blocks and w.num_running == w.num_waiting == 0
                            for w in live):
                return check(True, f"{len(live)} live workers idle, all KV blocks free "
                                   f"({sum(w.num_total_blocks for w in live)} blocks)")
        except SplitServeError as e:
            last = e
        if time.monotonic() > end:
            break
        time.sleep(0.5)
    if isinstance(last, Exception):
        return check(False, f"GetLoad failed: {last}")
    held = [f"{w.worker_id}: {w.num_total_blocks - w.num_free_blocks} blocks held, {w.num_running} running, "
            f"{w.num_waiting} waiting, {w.num_migrating_out} migrating out" for w in last.workers if w.state == "ready"]
    return check(False, f"not idle after {timeout_s:.0f} s: " + "; ".join(held))


def check_ray(before: dict | None, after: dict | None, live_workers: int) -> tuple[dict, dict]:
    """Back to baseline: nothing holds resources outside the workers' placement groups that did not before (a
    leaked actor or task), and no placement group reserves a share with no live worker in it (a dead worker's
    group that nobody removed). What removed or added workers' groups free or take is expected."""
    if before is None or after is None:
        return (check(None, "skipped: no access to the cluster's GCS (give --ray-address for a running server)"),
                check(None, "skipped"))
    changed = {k: (before["outside"].get(k, 0.0), v) for k, v in after["outside"].items()
               if abs(before["outside"].get(k, 0.0) - v) > 1e-6}
    cpu = f"CPU available {before['available'].get('CPU', 0):g} -> {after['available'].get('CPU', 0):g}"
    plain = check(not changed, f"{cpu}; nothing held outside the workers' placement groups" if not changed else
                  f"{cpu}; held outside placement groups: " +
                  ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items()))
    orphans = after["idle_groups"]
    groups = check(not orphans, f"{len(after['groups'])} placement groups for {live_workers} live workers"
                   + (f"; {len(orphans)} reserve resources with no live worker in them: {', '.join(orphans)}"
                      if orphans else ""))
    return plain, groups


# ---- stalls --------------------------------------------------------------------------------------------------
def stall_around(rec: RequestRecord, at: float, window: float) -> float | None:
    """The longest gap between consecutive chunks of `rec` that ends after `at` and starts before `at + window`
    (the stream's end counts for a request that failed); None when it had no chunk yet or was done by then."""
    if not rec.times or rec.times[0] > at or rec.done_at <= at:
        return None
    times = rec.times + ([rec.done_at] if rec.error else [])
    gaps = [b - a for a, b in zip(times, times[1:]) if b > at and a < at + window]
    return max(gaps) if gaps else None


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def stall_figures(records: list[RequestRecord], faults: list[Fault], window: float) -> tuple[dict, list[dict]]:
    per_fault, by_kind = [], {"kill": [], "drain": []}
    for f in faults:
        if not f.injected:
            continue
        gaps = sorted((g for r in records if (g := stall_around(r, f.at, window)) is not None), reverse=True)
        # a prefill worker's requests have no chunk yet: what it costs them is TTFT, not a gap between chunks
        affected = gaps[: f.held] if f.role != "prefill" else []
        by_kind[f.kind] += affected
        per_fault.append({"kind": f.kind, "worker_id": f.worker_id, "held": f.held, "in_flight": len(gaps),
                          "stall_max_s": round(affected[0], 3) if affected else None,
                          "reprefill_tokens": f.reprefill_tokens})
    quiet = [b - a for r in records for a, b in zip(r.times, r.times[1:])
             if not any(f.at - 1 <= b and a <= f.at + window for f in faults if f.injected)]
    out = {kind: {"faults": sum(1 for p in per_fault if p["kind"] == kind), "affected": len(v),
                  "p50_s": _r(percentile(v, 50)), "p99_s": _r(percentile(v, 99)), "max_s": _r(max(v, default=None)),
                  "reprefill_tokens": _sum_known(p["reprefill_tokens"] for p in per_fault if p["kind"] == kind),
                  "samples_s": sorted(_r(x) for x in v)}
           for kind, v in by_kind.items()}
    out["steady_itl"] = {"gaps": len(quiet), "p50_s": _r(percentile(quiet, 50)), "p99_s": _r(percentile(quiet, 99))}
    return out, per_fault


def _sum_known(values) -> int | None:
    """The sum of the known values; None when none is known (the server has no such counter)."""
    known = [v for v in values if v is not None]
    return int(sum(known)) if known else None


def _r(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 3)


# ---- the run -------------------------------------------------------------------------------------------------
def run_chaos(cfg: ChaosConfig, progress=lambda msg: None) -> dict:
    """One run, or with --rounds N, N runs on fresh servers (seed, seed+1, ...) reported as one: the pool of a
    launched cluster only shrinks (killed workers are not replaced), so more faults need more rounds."""
    rounds = []
    for k in range(cfg.rounds):
        round_cfg = replace(cfg, seed=cfg.seed + k)
        if cfg.rounds > 1:
            progress(f"round {k + 1}/{cfg.rounds}")
        rounds.append(_one_round(round_cfg, progress))
    if len(rounds) == 1:
        return rounds[0][0]
    return merge_rounds(rounds, min(cfg.kill_every_s, 30.0))


def _one_round(cfg: ChaosConfig, progress) -> tuple[dict, list[RequestRecord], list[Fault]]:
    server = None
    if cfg.url:
        target = Target(cfg.url, cfg.grpc, cfg.api_key, ray_address=cfg.ray_address)
    else:
        progress(f"launching splitserve serve {cfg.launch}")
        server = target = LaunchedServer(cfg.launch, cfg.api_key, cfg.log_dir)
    try:
        return _run(cfg, target, server, progress)
    finally:
        if server is not None:
            server.stop()


def _run(cfg: ChaosConfig, target: Target, server: LaunchedServer | None, progress):
    info = target.model_info()
    workers_before = target.workers()
    baseline_kv = wait_idle(target, cfg.idle_timeout_s)
    ray_before = ray_resources(target)
    progress(f"{len(workers_before)} workers; load for {cfg.duration_s:.0f} s, a {cfg.mode} fault every "
             f"{cfg.kill_every_s:.0f} s")
    start = time.monotonic()
    injector = FaultInjector(target, cfg, start)
    injector.start()
    records = run_load(target, cfg, info.vocab_size, start + cfg.duration_s)
    injector.stopping.set()
    while injector.is_alive():         # a drain or a replacement may still be running
        injector.join(0.5)
    faults = injector.faults
    attribute_reprefill(faults, target.counter(REPREFILL_COUNTER))
    progress(f"{len(records)} requests, {sum(1 for f in faults if f.injected)} faults; checking")
    no_fail, seqs, count = check_requests(records, faults, cfg.max_tokens)
    suspects = [r for r in records if r.error is not None or len(r.token_ids) != cfg.max_tokens
                or r.seqs != list(range(1, len(r.seqs) + 1))]
    kv = wait_idle(target, cfg.idle_timeout_s)
    outputs = check_outputs(target, cfg, records, faults)
    kv_after_replay = wait_idle(target, cfg.idle_timeout_s) if cfg.reference == "replay" else kv
    workers_after = target.workers()
    live = sum(1 for w in workers_after if w["alive"])
    ray_plain, ray_groups = check_ray(ray_before, ray_resources(target), live)
    invariants = {"no_failed_requests": no_fail, "sequence_numbers": seqs, "token_counts": count,
                  "outputs_match_reference": outputs,
                  "kv_blocks_baseline": kv if kv_after_replay["ok"] is not False else kv_after_replay,
                  "ray_resources_baseline": ray_plain, "ray_placement_groups_released": ray_groups}
    if not baseline_kv["ok"]:
        invariants["kv_blocks_baseline"]["detail"] += " (not idle before the run either: " + baseline_kv["detail"] + ")"
    stalls, per_fault = stall_figures(records, faults, min(cfg.kill_every_s, 30.0))
    report = {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
              "server": {"url": target.url, "grpc": target.grpc, "model": info.name, "launched": server is not None,
                         "log": server.log_path if server else None, "workers_before": workers_before,
                         "workers_after": workers_after},
              "requests": {"total": len(records), "finished": sum(1 for r in records if r.error is None),
                           "tokens": sum(len(r.token_ids) for r in records)},
              "faults": [_fault_row(f, start, p) for f, p in zip(faults, _align(faults, per_fault))],
              "stalls": stalls, "invariants": invariants,
              "suspect_requests": [timeline(r, faults, start) for r in suspects[:20]]}
    if server is not None:
        progress("stopping the server")
        report["server"]["exit_code"] = server.stop()
        invariants["no_leaked_processes"] = server.leak_check()
    else:
        invariants["no_leaked_processes"] = check(None, "skipped: the server was not launched by this run")
    report["ok"] = all(v["ok"] is not False for v in invariants.values())
    if not report["ok"] and server is not None:
        report["server"]["log_tail"] = server.log_tail(80)
    return report, records, faults


def merge_rounds(rounds: list[tuple[dict, list[RequestRecord], list[Fault]]], window: float) -> dict:
    """Several rounds as one report: stalls over the pooled faults, an invariant holds if it held in every round."""
    reports = [r for r, _, _ in rounds]
    merged = dict(reports[0])
    merged["rounds"] = [{"server": r["server"], "faults": r["faults"], "ok": r["ok"]} for r in reports]
    merged["server"] = dict(reports[0]["server"], log=[r["server"]["log"] for r in reports])
    merged["requests"] = {k: sum(r["requests"][k] for r in reports) for k in reports[0]["requests"]}
    merged["faults"] = [dict(f, round=k + 1) for k, r in enumerate(reports) for f in r["faults"]]
    merged["stalls"], _ = stall_figures([x for _, recs, _ in rounds for x in recs],
                                        [f for _, _, faults in rounds for f in faults], window)
    merged["invariants"] = {}
    for name in reports[0]["invariants"]:
        values = [r["invariants"][name] for r in reports]
        oks = [v["ok"] for v in values]
        merged["invariants"][name] = check(False if False in oks else (None if all(o is None for o in oks) else True),
                                           " | ".join(f"round {k + 1}: {v['detail']}" for k, v in enumerate(values)))
    merged["suspect_requests"] = [s for r in reports for s in r["suspect_requests"]]
    merged["ok"] = all(r["ok"] for r in reports)
    tails = [f"(round {k + 1}) " + r["server"]["log_tail"] for k, r in enumerate(reports)
             if r["server"].get("log_tail")]
    if tails:
        merged["server"]["log_tail"] = "\n".join(tails)
    return merged


def _align(faults: list[Fault], per_fault: list[dict]) -> list[dict | None]:
    it = iter(per_fault)
    return [next(it) if f.injected else None for f in faults]


def _fault_row(f: Fault, start: float, stall: dict | None) -> dict:
    row = {"kind": f.kind, "at_s": round(f.at - start, 2), "worker_id": f.worker_id, "role": f.role, "pid": f.pid,
           "held": f.held}
    if f.report is not None:
        row.update(migrated=f.report.get("migrated"), recomputed=f.report.get("recomputed"),
                   drain_seconds=f.report.get("seconds"))
    if stall:
        row.update(in_flight=stall["in_flight"], stall_max_s=stall["stall_max_s"])
    if f.reprefill_tokens is not None:
        row["reprefill_tokens"] = int(f.reprefill_tokens)
    if f.replaced_by:
        row["replaced_by"] = f.replaced_by
    if f.skipped:
        row["skipped"] = f.skipped
    if f.error:
        row["error"] = f.error
    return row


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)

