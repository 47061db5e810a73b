"""Qwen-7B-Chat → Qwen2ForCausalLM: the converted model computes what the original computes.

References:
- qwen7b_attn.data and qwen7b_mlp.data in ../shared/reference: outputs of the original Qwen-7B
  modeling code on tiny weights, from the qwen-cpp 0.1.3 sdist (tests/data; Tongyi Qianwen
  License Agreement, see LICENSE.qwen-cpp and NOTICE.qwen-cpp there);
- a small forward pass written below from Qwen (v1)'s architecture, on a tiny random checkpoint
  in the original layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GlmConfig, Qwen2ForCausalLM
from transformers.models.glm.modeling_glm import GlmAttention, GlmRotaryEmbedding

from launch import qwen
from launch.convert import SourceError, read_shard
from launch.synth import write_qwen

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DIMS = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 192, "kv_channels": 16,
        "num_attention_heads": 4, "torch_dtype": "float32"}
# <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
PROMPT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
TOL = 1e-4
# One attention block / MLP of the reference data: hidden 32, 8 heads of 4, MLP 48.
BLOCK = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 96, "kv_channels": 4,
         "num_attention_heads": 8, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen")
    src = write_qwen(root / "src", shards=3, std=0.1, seed=3, **DIMS)
    return src, qwen.convert(src, root / "out", progress=False)


def load(out: Path) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def original_state(src: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(src.glob("model*.safetensors")):
        state.update(read_shard(file))
    return state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x: torch.Tensor, base: float, interleaved: bool = False) -> torch.Tensor:
    """Rotary over the full head dim; Qwen rotates halves (rotate_half), GLM interleaved pairs."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    a, b = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def qwen_attention(x, c_attn_w, c_attn_b, c_proj_w, heads: int, base: float = 10000.0) -> torch.Tensor:
    """Qwen (v1) attention, causal, positions 0..n-1, no NTK/logn (they act beyond 8192 only)."""
    seq, hidden = x.shape[-2:]
    q, k, v = (x @ c_attn_w.T + c_attn_b).split(hidden, dim=-1)
    q, k, v = (t.reshape(seq, heads, -1).transpose(0, 1) for t in (q, k, v))
    q, k = rotary(q, base), rotary(k, base)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, hidden) @ c_proj_w.T


def qwen_mlp(x, w1, w2, c_proj) -> torch.Tensor:
    return (x @ w1.T * F.silu(x @ w2.T)) @ c_proj.T


def qwen_logits(state: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    eps, heads = config["layer_norm_epsilon"], config["num_attention_heads"]
    x = state["transformer.wte.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, state[p + "ln_1.weight"], eps)
        x = x + qwen_attention(h, state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"],
                               state[p + "attn.c_proj.weight"], heads, config["rotary_emb_base"])
        h = rms_norm(x, state[p + "ln_2.weight"], eps)
        x = x + qwen_mlp(h, state[p + "mlp.w1.weight"], state[p + "mlp.w2.weight"], state[p + "mlp.c_proj.weight"])
    return rms_norm(x, state["transformer.ln_f.weight"], eps) @ state["lm_head.weight"].T


def test_prefill_and_three_cached_decode_steps_match_the_reference_forward(tiny):
    src, out = tiny
    state, config = original_state(src), json.loads((src / "config.json").read_text())
    model = load(out)
    ids = list(PROMPT)
    with torch.no_grad():
        result = model(input_ids=torch.tensor([ids]), use_cache=True)
        expected = qwen_logits(state, config, ids)
        assert float((result.logits[0] - expected).abs().max()) <= TOL
        assert float(expected.abs().max()) > 0.1  # logits big enough for the tolerance to mean something
        for _ in range(3):
            ids.append(int(result.logits[0, -1].argmax()))
            assert ids[-1] == int(expected[-1].argmax())  # greedy choices agree
            result = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=result.past_key_values, use_cache=True)
            expected = qwen_logits(state, config, ids)
            assert float((result.logits[0, -1] - expected[-1]).abs().max()) <= TOL


def test_greedy_generation_matches_the_reference_forward(tiny):
    src, out = tiny
    state, config = original_state(src), json.loads((src / "config.json").read_text())
    ids = list(PROMPT)
    for _ in range(10):
        ids.append(int(qwen_logits(state, config, ids)[-1].argmax()))
    # repetition_penalty: the shipped generation config's 1.1 would change plain greedy choices
    generated = load(out).generate(torch.tensor([PROMPT]), do_sample=False, repetition_penalty=1.0,
                                   max_new_tokens=10, min_new_tokens=10)
    assert generated[0].tolist() == ids


def test_converted_folder_is_native_and_capped_at_8192(tiny):
    _, out = tiny
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    assert config["intermediate_size"] == 96 and config["num_key_value_heads"] == 4
    assert config["max_position_embeddings"] == qwen.CONTEXT_LENGTH == 8192
    assert config["sliding_window"] is None and not config["use_sliding_window"]
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-6
    assert config["eos_token_id"] == [151643, 151644, 151645] and not config["tie_word_embeddings"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(qwen.STOP_TOKEN_IDS)
    assert (generation["top_p"], generation["repetition_penalty"], generation["do_sample"]) == (0.8, 1.1, True)
    assert not list(out.glob("*.py")) and not list(out.glob("*.tiktoken"))


class ReferenceData:
    """Raw little-endian float32 arrays back to back (format in ../shared/reference/README.md)."""

    def __init__(self, path: Path) -> None:
        self.raw, self.at = path.read_bytes(), 0

    def floats(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        array = np.frombuffer(self.raw, dtype="<f4", count=n, offset=self.at).reshape(shape)
        self.at += 4 * n
        return torch.from_numpy(array.copy())

    def assert_consumed(self) -> None:
        assert self.at == len(self.raw), f"read {self.at} of {len(self.raw)} bytes: layout misunderstood"


@pytest.fixture(scope="module")
def attn_data() -> dict[str, torch.Tensor]:
    data = ReferenceData(REFERENCE / "qwen7b_attn.data")
    out = {"c_attn.weight": data.floats(96, 32), "c_attn.bias": data.floats(96), "c_proj.weight": data.floats(32, 32),
           "x": data.floats(1, 3, 32), "y": data.floats(1, 3, 32)}
    data.assert_consumed()
    return out


@pytest.fixture(scope="module")
def mlp_data() -> dict[str, torch.Tensor]:
    data = ReferenceData(REFERENCE / "qwen7b_mlp.data")
    out = {"w1.weight": data.floats(48, 32), "w2.weight": data.floats(48, 32), "c_proj.weight": data.floats(32, 48),
           "x": data.floats(3, 32), "y": data.floats(3, 32)}
    data.assert_consumed()
    return out


def convert_block(tmp_path: Path, attn: dict, mlp: dict, swap_w1_w2: bool = False) -> Qwen2ForCausalLM:
    """A one-layer original-layout checkpoint holding the reference weights, through qwen.convert."""
    w1, w2 = ("w2", "w1") if swap_w1_w2 else ("w1", "w2")
    given = {
        "transformer.h.0.attn.c_attn.weight": attn["c_attn.weight"],
        "transformer.h.0.attn.c_attn.bias": attn["c_attn.bias"],
        "transformer.h.0.attn.c_proj.weight": attn["c_proj.weight"],
        "transformer.h.0.mlp.w1.weight": mlp[f"{w1}.weight"],
        "transformer.h.0.mlp.w2.weight": mlp[f"{w2}.weight"],
        "transformer.h.0.mlp.c_proj.weight": mlp["c_proj.weight"],
    }
    src = write_qwen(tmp_path / "src", shards=1, tensors=given, **BLOCK)
    return load(qwen.convert(src, tmp_path / "out", progress=False))


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def run_attention(attention, rotary_embedding, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        return attention(hidden_states=x, position_embeddings=rotary_embedding(x, positions),
                         attention_mask=causal_mask(x.shape[1]))[0]


@pytest.fixture(scope="module")
def block(tmp_path_factory, attn_data, mlp_data) -> Qwen2ForCausalLM:
    return convert_block(tmp_path_factory.mktemp("block"), attn_data, mlp_data)


def test_qwen7b_attn_data_through_the_converted_attention(block, attn_data):
    y = run_attention(block.model.layers[0].self_attn, block.model.rotary_emb, attn_data["x"])
    assert torch.allclose(y, attn_data["y"], atol=1e-5, rtol=0)


def test_qwen7b_mlp_data_through_the_converted_mlp(block, mlp_data):
    with torch.no_grad():
        y = block.model.layers[0].mlp(mlp_data["x"])
    assert torch.allclose(y, mlp_data["y"], atol=1e-5, rtol=0)


def test_swapping_w1_and_w2_fails_the_mlp_data(tmp_path, attn_data, mlp_data):
    """Negative control: a converter mapping w1 to the gate would be caught."""
    model = convert_block(tmp_path, attn_data, mlp_data, swap_w1_w2=True)
    with torch.no_grad():
        y = model.model.layers[0].mlp(mlp_data["x"])
    assert float((y - mlp_data["y"]).abs().max()) > 1e-4


def test_interleaved_rotary_fails_the_attn_data(block, attn_data):
    """Negative control: the same converted weights under GLM's interleaved rotary (the library's
    GlmAttention, rotating the full head) miss the reference."""
    converted = block.model.layers[0].self_attn
    config = GlmConfig(hidden_size=32, num_attention_heads=8, num_key_value_heads=8, head_dim=4, vocab_size=16,
                       attention_bias=True, pad_token_id=0, partial_rotary_factor=1.0,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    glm = GlmAttention(config, layer_idx=0).eval()
    glm.load_state_dict(converted.state_dict())
    y = run_attention(glm, GlmRotaryEmbedding(config), attn_data["x"])
    assert float((y - attn_data["y"]).abs().max()) > 1e-3


def test_the_reference_forward_reproduces_the_original_data(attn_data, mlp_data):
    """Grounds the hand-written forward used on the tiny checkpoints in the original's outputs."""
    args = attn_data["c_attn.weight"], attn_data["c_attn.bias"], attn_data["c_proj.weight"]
    assert torch.allclose(qwen_attention(attn_data["x"][0], *args, heads=8), attn_data["y"][0], atol=1e-5, rtol=0)
    y = qwen_mlp(mlp_data["x"], mlp_data["w1.weight"], mlp_data["w2.weight"], mlp_data["c_proj.weight"])
    assert torch.allclose(y, mlp_data["y"], atol=1e-5, rtol=0)


def test_missing_tokenizer_file_says_how_to_fetch(tmp_path):
    src = write_qwen(tmp_path / "src", shards=1, **BLOCK)
    (src / "qwen.tiktoken").unlink()
    with pytest.raises(SourceError, match=r"qwen\.tiktoken missing.*python -m launch\.download qwen-7b-chat"):
        qwen.convert(src, tmp_path / "out")


def test_command_line_synth_then_convert_gives_a_working_model(tmp_path):
    """The path of a test profile: `python -m launch.synth --tiny`, then the converter."""
    command = [sys.executable, "-m", "launch.synth", "qwen-7b-chat", "--tiny", "--out", str(tmp_path / "src")]
    made = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    qwen.convert(tmp_path / "src", tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n" \
             "<|im_start|>assistant\n"
    ids = qwen.encode_prompt(tokenizer, prompt)
    out = load(tmp_path / "out").generate(torch.tensor([ids]), do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (1, len(ids) + 3)
