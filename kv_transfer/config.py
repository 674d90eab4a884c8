"""The one config object of the kv_transfer role; each backend copies the fields it needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class KVTransferConfig:
    backend: str = "torch_dist"          # a name from `available_backends()`: torch_dist | local | fake
    worker_id: str = "worker-0"          # this worker (all its TP ranks share it); part of pair-link names
    model_id: str = ""                   # identifies the weights; part of the handshake fingerprint
    store_host: str = "127.0.0.1"        # rendezvous TCPStore (hosted by the router); torch_dist only
    store_port: int = 0
    timeout_s: float = 30.0              # default deadline of one transfer, and the sender's lease
    connect_timeout_s: float = 10.0      # store connection and pair-group formation
    poll_interval_s: float = 0.05        # safety-net check of a handshake key; peers ring a doorbell when they write one
    fake_failure_probability: float = 0.0  # fake backend: chance that a transfer ends FAILED
    fake_seed: int = 0

    def __post_init__(self) -> None:
        from .messages import _check_name

        _check_name("KVTransferConfig.worker_id", self.worker_id)
        if not self.backend:
            raise ValueError("KVTransferConfig.backend must name a backend")
        for name in ("timeout_s", "connect_timeout_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"KVTransferConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.fake_failure_probability <= 1.0:
            raise ValueError(
                f"KVTransferConfig.fake_failure_probability must be in [0, 1], got {self.fake_failure_probability}")
        if not 0 <= self.store_port < 65536:
            raise ValueError(f"KVTransferConfig.store_port must be a TCP port, got {self.store_port}")
