"""`splitserve generate PROMPT`: one completion from a local engine, printed (or as JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt on this machine")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and token ids")
    from splitserve.cli import add_engine_args

    add_engine_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineConfig, parse_layer_range
    from splitserve.engine.sampling_params import SamplingParams

    if not args.prompt:
        raise ValueError("prompt is empty: send a non-empty string")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, tp=args.tp,
                          layer_parallel=parse_layer_range(args.layer_parallel), max_model_len=args.max_model_len,
                          kv_cache_memory_gb=args.kv_cache_gb, attention_backend=args.attention_backend,
                          max_num_seqs=1)
    engine = build_engine(config)
    prompt = engine.encode_prompt(args.prompt, chat=args.chat)
    engine.scheduler.check_fits(len(prompt), params.max_tokens)
    [out] = engine.generate([prompt], params)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": prompt,
                          "finish_reason": out.finish_reason, "seed": out.seed,
                          "dtype": str(engine.runner.dtype).removeprefix("torch.")}))
    else:
        sys.stdout.write(out.text + "\n")
    return 0


def build_engine(config):
    """A local engine; with --tp N > 1 its ranks run as processes in one Gloo/NCCL group."""
    from splitserve.engine.llm_engine import LLMEngine

    if config.tp > 1:
        from splitserve.engine.tp_engine import TPEngine

        return TPEngine(config)
    return LLMEngine(config)
