"""Qwen-7B-Chat without remote code: the original checkpoint as a native `Qwen2ForCausalLM`.

Qwen (v1)'s shipped modeling_qwen.py breaks on transformers >= 4.54 and would run code from a
downloaded folder. Up to its training length of 8192 tokens it computes exactly what Qwen2
computes (dynamic NTK and logn scaling only act beyond), so a rename plus a split of the fused
c_attn gives a native model; the context is capped there. FastChat's `qwen-7b-chat` template
sends a ChatML string; `encode_prompt` turns it into the ids of the original `make_context`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import normalizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import TikTokenConverter

from launch.convert import ConversionError, Rename, convert_checkpoint, read_config

NAME = "qwen-7b-chat"
# Bump when the output for the same source changes, so cached conversions are rebuilt.
VERSION = "1"
# Qwen's own split pattern: single digits (\p{N}), where cl100k has \p{N}{1,3}.
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
FIRST_SPECIAL_ID = 151643  # SPECIAL_TOKENS take 151643..151850
STOP_TOKEN_IDS = (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>
# Beyond the training length Qwen switches on dynamic NTK and logn scaling, which Qwen2 lacks.
CONTEXT_LENGTH = 8192
SAMPLING_KEYS = ("do_sample", "top_p", "top_k", "temperature", "repetition_penalty", "max_new_tokens")

CHATML_SPLIT = re.compile(r"(<\|im_start\|>|<\|im_end\|>)")


def convert(src_dir: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert an original Qwen-7B-Chat folder to a native one in `out_dir` (cached by content hash).

    Raises SourceError (missing or incomplete folder, message names the download command) or
    ConversionError (a checkpoint variant this mapping does not cover exactly).
    """
    src, out = Path(src_dir), Path(out_dir)
    original = read_config(src, NAME, needs=("qwen.tiktoken",))
    config = native_config(original)

    def write_extras(folder: Path) -> None:
        convert_tokenizer(src / "qwen.tiktoken").save_pretrained(folder)  # 2 s: only when converting
        generation_config(src).save_pretrained(folder)

    return convert_checkpoint(
        src, out, name=NAME, version=VERSION, config=config, model_class=Qwen2ForCausalLM,
        rename=renamer(original), write_extras=write_extras, progress=progress,
    )


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Ids of a FastChat `qwen-7b-chat` (ChatML) prompt string, equal to the original make_context.

    The original encodes im_start, then the role, "\\n" and the content each on its own, then
    im_end, with "\\n" between messages. Inside content only the two ChatML markers count as
    special (a string cannot tell them apart); other look-alikes, <|endoftext|> included, are
    plain text, as there.
    Prompts past CONTEXT_LENGTH are refused by the worker (conf: context_length 8192), with
    both numbers, like every model's.
    """
    ids: list[int] = []
    newline = encode_text(tokenizer, "\n")
    parts = CHATML_SPLIT.split(prompt)  # [text, marker, text, marker, ...]
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif i and parts[i - 1] == "<|im_start|>" and "\n" in part:
            role, content = part.split("\n", 1)
            ids += encode_text(tokenizer, role) + newline + encode_text(tokenizer, content)
            if i + 1 < len(parts) and parts[i + 1] == "<|im_start|>":
                # FastChat writes an empty message without its <|im_end|>\n; the original keeps them.
                ids += [tokenizer.convert_tokens_to_ids("<|im_end|>")] + newline
        else:
            ids += encode_text(tokenizer, part)
    return ids


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    # split_special_tokens: like the original's allowed_special=set() for message text.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def convert_tokenizer(tiktoken_file: Path) -> PreTrainedTokenizerFast:
    """qwen.tiktoken as a fast tokenizer with Qwen's pattern, NFC and special tokens."""
    tok = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PATTERN,
                            extra_special_tokens=SPECIAL_TOKENS).converted()
    tok.normalizer = normalizers.NFC()  # QWenTokenizer normalizes NFC before tiktoken
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(SPECIAL_TOKENS))):
        raise ConversionError(f"{tiktoken_file} is not Qwen's vocabulary: special tokens landed at {got[:3]}...")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def native_config(original: dict) -> Qwen2Config:
    """The Qwen2Config computing what the original config describes, or ConversionError."""
    heads, hidden = original["num_attention_heads"], original["hidden_size"]
    wrong = {
        k: original.get(k) for k, ok in (
            ("rotary_pct", original.get("rotary_pct", 1.0) == 1.0),
            ("no_bias", original.get("no_bias", True)),
            ("scale_attn_weights", original.get("scale_attn_weights", True)),
            ("kv_channels", original.get("kv_channels", hidden // heads) * heads == hidden),
        ) if not ok
    }
    if wrong:
        raise ConversionError(f"unsupported Qwen variant: {wrong}")
    return Qwen2Config(
        vocab_size=original["vocab_size"],
        hidden_size=hidden,
        intermediate_size=original["intermediate_size"] // 2,  # Qwen counts w1 and w2 together
        num_hidden_layers=original["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=min(original.get("seq_length", CONTEXT_LENGTH), CONTEXT_LENGTH),
        rms_norm_eps=original.get("layer_norm_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(original.get("rotary_emb_base", 10000))},
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=list(STOP_TOKEN_IDS),
        pad_token_id=STOP_TOKEN_IDS[0],
        dtype=original.get("torch_dtype", "bfloat16"),
    )


def renamer(original: dict) -> Rename:
    top = {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "mlp.w1.weight": "mlp.up_proj.weight",
        "mlp.w2.weight": "mlp.gate_proj.weight",  # w2 is the SiLU side: c_proj(w1(x) * silu(w2(x)))
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    layer = re.compile(r"transformer\.h\.(\d+)\.(.+)")
    head_dim = original["hidden_size"] // original["num_attention_heads"]

    def rename(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name in top:
            yield top[name], tensor
        elif name == "transformer.rotary_emb.inv_freq":
            check_inv_freq(tensor, head_dim, original.get("rotary_emb_base", 10000))
        elif (m := layer.fullmatch(name)) and m[2] in per_layer:
            yield f"model.layers.{m[1]}.{per_layer[m[2]]}", tensor
        elif m and m[2] in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = m[2].rsplit(".", 1)[1]
            if tensor.shape[0] % 3:
                raise ConversionError(f"{name}: {tensor.shape[0]} rows do not split in q, k, v thirds")
            for proj, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                yield f"model.layers.{m[1]}.self_attn.{proj}_proj.{kind}", part
        else:
            raise ConversionError(f"unknown tensor {name} in the Qwen checkpoint")

    return rename


def check_inv_freq(inv_freq: torch.Tensor, dim: int, base: float) -> None:
    # Only some exports keep this buffer; it is recomputed natively, so it just has to agree.
    expected = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.double(), expected, rtol=1e-2, atol=0):
        raise ConversionError("rotary_emb.inv_freq does not match head dim and rotary_emb_base of config.json")


def generation_config(src: Path) -> GenerationConfig:
    shipped = src / "generation_config.json"
    sampling = {}
    if shipped.is_file():
        sampling = {k: v for k, v in json.loads(shipped.read_text()).items() if k in SAMPLING_KEYS}
    return GenerationConfig(**sampling, eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=STOP_TOKEN_IDS[0])
