"""The architecture of a Llama-family model, read from an HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "model") -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "Llama" not in arch:
            raise ValueError(f"unsupported architecture {arch!r} (model_type={cfg.get('model_type')!r}): "
                             "splitserve serves Llama-family decoders")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        cfg_file = Path(path) / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except FileNotFoundError:
            raise ValueError(f"{cfg_file} is missing: a model directory needs config.json + *.safetensors") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}); re-create the model directory") from None
        return cls.from_hf_dict(cfg, name=cfg.get("_name_or_path") or Path(path).name)

    def to_dict(self) -> dict:
        return asdict(self)
