"""launch.kv_cache: the same keys and values as transformers' DynamicCache, without a copy per token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from launch import kv_cache
from launch.generate import Sampling, generate


def _states(g: torch.Generator, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 2, tokens, 8, generator=g), torch.randn(1, 2, tokens, 8, generator=g)


def test_appends_like_torch_cat_across_growth():
    g = torch.Generator().manual_seed(0)
    layer, ref = kv_cache.GrowingLayer(), kv_cache.DynamicLayer()
    for tokens in [37] + [1] * (kv_cache.STEP + 5) + [300, 1, 1]:
        k, v = _states(g, tokens)
        got, want = layer.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert layer.get_seq_length() == ref.get_seq_length() == 37 + kv_cache.STEP + 5 + 302


def test_a_decoded_token_is_written_in_place():
    """The point of the module: within a buffer's room no new tensor is allocated (torch.cat's
    DynamicLayer allocates, and copies, the whole cache for every token)."""
    g = torch.Generator().manual_seed(1)
    layer = kv_cache.GrowingLayer()
    keys, _ = layer.update(*_states(g, 10))
    first = keys.data_ptr()
    for _ in range(kv_cache.STEP):
        keys, _ = layer.update(*_states(g, 1))
        assert keys.data_ptr() == first
    keys, _ = layer.update(*_states(g, 1))  # the room is used up: grown once
    assert keys.data_ptr() != first and keys.shape[-2] == 10 + kv_cache.STEP + 1


def test_crop_reset_and_batch_select_still_work():
    g = torch.Generator().manual_seed(2)
    layer, ref = kv_cache.GrowingLayer(), kv_cache.DynamicLayer()
    for step in range(3):
        k, v = _states(g, 20)
        layer.update(k, v), ref.update(k, v)
    layer.crop(-7), ref.crop(-7)
    k, v = _states(g, 3)
    assert torch.equal(layer.update(k, v)[0], ref.update(k, v)[0])
    layer.batch_select_indices(torch.tensor([0])), ref.batch_select_indices(torch.tensor([0]))
    k, v = _states(g, 1)
    assert torch.equal(layer.update(k, v)[1], ref.update(k, v)[1])
    layer.reset(), ref.reset()
    k, v = _states(g, 4)
    assert torch.equal(layer.update(k, v)[0], ref.update(k, v)[0]) and layer.get_seq_length() == 4


@pytest.mark.parametrize("kind", ["qwen2", "glm", "llama"])
def test_generation_is_unchanged(kind, monkeypatch):
    extra = dict(head_dim=16, attention_bias=True, pad_token_id=0, eos_token_id=1) if kind == "glm" else {}
    config = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=256, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert all(type(layer) is kv_cache.GrowingLayer for layer in kv_cache.new_cache(model.config).layers)
    monkeypatch.setattr(kv_cache, "STEP", 8)  # grow several times within the answer
    greedy = Sampling(max_new_tokens=40, temperature=0)
    prompt = list(range(3, 30))
    got = list(generate(model, prompt, greedy))
    monkeypatch.setattr("launch.generate.new_cache", lambda config: DynamicCache(config=config))
    assert got == list(generate(model, prompt, greedy))


def test_views_handed_out_earlier_stay_valid():
    g = torch.Generator().manual_seed(5)
    layer = kv_cache.GrowingLayer()
    keys, _ = layer.update(*_states(g, 12))
    kept = keys.clone()
    for _ in range(kv_cache.STEP + 3):  # appends within the room, then a growth
        layer.update(*_states(g, 1))
    assert torch.equal(keys, kept)


def test_batch_select_keeps_the_chosen_row():
    g = torch.Generator().manual_seed(6)
    layer, ref = kv_cache.GrowingLayer(), kv_cache.DynamicLayer()
    k, v = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    layer.update(k, v), ref.update(k, v)
    layer.batch_select_indices(torch.tensor([2])), ref.batch_select_indices(torch.tensor([2]))
    k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    got, want = layer.update(k, v), ref.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
