"""Start an embedded local Ray cluster, or join one, with token authentication."""

from __future__ import annotations

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


def start_ray(address: str | None, num_cpus: int | None = None) -> dict:
    """`address=None` starts a private local cluster; otherwise joins `address`."""
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
