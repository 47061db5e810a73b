"""A KV cache that appends a decoded token in place instead of copying the whole cache.

    cache = launch.kv_cache.new_cache(model.config)     # instead of DynamicCache(config=...)

transformers' DynamicLayer appends with `torch.cat`, i.e. every decoded token copies every
layer's whole cache into a freshly allocated tensor. For Qwen-7B (32 key/value heads) at 4096
cached tokens that is 32 MB per tensor, 10.7 ms per key or value tensor per layer on this machine
(a fresh allocation each time, so also page faults), ~0.68 s per token over 32 layers, more than
the int8 weights take; writing one slot takes 5 us. Here each layer keeps a buffer with room
for `STEP` more tokens and hands out views of its filled part; a full buffer is grown by
copying once per `STEP` tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

# Spare room a buffer gets when it is (re)allocated: STEP tokens or an eighth of the cache,
# whichever is more, so a long context is copied every 1/8 of its length (amortised), and at most
# that much memory is unused.
STEP = 256


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class GrowingLayer(DynamicLayer):
    """DynamicLayer whose keys and values are views of buffers with spare room.

    For inference (it writes in place, which autograd would refuse). Views handed out earlier
    stay valid as tokens are appended; after `crop`, the next tokens overwrite the cropped slots,
    so a view taken before a crop shows them."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buffer = _append(self.keys, key_states, self._key_buffer)
        self.values, self._value_buffer = _append(self.values, value_states, self._value_buffer)
        return self.keys, self.values


def _append(cached: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached followed by new along dim -2, the buffer that holds it)."""
    length = cached.shape[-2] if cached.numel() else 0
    needed = length + new.shape[-2]
    # `cached` is the view handed out last time, or what reset / crop / batch_select_indices
    # (transformers' own methods) left in its place: reuse the buffer only if it still holds it.
    ours = buffer is not None and length > 0 and cached.data_ptr() == buffer.data_ptr() and cached.shape[:-2] == buffer.shape[:-2]
    if not ours or needed > buffer.shape[-2]:
        grown = new.new_empty(*new.shape[:-2], needed + max(STEP, needed // 8), new.shape[-1])
        if length:
            grown[..., :length, :] = cached
        buffer = grown
    buffer[..., length:needed, :] = new
    return buffer[..., :needed, :], buffer
