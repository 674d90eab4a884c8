"""The page-stream framing on a pair link: a fixed-size header frame, then the pages of each announced run.

    [u16 little-endian length][KVPageHeader protobuf][zero padding]   (uint8 tensor on the KV device)
    run 0  run 1 ...         (one raw [count, 2, block_size, heads, head_dim] tensor each, K and V of a page
                              side by side as in the KV cache's storage; sizes from the header)

A fixed size lets the receiver post the header receive before knowing anything, and the header lists every
payload of the batch, so the receiver posts all their receives at once: the transport never waits for it
(Gloo's TCP pairs move a message only once its receive is posted). Even pages of a transfer the receiver gave
up on are received (and dropped), keeping the stream in step. NCCL needs device tensors, hence the frame lives
on the KV tensor's device.

On Gloo a batch's pages also wait for a clear-to-send (CTS): the receiver posts every receive the header
announces, then sends one small frame back (tag CTS_TAG), and only then does the sender post the page sends. A
Gloo send posted before its receive is written later by the pair's event loop, and the receive posts then
contend with the incoming bytes for the pair's lock (a post was seen to take 4.5 ms). The CTS costs one small
round trip per batch. NCCL has neither effect, so NCCL pairs send without one.
"""

from __future__ import annotations

import torch

from splitserve.proto.v1 import kv_transfer_pb2 as pb

HEADER_BYTES = 4096
CTS_TAG = 1            # the receiver's clear-to-send frames, rank 1 -> rank 0 (pages and headers use tag 0)
MAX_RUNS = 64          # runs per header; fewer when long request ids fill the frame (see run_size_bound)


def run_size_bound(request_id: str) -> int:
    """Upper bound of one KVPageRun's encoded size inside a header (request id + six varints + framing)."""
    return len(request_id.encode()) + 48


def batch_fits(total_run_bound: int) -> bool:
    return total_run_bound + 8 <= HEADER_BYTES - 2


def encode_header(header: pb.KVPageHeader, device: torch.device) -> torch.Tensor:
    body = header.SerializeToString()
    if len(body) > HEADER_BYTES - 2:
        raise ValueError(f"KVPageHeader of {len(body)} bytes does not fit the {HEADER_BYTES}-byte frame")
    frame = bytearray(HEADER_BYTES)
    frame[0:2] = len(body).to_bytes(2, "little")
    frame[2:2 + len(body)] = body
    return torch.frombuffer(frame, dtype=torch.uint8).to(device)


def decode_header(frame: torch.Tensor) -> pb.KVPageHeader:
    raw = frame.cpu().numpy().tobytes()
    n = int.from_bytes(raw[0:2], "little")
    if n > HEADER_BYTES - 2:
        raise ValueError(f"corrupt KV page header frame (length {n})")
    return pb.KVPageHeader.FromString(raw[2:2 + n])


def uses_cts(device: torch.device) -> bool:
    """Gloo pairs (CPU KV) gate a batch's pages on a clear-to-send; NCCL pairs do not."""
    return device.type != "cuda"


def cts_frame(device: torch.device) -> torch.Tensor:
    return torch.zeros(8, dtype=torch.uint8, device=device)


def empty_header(device: torch.device) -> torch.Tensor:
    return torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
