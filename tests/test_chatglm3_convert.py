"""ChatGLM3 → GlmForCausalLM: the converted model computes what the original computes.

Two independent references:
- modelscope's ChatGLM2 implementation (`modelscope.models.nlp.chatglm2`, same architecture as
  ChatGLM3) on tiny random checkpoints written in the original layout;
- glm3_model.data in ../shared/reference: outputs of the original chatglm3-6b modeling code on
  tiny weights, from the chatglm-cpp 0.4.2 sdist (tests/data, MIT License, Copyright (c) 2023
  Jiahao Li; see LICENSE.chatglm-cpp there).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GlmForCausalLM

from launch import chatglm3
from launch.convert import ConversionError, SourceError, convert_checkpoint, read_shard
from launch.synth import write_chatglm3

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
DIMS = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4,
        "multi_query_group_num": 2, "torch_dtype": "float32"}
PROMPT = [64790, 64792, 64795, 30, 31, 32, 33, 34, 64796]  # [gMASK] sop <|user|> ... <|assistant|>
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("glm")
    src = write_chatglm3(root / "src", shards=3, std=0.1, seed=1, **DIMS)
    return src, chatglm3.convert(src, root / "out", progress=False)


def modelscope_reference(src: Path, rope_base: float = 10000.0):
    """modelscope's ChatGLM2 with the source weights. Its rope_ratio scales positions (as in
    chatglm2-32k); ChatGLM3 scales the base instead (`base = base * self.rope_ratio` in its
    RotaryEmbedding.forward_impl), so a base other than 10000 is passed to the same routine."""
    from modelscope.models.nlp.chatglm2.configuration import ChatGLM2Config
    from modelscope.models.nlp.chatglm2.text_generation import ChatGLMModel

    original = json.loads((src / "config.json").read_text())
    original.pop("rope_ratio", None)
    config = ChatGLM2Config(**{**original, "original_rope": True, "torch_dtype": torch.float32})
    model = ChatGLMModel(config, empty_init=False).eval()
    state = {}
    for file in sorted(src.glob("pytorch_model*.bin")) or sorted(src.glob("model*.safetensors")):
        state.update({k.removeprefix("transformer."): v.clone() for k, v in read_shard(file)})
    model.load_state_dict(state, strict=True)
    rope = model.rotary_pos_emb
    rope.forward = lambda max_seq_len, offset=0: rope.forward_impl(
        max_seq_len, rope.dim, dtype=torch.float32, device=torch.device("cpu"), base=rope_base)
    return model


def reference_steps(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill, then of `steps` greedy decode steps using the KV cache."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model(input_ids=ids, position_ids=torch.arange(len(prompt))[None], use_cache=True, return_dict=True)
        logits = [model.output_layer(out.last_hidden_state).transpose(0, 1)[0]]
        tokens = []
        for step in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[len(prompt) + step]]),
                        past_key_values=out.past_key_values, use_cache=True, return_dict=True)
            logits.append(model.output_layer(out.last_hidden_state).transpose(0, 1)[0])
    return logits, tokens


def native_steps(model: GlmForCausalLM, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits, tokens = [out.logits[0]], []
        for _ in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0])
    return logits, tokens


def max_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]


def load(out: Path) -> GlmForCausalLM:
    return GlmForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_prefill_and_three_cached_decode_steps_match_modelscope(tiny):
    src, out = tiny
    ref_logits, ref_tokens = reference_steps(modelscope_reference(src), PROMPT, 3)
    logits, tokens = native_steps(load(out), PROMPT, 3)
    diffs = max_diffs(ref_logits, logits)
    assert max(diffs) <= TOL, diffs
    assert float(ref_logits[0].abs().max()) > 0.1  # logits big enough for the tolerance to mean something
    assert tokens == ref_tokens


def test_greedy_generation_matches_modelscope(tiny):
    src, out = tiny
    _, ref_tokens = reference_steps(modelscope_reference(src), PROMPT, 12)
    generated = load(out).generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert generated[0, len(PROMPT):].tolist() == ref_tokens


def test_swapped_gate_and_up_would_be_caught(tiny):
    """Negative control: the comparison above fails for a conversion that swaps the SwiGLU halves."""
    src, out = tiny
    ref_logits, _ = reference_steps(modelscope_reference(src), PROMPT, 0)
    model = load(out)
    for layer in model.model.layers:
        gate, up = layer.mlp.gate_up_proj.weight.data.chunk(2)
        layer.mlp.gate_up_proj.weight.data = torch.cat([up, gate])
    logits, _ = native_steps(model, PROMPT, 0)
    assert max_diffs(ref_logits, logits)[0] > 100 * TOL


def test_rope_ratio_scales_the_rotary_base(tmp_path):
    src = write_chatglm3(tmp_path / "src", shards=1, std=0.1, seed=2, rope_ratio=50, **DIMS)
    out = chatglm3.convert(src, tmp_path / "out", progress=False)
    model = load(out)
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    prompt = PROMPT + list(range(40, 60))  # long enough for the low frequencies to matter
    ref_logits, _ = reference_steps(modelscope_reference(src, rope_base=500000.0), prompt, 2)
    logits, _ = native_steps(model, prompt, 2)
    assert max(max_diffs(ref_logits, logits)) <= TOL
    # and the ratio matters: without it the same weights disagree
    plain_logits, _ = reference_steps(modelscope_reference(src), prompt, 0)
    assert max_diffs(plain_logits, logits[:1])[0] > 100 * TOL


def test_safetensors_source_converts_like_bin(tmp_path, tiny):
    src = write_chatglm3(tmp_path / "src", shards=2, std=0.1, seed=1, fmt="safetensors", **DIMS)
    out = chatglm3.convert(src, tmp_path / "out", progress=False)
    a, b = load(tiny[1]).state_dict(), load(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converted_folder_is_native_and_complete(tiny):
    _, out = tiny
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm" and "auto_map" not in config
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2 and config["attention_bias"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["eos_token_id"] == [2, 64795, 64797] and config["pad_token_id"] == 0
    assert not list(out.glob("*.py"))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(chatglm3.STOP_TOKEN_IDS)
    assert (generation["top_p"], generation["temperature"], generation["do_sample"]) == (0.8, 0.8, True)


def test_glm3_model_data_reference_vectors(tmp_path):
    """One layer of the original chatglm3 code: prefill of 3 tokens, then 2 cached steps."""
    data = ReferenceData(REFERENCE / "glm3_model.data")
    p = "transformer.encoder.layers.0."
    given = {
        "transformer.embedding.word_embeddings.weight": data.floats(5, 32),
        p + "input_layernorm.weight": data.floats(32),
        p + "self_attention.query_key_value.weight": data.floats(48, 32),
        p + "self_attention.query_key_value.bias": data.floats(48),
        p + "self_attention.dense.weight": data.floats(32, 32),
        p + "post_attention_layernorm.weight": data.floats(32),
        p + "mlp.dense_h_to_4h.weight": data.floats(96, 32),
        p + "mlp.dense_4h_to_h.weight": data.floats(32, 48),
        "transformer.encoder.final_layernorm.weight": data.floats(32),
    }
    steps = [(data.ints(3), data.floats(3, 32)), (data.ints(1), data.floats(32)), (data.ints(1), data.floats(32))]
    data.assert_consumed()
    dims = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 8, "multi_query_group_num": 2, "kv_channels": 4,
            "ffn_hidden_size": 48, "padded_vocab_size": 5, "layernorm_epsilon": 1e-5, "torch_dtype": "float32"}
    src = write_chatglm3(tmp_path / "src", shards=1, tensors=given, **dims)
    original = json.loads((src / "config.json").read_text())
    # A 5-token vocabulary has no room for the tokenizer, so this runs the weight half of convert().
    out = convert_checkpoint(
        src, tmp_path / "out", name=chatglm3.NAME, version=chatglm3.VERSION,
        config=chatglm3.native_config(original, list(chatglm3.STOP_TOKEN_IDS)), model_class=GlmForCausalLM,
        rename=chatglm3.renamer(original), write_extras=lambda folder: None, progress=False,
    )
    model = load(out).model
    past = None
    with torch.no_grad():
        for ids, expected in steps:
            result = model(input_ids=ids[None].long(), past_key_values=past, use_cache=True)
            past = result.past_key_values
            assert torch.allclose(result.last_hidden_state[0].squeeze(0), expected, atol=1e-5, rtol=0)


class ReferenceData:
    """Raw little-endian float32/int32 arrays back to back (format in ../shared/reference/README.md)."""

    def __init__(self, path: Path) -> None:
        self.raw = path.read_bytes()
        self.at = 0

    def _take(self, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape))
        array = np.frombuffer(self.raw, dtype=dtype, count=n, offset=self.at).reshape(shape)
        self.at += 4 * n
        return torch.from_numpy(array.copy())

    def floats(self, *shape: int) -> torch.Tensor:
        return self._take("<f4", shape)

    def ints(self, *shape: int) -> torch.Tensor:
        return self._take("<i4", shape)

    def assert_consumed(self) -> None:
        assert self.at == len(self.raw), f"read {self.at} of {len(self.raw)} bytes: layout misunderstood"


def test_second_convert_is_cached_and_a_changed_source_is_not(tmp_path):
    src = write_chatglm3(tmp_path / "src", shards=1, std=0.1, **DIMS)
    out = chatglm3.convert(src, tmp_path / "out", progress=False)
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert chatglm3.convert(src, out, progress=False) == out
    assert weights.stat().st_mtime_ns == first
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "layernorm_epsilon": 1e-6}))
    chatglm3.convert(src, out, progress=False)
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert not list(tmp_path.glob(".*partial"))


def test_missing_and_incomplete_sources_say_how_to_fetch(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist.*python -m launch\.download chatglm3-6b"):
        chatglm3.convert(tmp_path / "nowhere", tmp_path / "out")
    src = write_chatglm3(tmp_path / "src", shards=2, std=0.1, **DIMS)
    shard = src / "pytorch_model-00002-of-00002.bin"
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")  # clone without lfs
    with pytest.raises(SourceError, match=r"incomplete: pytorch_model-00002-of-00002\.bin.*git lfs.*launch\.download"):
        chatglm3.convert(src, tmp_path / "out")
    shard.unlink()
    with pytest.raises(SourceError, match="incomplete"):
        chatglm3.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_tensors_and_variants_are_refused(tmp_path):
    src = write_chatglm3(tmp_path / "src", shards=1, std=0.1, **DIMS)
    extra = {"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 4)}  # a p-tuning checkpoint
    state = {k: v.clone() for k, v in read_shard(src / "pytorch_model.bin")}
    torch.save({**state, **extra}, tmp_path / "with_extra.bin")
    (tmp_path / "with_extra.bin").replace(src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="prefix_encoder"):
        chatglm3.convert(src, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="original_rope"):
        chatglm3.native_config({**json.loads((src / "config.json").read_text()), "original_rope": False}, [2])


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_line_synth_then_convert_gives_a_working_model(tmp_path):
    """The path of a test profile: `python -m launch.synth --tiny`, then the converter's command."""
    made = run_module("launch.synth", "chatglm3-6b", "--tiny", "--out", str(tmp_path / "src"))
    assert made.returncode == 0, made.stderr
    done = run_module("launch.convert", "chatglm3-6b", str(tmp_path / "src"), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = chatglm3.encode_prompt(tokenizer, "<|system|>\nBe brief.<|user|>\n你好<|assistant|>")
    out = load(tmp_path / "out").generate(torch.tensor([ids]), do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (1, len(ids) + 3)


def test_command_line_errors_are_one_message_without_traceback(tmp_path):
    done = run_module("launch.convert", "chatglm3-6b", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert done.returncode == 1
    assert "python -m launch.download chatglm3-6b" in done.stderr and "Traceback" not in done.stderr


def test_a_clone_with_safetensors_pointers_falls_back_to_complete_bin_shards(tmp_path):
    src = write_chatglm3(tmp_path / "src", shards=1, std=0.1, **DIMS)
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"
    (src / "model-00001-of-00001.safetensors").write_text(pointer)
    index = {"weight_map": {"transformer.output_layer.weight": "model-00001-of-00001.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.output_layer.weight": "pytorch_model.bin"}}))
    out = chatglm3.convert(src, tmp_path / "out", progress=False)
    assert load(out).lm_head.weight.shape == (65024, 64)
