"""Moving KV-cache pages between workers: prefill -> decode, and decode -> decode on drain.

A narrow, polled interface split by role (see base.py for the lifecycle drawing):

    backend = create_backend(KVTransferConfig(backend="torch_dist", worker_id=..., store_port=...), pool)
    backend.register_kv_cache(kv_cache, layout)          # the model runner's tensor
    rx = backend.create_receiver(spec, cached_block_ids)  # decode side: allocates, asks for what it lacks
    tx = backend.create_sender(spec, src_block_ids)       # prefill side: pins its blocks until DONE/FAILED
    tx.layer_ready(layer, tokens_ready)                   # after each layer's forward wrote its KV
    rx.poll() / tx.poll() -> TransferStatus               # from the step loop; never blocks

Transports (registered by name): `torch_dist` (pair process groups; NCCL on CUDA, Gloo on CPU), `local`
(same process, tensor to tensor), `fake` (no bytes; instant success or seeded failure).
"""

from .base import KVReceiver, KVSender, KVTransferBackend
from .block_pool import BlockPool, BlockPoolExhausted, SimpleBlockPool
from .config import KVTransferConfig
from .layer_hook import LayerStreamer
from .messages import KVTransferError, TransferSpec, TransferStatus, WorkerSpec
from .registry import available_backends, create_backend, register_backend
from .reshard import HeadPull, plan_pulls

__all__ = [
    "BlockPool", "BlockPoolExhausted", "HeadPull", "KVReceiver", "KVSender", "KVTransferBackend",
    "KVTransferConfig", "KVTransferError", "LayerStreamer", "SimpleBlockPool", "TransferSpec", "TransferStatus",
    "WorkerSpec", "available_backends", "create_backend", "plan_pulls", "register_backend",
]
