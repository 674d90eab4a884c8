"""Native CPU kernels, compiled on first use with torch's C++ extension builder:

  attention/cpu_decode.cpp  paged_decode: decode attention read straight from the KV pages (float32, bfloat16);
                            rope_store_decode: rotary + KV-cache store + paged_decode in one call
  attention/cpu_rope.cpp    rope_store: the rotary embedding and KV-cache store of any step's new tokens
  attention/cpu_decode_amx.cpp  paged_decode's bfloat16 path on AMX tiles, where the CPU has them
  attention/cpu_vec.h       AVX-512 helpers both attention files share (exp, bfloat16 rounding)
  models/cpu_layers.cpp     rms_norm, add_rms_norm, silu_mul: fused bfloat16 elementwise layers;
                            argmax_rows: greedy sampling's argmax (float32, bfloat16)
  models/cpu_layers_f32.cpp rms_norm_f32 (+ residual add), silu_mul_f32: float32 layers, bit-identical to ATen's

`native_ops()` returns the `torch.ops.splitserve_cpu` namespace, or None when no C++ compiler is available or the
build fails; callers then keep their pure-torch path. The build (~30-60 s, once per machine, torch version and
source version) lands in `<cache_dir>/kernels/`; later processes only load the shared library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from splitserve.settings import settings

log = logging.getLogger(__name__)
_ENGINE = Path(__file__).resolve().parent.parent
SOURCES = (_ENGINE / "attention" / "cpu_decode.cpp", _ENGINE / "attention" / "cpu_decode_amx.cpp",
           _ENGINE / "attention" / "cpu_rope.cpp", _ENGINE / "models" / "cpu_layers.cpp",
           _ENGINE / "models" / "cpu_layers_f32.cpp")
HEADERS = (_ENGINE / "attention" / "cpu_vec.h",)      # part of the cache key, not compiled on their own
# -ffp-contract=off: no implicit fused multiply-adds, so the float32 rotary rounds exactly as ATen's (and HF's)
# separate multiplies and add; where the kernels want an FMA they ask for it with an intrinsic
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def native_ops():
    """torch.ops.splitserve_cpu (the ops listed above), or None when it cannot be built here."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"] = _build()
    return _state["ops"]


def paged_decode_op():
    ops = native_ops()
    return None if ops is None else ops.paged_decode


def _build():
    if hasattr(torch.ops.splitserve_cpu, "rope_store"):
        return torch.ops.splitserve_cpu
    try:
        key = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode() \
            + torch.backends.cpu.get_cpu_capability().encode() + " ".join(CFLAGS).encode()
        name = f"splitserve_cpu_{hashlib.blake2b(key, digest_size=6).hexdigest()}"
        library = Path(settings.cache_dir) / "kernels" / f"{name}.so"
        if not library.exists():
            _compile(name, library)             # builds and loads it
        if not hasattr(torch.ops.splitserve_cpu, "rope_store"):
            torch.ops.load_library(str(library))
    except Exception as e:  # noqa: BLE001 - a failed build means "use the torch paths", never a crash
        log.warning("could not build the native CPU kernels (%s); using the torch paths", e)
        return None
    return torch.ops.splitserve_cpu


def _compile(name: str, library: Path) -> None:
    """Build in a directory of this process's own, then move the library into place atomically: processes that
    build at the same time never wait on each other's lock (a build killed half way would leave it held)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler")
    from torch.utils.cpp_extension import load

    build_dir = library.parent / f"{name}.build-{os.getpid()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        # -march=native: the library is built on, and only loaded by, this machine (the name holds the CPU's
        # capability level); -fopenmp: at::parallel_for uses torch's OpenMP runtime (the same libgomp.so.1)
        load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(build_dir),
             extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        os.replace(build_dir / f"{name}.so", library)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
