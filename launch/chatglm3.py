"""ChatGLM3-6B without remote code: the original checkpoint as a native `GlmForCausalLM`.

The shipped modeling_chatglm.py breaks on transformers >= 4.42 and would run code from a
downloaded folder; the architecture is GLM-4's with other tensor names, so a one-time rename
(plus splitting the fused qkv) gives a model the library runs natively. The prompt FastChat
builds from its `chatglm3` template is a string; `encode_prompt` turns it back into the exact
ids of the original `build_chat_input`, which tokenizes each segment separately.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    GlmConfig,
    GlmForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import SentencePieceExtractor
from transformers.tokenization_utils_base import generate_merges

from launch.convert import ConversionError, Rename, convert_checkpoint, read_config

NAME = "chatglm3-6b"
# Bump when the output for the same source changes, so cached conversions are rebuilt.
VERSION = "1"
# Appended after the sentencepiece vocabulary (64789 pieces) in this order: ids 64789..64797.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLE_TOKENS = SPECIAL_TOKENS[5:]
# </s>, <|user|>, <|observation|>: what the original chat() stops on.
STOP_TOKEN_IDS = (2, 64795, 64797)
STOP_TOKENS = ("</s>", "<|user|>", "<|observation|>")
# The original chat()'s sampling defaults, for a folder without generation_config.json.
CHAT_SAMPLING = {"do_sample": True, "top_p": 0.8, "temperature": 0.8}
SAMPLING_KEYS = ("do_sample", "top_p", "top_k", "temperature", "repetition_penalty", "max_new_tokens")

ROLE_SPLIT = re.compile("(" + "|".join(map(re.escape, ROLE_TOKENS)) + ")")


def convert(src_dir: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert an original ChatGLM3 folder to a native one in `out_dir` (cached by content hash).

    Raises SourceError (missing or incomplete folder, message names the download command) or
    ConversionError (a checkpoint variant this mapping does not cover exactly).
    """
    src, out = Path(src_dir), Path(out_dir)
    original = read_config(src, NAME, needs=("tokenizer.model",))
    tokenizer = convert_tokenizer(src / "tokenizer.model", original.get("seq_length", 8192))
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    config = native_config(original, stop_ids)
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} rows")

    def write_extras(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        generation_config(src, stop_ids).save_pretrained(folder)

    return convert_checkpoint(
        src, out, name=NAME, version=VERSION, config=config, model_class=GlmForCausalLM,
        rename=renamer(original), write_extras=write_extras, progress=progress,
    )


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Ids of a FastChat `chatglm3` prompt string, equal to the original `build_chat_input`.

    The original starts with [gMASK] sop, then per message: role token, sentencepiece encoding
    of "{metadata}\\n", then separately of the content (each segment gets its own dummy-prefix
    space), then <|assistant|>. Role-token look-alikes inside content cannot be told apart in a
    string and count as role tokens; every other special-token look-alike is plain text.
    """
    ids = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    parts = ROLE_SPLIT.split(prompt)  # [text, role, chunk, role, chunk, ...]
    ids += encode_text(tokenizer, parts[0])
    last = len(parts) - 2
    for i in range(1, len(parts), 2):
        ids.append(tokenizer.convert_tokens_to_ids(parts[i]))
        chunk = parts[i + 1]
        if "\n" in chunk:
            metadata, content = chunk.split("\n", 1)
            ids += encode_text(tokenizer, metadata + "\n") + encode_text(tokenizer, content)
        elif chunk:
            ids += encode_text(tokenizer, chunk)
        elif i != last:  # FastChat writes an empty message as a bare role token; the original keeps "\n"
            ids += encode_text(tokenizer, "\n")
    return ids


def response_text(decoded: str) -> str:
    """A decoded reply as the original chat() returns it (its process_response): the model first
    writes a metadata line, empty for plain replies, which is dropped with the surrounding
    whitespace. A reply with metadata (a tool call) is returned whole."""
    metadata, newline, content = decoded.partition("\n")
    if not newline:
        metadata, content = "", decoded
    return content.strip() if not metadata.strip() else decoded


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    # split_special_tokens: "</s>" typed by a user is text, as for sentencepiece itself.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def convert_tokenizer(sp_model: Path, max_length: int = 8192) -> PreTrainedTokenizerFast:
    """The sentencepiece BPE `tokenizer.model` as a fast tokenizer giving identical ids.

    Only the settings verified against sentencepiece in tests are accepted; anything else is a
    ConversionError rather than a tokenizer that is silently a little different.
    """
    if not sp_model.is_file():
        raise ConversionError(f"{sp_model} is missing")
    proto = SentencePieceExtractor(str(sp_model)).proto
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = [
        what for what, bad in (
            ("a non-BPE model", trainer.model_type != 2),
            ("no byte fallback", not trainer.byte_fallback),
            ("a normalization rule", bool(norm.precompiled_charsmap) or norm.name not in ("identity", "")),
            ("unescaped whitespace", not norm.escape_whitespaces),
            ("whitespace as suffix", trainer.treat_whitespace_as_suffix),
            ("user-defined symbols", any(p.type == p.USER_DEFINED for p in proto.pieces)),
        ) if bad
    ]
    if unsupported:
        raise ConversionError(f"{sp_model} uses {', '.join(unsupported)}; the conversion is only exact without")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    # sentencepiece never produces control/unknown/unused pieces from text: no merges into them.
    never = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN, p.UNUSED)]
    merges = generate_merges(vocab, scores, skip_tokens=never)
    tok = Tokenizer(BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(spm_normalizers(norm.add_dummy_prefix, norm.remove_extra_whitespaces))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # sentencepiece drops the dummy prefix when decoding
    tok.decoder = decoders.Sequence(steps)
    controls = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    first = len(vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(first, first + len(SPECIAL_TOKENS))):
        raise ConversionError(f"{sp_model}: special tokens landed at {got}, not after the {first} pieces")

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=trainer.unk_piece,
        eos_token=proto.pieces[trainer.eos_id].piece,
        pad_token=trainer.unk_piece,  # the original pads with <unk> (id 0)
        padding_side="left",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def spm_normalizers(dummy_prefix: bool, remove_extra_whitespaces: bool) -> list:
    """sentencepiece's whitespace handling: squeeze/trim ASCII spaces only, then "▁" for each."""
    steps = []
    if remove_extra_whitespaces:
        # \A and \z: Oniguruma's ^ and $ would also match around every "\n".
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # unconditional, unlike Metaspace's "always"
    return steps + [normalizers.Replace(" ", "▁")]


def native_config(original: dict, eos_token_ids: list[int]) -> GlmConfig:
    """The GlmConfig computing what the original config describes, or ConversionError."""
    required = {  # option: value the mapping assumes (the ChatGLM3 release's)
        "rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
        "add_bias_linear": False, "original_rope": True, "pre_seq_len": None, "quantization_bit": 0,
    }
    wrong = {k: original.get(k, v) for k, v in required.items() if original.get(k, v) != v}
    if wrong:
        raise ConversionError(f"unsupported ChatGLM3 variant: {wrong}")
    heads = original["num_attention_heads"]
    head_dim = original.get("kv_channels") or original["hidden_size"] // heads
    return GlmConfig(
        vocab_size=original["padded_vocab_size"],
        hidden_size=original["hidden_size"],
        intermediate_size=original["ffn_hidden_size"],
        num_hidden_layers=original["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=original["multi_query_group_num"] if original.get("multi_query_attention") else heads,
        head_dim=head_dim,
        max_position_embeddings=original.get("seq_length", 8192),
        rms_norm_eps=original.get("layernorm_epsilon", 1e-5),
        # ChatGLM3 scales the base, not the positions (chatglm2-32k scaled positions instead).
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * original.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        attention_bias=bool(original.get("add_qkv_bias", False)),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=eos_token_ids,
        dtype=original.get("torch_dtype", "float32"),
    )


def renamer(original: dict) -> Rename:
    heads = original["num_attention_heads"]
    head_dim = original.get("kv_channels") or original["hidden_size"] // heads
    kv_heads = original["multi_query_group_num"] if original.get("multi_query_attention") else heads
    qkv_rows = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    rotary = head_dim // 2  # ChatGLM rotates the first half of each head
    top = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    per_layer = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # gate rows first, as GlmMLP chunks
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    layer = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")

    def rename(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name in top:
            yield top[name], tensor
        elif name == "transformer.rotary_pos_emb.inv_freq":
            check_inv_freq(tensor, rotary)  # recomputed natively: only proves the dims agree
        elif (m := layer.fullmatch(name)) and m[2] in per_layer:
            yield f"model.layers.{m[1]}.{per_layer[m[2]]}", tensor
        elif m and m[2] in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = m[2].rsplit(".", 1)[1]
            if tensor.shape[0] != sum(qkv_rows):
                raise ConversionError(f"{name}: {tensor.shape[0]} rows, config implies {sum(qkv_rows)}")
            for proj, part in zip("qkv", torch.split(tensor, qkv_rows, dim=0), strict=True):
                yield f"model.layers.{m[1]}.self_attn.{proj}_proj.{kind}", part
        else:
            raise ConversionError(f"unknown tensor {name} in the ChatGLM3 checkpoint")

    return rename


def check_inv_freq(inv_freq: torch.Tensor, rotary_dim: int) -> None:
    # The buffer is always built with base 10000 (rope_ratio only enters the forward pass), in
    # the checkpoint's half precision: compare to 1e-2 relative.
    expected = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.double(), expected, rtol=1e-2, atol=0):
        raise ConversionError(
            f"rotary_pos_emb.inv_freq {tuple(inv_freq.shape)} does not match a rotary dim of {rotary_dim} "
            "from kv_channels: the checkpoint and its config.json disagree"
        )


def generation_config(src: Path, stop_ids: list[int]) -> GenerationConfig:
    sampling = dict(CHAT_SAMPLING)
    shipped = src / "generation_config.json"
    if shipped.is_file():
        sampling.update({k: v for k, v in json.loads(shipped.read_text()).items() if k in SAMPLING_KEYS})
    return GenerationConfig(**sampling, eos_token_id=stop_ids, pad_token_id=0)
