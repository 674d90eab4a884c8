"""Start an embedded local Ray cluster, or join one, with token authentication; and leave it again without a
trace: this driver's worker actors killed and its placement groups (pending ones too) removed, also when
start-up is interrupted half-way."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets

log = logging.getLogger(__name__)


def enable_token_auth(address: str | None, auth_token: str | None = None) -> None:
    """Turn on Ray's token authentication for a local cluster we start (a fresh random token). Must run before
    the first `import ray` in this process: Ray reads the mode when it is imported, and hands both variables on
    to every process it starts. Joining a cluster (`address`) uses that cluster's token, read by Ray itself
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if address is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = auth_token or secrets.token_hex(32)
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


# Ray starts a local cluster's daemons (GCS, raylet, ...) with PR_SET_PDEATHSIG: they are SIGKILLed when the
# *thread* that started them ends. So `ray.init` runs on this one thread, which lasts as long as the process,
# whichever (short-lived) thread calls `start_ray`.
_RAY_INIT_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitserve-ray-init")


def start_ray(address: str | None, num_cpus: int | None = None) -> dict:
    """`address=None` starts a private local cluster; otherwise joins `address`."""
    return _RAY_INIT_THREAD.submit(_start_ray, address, num_cpus).result()


def _start_ray(address: str | None, num_cpus: int | None) -> dict:
    import ray

    if ray.is_initialized():
        return {"gcs_address": ray.get_runtime_context().gcs_address}
    local = {"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1"} if address is None else {}
    info = ray.init(address=address, **local, include_dashboard=False,
                    log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    log.info("ray cluster at %s", info.address_info.get("gcs_address"))
    return info.address_info


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def own_placement_groups() -> list:
    """Placement groups this driver created that Ray has not removed yet, pending ones included (a worker that
    is still waiting for room). A placement group id ends with the id of the job that created it."""
    import ray
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    return [PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)) for pg_id, info in
            ray.util.placement_group_table().items() if pg_id.endswith(job) and info["state"] != "REMOVED"]


def release_workers(handles) -> None:
    """Kill these worker actors at once (no graceful shutdown: they may still be loading their model) and
    remove every placement group of this driver. Safe to repeat, and safe while another thread is still
    creating workers: its wait for a removed placement group or a killed actor fails instead of hanging."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for handle in handles:
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception as e:   # already dead
            log.debug("killing %s: %s", getattr(handle, "worker_id", handle), e)
    for pg in own_placement_groups():
        try:
            remove_placement_group(pg)
        except Exception as e:   # removed meanwhile
            log.debug("placement group %s: %s", pg.id.hex(), e)


THREAD_PREFIX = "splitserve-start:"


async def in_daemon_thread(fn, *args, uses_ray: bool = False):
    """`asyncio.to_thread` for start-up steps that Ctrl-C may abandon: the thread is a daemon, so one still
    blocked in Ray (waiting for a worker that will never be placed) cannot keep the process from exiting.
    `uses_ray` marks steps that must end before this process disconnects from Ray (see `ray_steps_running`)."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():           # the awaiting coroutine was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:        # the loop is closed: nobody is waiting any more
            pass

    name = THREAD_PREFIX + ("ray:" if uses_ray else "") + getattr(fn, "__qualname__", "step")
    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def ray_steps_running() -> list[str]:
    """Names of `in_daemon_thread(..., uses_ray=True)` steps still running (abandoned by a Ctrl-C)."""
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX + "ray:") and t.is_alive()]


def start_steps_running() -> bool:
    """Whether any `in_daemon_thread` step is still running (then the process must not wait for it at exit)."""
    import threading

    return any(t.name.startswith(THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())
