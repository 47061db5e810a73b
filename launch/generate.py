"""Token generation for one request: a prefill, then one token at a time on a KV cache.

Kept small on purpose (after gpt-fast): this loop is where decode time goes, and the
worker wraps it with text, stop strings and FastChat's protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from launch.kv_cache import new_cache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 1.0  # below 1e-5: greedy
    top_p: float = 1.0
    top_k: int = -1  # 0 or less: off
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    seed: int | None = None


@torch.inference_mode()
def generate(model: PreTrainedModel, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Yield new token ids; the last one is a stop token unless max_new_tokens ran out."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = new_cache(model.config)  # appends in place (launch/kv_cache.py)
    history = torch.tensor(prompt_ids, dtype=torch.long)
    logits = model(input_ids=history[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    for step in range(sampling.max_new_tokens):
        token = sample(logits, history, sampling, generator)
        yield token
        if token in sampling.stop_token_ids or step == sampling.max_new_tokens - 1:
            return
        history = torch.cat([history, torch.tensor([token])])
        logits = model(input_ids=history[None, -1:], past_key_values=cache, use_cache=True).logits[0, -1]


def sample(logits: torch.Tensor, history: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        # CTRL-style, as transformers' RepetitionPenaltyLogitsProcessor: make seen tokens less likely.
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
    if s.temperature < 1e-5:
        return int(logits.argmax())
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the ones before it already cover top_p; the first always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
