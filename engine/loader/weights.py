"""Load an HF directory's safetensors (memory-mapped) as a name -> tensor mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


def iter_safetensors(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); re-create the model cache "
                             "(delete the directory and run again)") from None
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).to(dtype)
