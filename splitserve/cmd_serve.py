"""`splitserve serve`: the router, a prefill pool and a decode pool on a Ray cluster (embedded by default),
behind OpenAI-compatible HTTP and the gRPC API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("splitserve.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model: router + prefill and decode workers on Ray")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--colocated", action="store_true", help="every worker does both phases (the baseline)")
    p.add_argument("--embedded", action="store_true", help="one in-process engine, no Ray (smallest footprint)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--api-key", default=None, help="require this key on every route and RPC (except health)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--redis-url", default=None, help="journal in Redis (cluster mode); default in-process")
    p.add_argument("--local-prefill-threshold", type=int, default=32,
                   help="uncached prompt tokens under which the decode worker prefills itself")
    p.add_argument("--local-prefill-backlog-ms", type=float, default=None, metavar="MS",
                   help="conditional disaggregation: once the prefill workers have at least MS of prompts queued, a "
                        "decode worker with no prompt of its own in progress prefills a new request itself when that "
                        "is sooner (one at a time per decode worker; off by default)")
    p.add_argument("--ttft-slo-ms", type=float, default=None,
                   help="admission control: hold, then refuse (429), requests that would miss this time to first token")
    p.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="admission control: hold, then refuse, requests that would push time per output token past this")
    p.add_argument("--max-queue-ms", type=float, default=None,
                   help="how long a request may wait for admission before it is refused (default: the TTFT target)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="per tensor-parallel rank")
    p.add_argument("--prefill-tp", type=int, default=0, help="TP ranks per prefill worker (default: --tp)")
    p.add_argument("--decode-tp", type=int, default=0, help="TP ranks per decode worker (default: --tp)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens one engine step may compute (the chunked-prefill budget, default 512). A request "
                        "recovered after a worker died waits for the prefill step in progress, so on CPU, where a "
                        "512-token step takes seconds, 128-256 keeps recovery stalls short")
    p.add_argument("--max-prefill-tokens-with-decodes", type=int, default=0, metavar="N",
                   help="prompt tokens a step may compute while the worker also decodes (decode workers' own "
                        "prompts, colocated workers); smaller keeps inter-token stalls short, larger prefills "
                        "sooner. 0 (default) = up to --max-num-batched-tokens")
    p.add_argument("--kv-transfer", default="torch_dist", choices=["torch_dist", "local", "fake"])
    p.add_argument("--drain-deadline", type=float, default=30.0)
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds a worker may take to answer a heartbeat before it is declared lost and replaced "
                        "(a dead actor or node is noticed through Ray at once; this catches hung ones)")
    p.add_argument("--preemption-watcher", default="none", choices=["none", "aws", "gcp", "azure"])
    p.add_argument("--log-level", default="info")
    from splitserve.cli import add_engine_args

    add_engine_args(p)
    p.set_defaults(run=run)


def _api_key(args) -> str | None:
    from splitserve.settings import settings

    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or settings.api_key


def engine_config_from(args):
    from splitserve.engine.config import EngineConfig, parse_layer_range

    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, tp=args.tp,
                        layer_parallel=parse_layer_range(args.layer_parallel), max_model_len=args.max_model_len,
                        kv_cache_memory_gb=args.kv_cache_gb, attention_backend=args.attention_backend,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from splitserve.router.frontends import FrontendOptions

    options = FrontendOptions(http_host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              api_key=_api_key(args), tls_cert=args.tls_cert, tls_key=args.tls_key)
    config = engine_config_from(args)
    if args.embedded and (args.ttft_slo_ms or args.tpot_slo_ms):
        raise ValueError("--ttft-slo-ms / --tpot-slo-ms need the cluster router; drop --embedded")
    admission_config(args)      # bad targets fail here, before anything starts
    backlog_s(args)
    if not args.heartbeat_timeout > 0:
        raise ValueError(f"--heartbeat-timeout must be > 0 seconds, got {args.heartbeat_timeout}")
    code = asyncio.run(_serve(args, config, options))
    from splitserve.cluster.ray_cluster import start_steps_running

    if start_steps_running():   # a start-up step that Ctrl-C abandoned (e.g. loading the model): do not wait
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class _Signals:
    """SIGINT/SIGTERM, handled from the first moment (start-up included): the first stops the server after a
    drain, a second one cuts the drain short."""

    def __init__(self) -> None:
        self.stop, self.hurry, self.count = asyncio.Event(), asyncio.Event(), 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received)

    def _received(self) -> None:
        self.count += 1
        (self.stop if self.count == 1 else self.hurry).set()


async def _serve(args, config, options) -> int:
    from splitserve.router.frontends import Frontends

    signals = _Signals()
    started = _Started()
    starting = asyncio.create_task(_embedded(config) if args.embedded else _cluster(args, config, started))
    interrupted = asyncio.create_task(signals.stop.wait())
    await asyncio.wait({starting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    interrupted.cancel()
    if not starting.done():
        print("splitserve: interrupted during start-up; removing what was started ...", file=sys.stderr, flush=True)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await started.abort()
        return 0
    try:
        service, cleanup = starting.result()
    except BaseException:       # e.g. a worker failed to load: the others must not stay behind on the cluster
        await started.abort()
        raise
    frontends = Frontends(service, options)
    try:
        await frontends.start()
        print(f"splitserve: serving {service.model_name} on http://{options.http_host}:{frontends.http_port} "
              f"(OpenAI API) and gRPC port {frontends.grpc_port}; Ctrl-C drains and stops", file=sys.stderr, flush=True)
        await signals.stop.wait()
        print("splitserve: draining in-flight requests (Ctrl-C again to skip) ...", file=sys.stderr, flush=True)
        await _drain(service, args.drain_deadline, signals.hurry)
    finally:
        await frontends.stop()
        await cleanup()
    return 0


async def _drain(service, deadline: float, hurry: asyncio.Event) -> None:
    """Wait for in-flight requests to finish (new ones are refused meanwhile), up to `deadline` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end and not hurry.is_set():
        load = service.load()
        if load.num_running == 0 and load.num_waiting == 0 and not getattr(service, "requests", None):
            return
        await asyncio.sleep(0.2)


class _Started:
    """What `_cluster` has started so far, so that a Ctrl-C (or a failure) in the middle of start-up removes
    exactly that: the worker actors, their placement groups (pending ones too), and this driver's connection
    to Ray. A joined cluster (`--address`) is only disconnected from, never stopped."""

    def __init__(self) -> None:
        self.pools = None

    async def abort(self, wait_s: float = 30.0) -> None:
        if "ray" not in sys.modules:
            return
        from splitserve.cluster.ray_cluster import ray_steps_running, release_workers, stop_ray

        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        # A start-up step may still be running in its thread (connecting, creating workers one by one): keep
        # removing what exists until it has noticed and given up, then disconnect.
        while True:
            if self.pools is not None:
                await asyncio.to_thread(release_workers, self.pools.all())
            if not ray_steps_running() or loop.time() > end:
                break
            await asyncio.sleep(0.5)
        stop_ray()


async def _embedded(config):
    from splitserve.cluster.ray_cluster import in_daemon_thread
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.router.engine_service import EngineService

    engine = await in_daemon_thread(LLMEngine, config)
    service = EngineService(engine)
    return service, service.close


async def _cluster(args, config, started: _Started):
    from splitserve.cluster.ray_cluster import enable_token_auth

    enable_token_auth(args.address)
    import ray
    import torch.distributed as dist

    from splitserve.cluster.pools import PoolConfig, WorkerPools
    from splitserve.cluster.ray_cluster import in_daemon_thread, release_workers, start_ray, stop_ray
    from splitserve.engine.config import resolve_dtype
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.engine.model_config import ModelConfig
    from splitserve.engine.tokenizer import Tokenizer
    from splitserve.router.router import Router, RouterConfig
    from splitserve.router.service import ModelInfo

    from splitserve.router.journal import JournalError, open_journal
    from splitserve.settings import settings

    # before Ray starts: a Redis that is down fails here within seconds, with the URL in the message
    try:
        journal = await asyncio.to_thread(open_journal, args.redis_url or settings.redis_url, RouterConfig().log_ttl_s)
    except JournalError as e:
        raise ValueError(str(e)) from None
    pool_config = PoolConfig(num_prefill=args.prefill_workers, num_decode=args.decode_workers,
                             cpus_per_worker=args.cpus_per_worker, colocated=args.colocated, kv_backend=args.kv_transfer,
                             prefill_tp=args.prefill_tp, decode_tp=args.decode_tp)
    model_dir = await in_daemon_thread(prepare_model, config.model, config.cache_dir, True)
    tokenizer = Tokenizer(model_dir)
    model_config = ModelConfig.from_dir(model_dir)
    n_workers = pool_config.num_decode + (0 if args.colocated else pool_config.num_prefill)
    ranks = pool_config.num_decode * (pool_config.decode_tp or config.tp) + (
        0 if args.colocated else pool_config.num_prefill * (pool_config.prefill_tp or config.tp))
    num_cpus = max(2, int(ranks * args.cpus_per_worker + 1))
    if args.address is None:   # a local cluster's GCS and raylet get SIGKILLed when the thread that started them
        await asyncio.to_thread(start_ray, None, num_cpus)   # exits (Ray sets PR_SET_PDEATHSIG): a pool thread stays
    else:
        await in_daemon_thread(start_ray, args.address, num_cpus, uses_ray=True)
    host = "127.0.0.1" if args.address is None else ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)   # the KV-transfer rendezvous
    pools = WorkerPools(config, pool_config, host, store.port)
    pools.rendezvous = store          # the store lives as long as the pools do
    started.pools = pools
    print(f"splitserve: starting {n_workers} workers on Ray ...", file=sys.stderr, flush=True)
    await in_daemon_thread(pools.start, uses_ray=True)
    first = next(iter(pools.decode.values()))
    ready = await first.actor.ready.remote()
    max_len = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
    name = Path(config.model).stem if config.model and Path(config.model).is_file() else (
        Path(config.model).name if config.model else default_model_name_of_package())
    info = ModelInfo(name=name, max_model_len=max_len, vocab_size=model_config.vocab_size,
                     dtype=resolve_dtype(config.dtype, config.device), block_size=config.block_size,
                     fingerprint=ready["fingerprint"])
    eos = set(model_config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    router = Router(pools, tokenizer, info, RouterConfig(local_prefill_threshold=args.local_prefill_threshold,
                                                         local_prefill_backlog_s=backlog_s(args),
                                                         colocated=args.colocated, admission=admission_config(args),
                                                         heartbeat_timeout_s=args.heartbeat_timeout),
                    eos_token_ids=tuple(eos), journal=journal)
    await router.start()

    async def cleanup() -> None:
        try:
            await router.close()
            await asyncio.to_thread(pools.shutdown)
        finally:   # and what the pools do not list: the placement group of a replacement still waiting for room
            await asyncio.to_thread(release_workers, pools.all())
            stop_ray()

    return router, cleanup


def admission_config(args):
    from splitserve.router.admission import AdmissionConfig

    ms = lambda v: None if v is None else v / 1000.0   # noqa: E731
    return AdmissionConfig(ttft_s=ms(args.ttft_slo_ms), tpot_s=ms(args.tpot_slo_ms), max_queue_s=ms(args.max_queue_ms))


def backlog_s(args) -> float | None:
    ms = args.local_prefill_backlog_ms
    if ms is None:
        return None
    if not ms >= 0:
        raise ValueError(f"--local-prefill-backlog-ms must be >= 0 milliseconds, got {ms:g}")
    if args.colocated or args.embedded:
        raise ValueError("--local-prefill-backlog-ms needs separate prefill and decode pools; drop --colocated/--embedded")
    return ms / 1000.0


def default_model_name_of_package() -> str:
    from splitserve.engine.loader.resolve import packaged_model_path

    return packaged_model_path().stem
