"""Capping prompt tokens in steps that also decode changes when prompts are computed, never the tokens."""

from __future__ import annotations

import dataclasses

from splitserve.engine.sampling_params import SamplingParams

TEXTS = ["Name a fruit.", "Write a short poem about autumn leaves falling on a quiet street.",
         "Explain in detail how a bicycle's gears let a rider climb a steep hill with less effort."]


def test_capped_prompt_chunks_give_the_same_tokens(engine_f32):
    prompts = [engine_f32.encode_prompt(t, chat=True) for t in TEXTS]
    params = SamplingParams(max_tokens=10)
    sched = engine_f32.scheduler
    old_config, old_schedule = sched.config, sched.schedule
    mixed: list[int] = []          # prompt tokens of each step that also decoded

    def schedule():
        batch = old_schedule()
        decodes = sum(seq.num_output_tokens > 0 for seq in batch.seqs)
        if decodes:
            mixed.append(batch.num_tokens - decodes)
        return batch

    try:
        sched.config = dataclasses.replace(old_config, max_num_batched_tokens=48)
        free = engine_f32.block_manager.num_free_blocks
        uncapped = [o.token_ids for o in engine_f32.generate(prompts, params)]
        sched.config = dataclasses.replace(old_config, max_num_batched_tokens=48, max_prefill_tokens_with_decodes=5)
        sched.schedule = schedule
        capped = [o.token_ids for o in engine_f32.generate(prompts, params)]
    finally:
        sched.config = old_config
        del sched.schedule
    assert capped == uncapped
    assert mixed and max(mixed) <= 5          # prompts were computed beside decodes, 5 tokens at a time at most
    assert engine_f32.block_manager.num_free_blocks == free
