"""Backends registered by name; imported lazily so `fake` needs no torch.distributed."""

from __future__ import annotations

import importlib
from typing import Callable

from .base import KVTransferBackend
from .block_pool import BlockPool
from .config import KVTransferConfig

BackendFactory = Callable[[KVTransferConfig, BlockPool], KVTransferBackend]

_BACKENDS: dict[str, str | BackendFactory] = {
    "torch_dist": "splitserve.kv_transfer.torch_dist:TorchDistBackend",
    "local": "splitserve.kv_transfer.local:LocalBackend",
    "fake": "splitserve.kv_transfer.fake:FakeBackend",
}


def register_backend(name: str, factory: str | BackendFactory) -> None:
    """Add a transport: a factory, or "module:Class" to import on first use."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(config: KVTransferConfig, pool: BlockPool) -> KVTransferBackend:
    try:
        factory = _BACKENDS[config.backend]
    except KeyError:
        raise ValueError(f"KVTransferConfig.backend {config.backend!r} is not one of {available_backends()}") from None
    if isinstance(factory, str):
        module, _, cls = factory.partition(":")
        factory = getattr(importlib.import_module(module), cls)
    return factory(config, pool)
