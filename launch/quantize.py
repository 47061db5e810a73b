"""INT8 models: quantize a bf16 checkpoint once with Intel Neural Compressor, load it fast.

    path, made = ensure_int8(src_dir, cache_root, QuantConfig())   # cache hit: made is False
    model = load_int8(path, threads=2)                             # ready for launch.generate
    python -m launch.quantize SRC_DIR [--cache-root DIR]           # the same from a shell

The folder holds int8 weights (`NAME.weight`, torch.int8 [out, in]) with their float32
per-output-channel scales (`NAME.weight_scale` [out]), every other tensor in bf16, the
source's config and tokenizer files, and `quantization.json`, written last, which names the
cache key, the config and the quantized tensors. Its name is the cache key, computed from
the source folder's content and the QuantConfig, so a cache hit never quantizes again.

INC's RTN computes the integers and scales (per-channel symmetric by default); its own
INCWeightOnlyLinear is slow on CPU, so only the numbers are kept and launch/int8_linear.py
executes them. Quantization streams one transformer block at a time from the safetensors
files and writes ~1 GiB shards as it goes, so a 7B model never sits in memory whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from launch.int8_linear import Int8Embedding, Int8Linear, stack_shared_inputs

MANIFEST = "quantization.json"
FORMAT = "llmd-int8"
FORMAT_VERSION = 1  # bump when the folder layout changes: old caches then miss, never misload
SHARD_BYTES = 1 << 30
# A weight larger than this in float32 (Qwen-7B's 151936x4096 lm_head and embeddings: 2.5 GB
# each) is quantized a slice of rows at a time, with the same result (one scale per row): whole,
# INC's copies of it took the first quantization of Qwen-7B-Chat to 21.7 GiB peak RSS (16.3-17.7 GiB now, two runs: it includes the mapped source shards).
CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class QuantConfig:
    algorithm: str = "rtn"  # INC's RTNConfig; the only one supported so far
    bits: int = 8
    group_size: int = -1  # -1: one scale per output channel
    sym: bool = True
    # Measured on SmolLM2 (docs/int8.md): int8 lm_head costs little accuracy and is ~8% of a
    # 7B model's bytes per decoded token; embeddings only save memory (one row read per token).
    lm_head: bool = True
    embeddings: bool = True

    def __post_init__(self) -> None:
        if (self.algorithm, self.bits, self.group_size, self.sym) != ("rtn", 8, -1, True):
            raise ValueError(
                f"unsupported quantization {asdict(self)}: only RTN, 8 bits, per-channel (group_size -1), "
                f"symmetric runs on the int8 kernels"
            )


class QuantizeError(Exception):
    """A source folder or cache folder that cannot be used; the message says which and why."""


def ensure_int8(src_dir: Path, cache_root: Path, config: QuantConfig = QuantConfig()) -> tuple[Path, bool]:
    """The int8 folder for `src_dir` under `cache_root`, quantizing only on a cache miss.

    Returns (folder, True if it was quantized now)."""
    key = cache_key(src_dir, config)
    out = Path(cache_root) / f"int8-{key}"
    if _manifest_key(out) == key:
        return out, False
    quantize(src_dir, out, config)
    return out, True


IGNORED = {"conversion.json"}  # launch.convert.MARKER


def cache_key(src_dir: Path, config: QuantConfig = QuantConfig()) -> str:
    """A 16-hex-digit key of the source folder's content, the QuantConfig and the format.

    Small files are hashed whole. Multi-GB safetensors are hashed by their header (names,
    dtypes, shapes, offsets), size and 32 blocks spread over the file: reading 15 GB at every
    start would cost longer than loading the int8 model, and a re-conversion that changes
    weights changes the sampled blocks."""
    src_dir = Path(src_dir)
    # The converter's record of its own source (file names, sizes, times) is not content:
    # re-fetching identical originals must not make the int8 copy look stale.
    files = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.name not in IGNORED)
    if not any(p.suffix == ".safetensors" for p in files):
        raise QuantizeError(f"{src_dir}: no *.safetensors files; convert the model to safetensors first")
    h = hashlib.sha256(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(config)}).encode())
    for p in files:
        h.update(str(p.relative_to(src_dir)).encode() + b"\0")
        if p.suffix == ".safetensors":
            _hash_safetensors(p, h)
        else:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def quantize(src_dir: Path, out_dir: Path, config: QuantConfig = QuantConfig()) -> None:
    """Quantize `src_dir` into `out_dir` (replaced whole, atomically, when complete)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    key = cache_key(src_dir, config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of the machine
    try:
        manifest = _quantize_into(src_dir, tmp, config, key)
        for p in src_dir.iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                shutil.copy2(p, tmp / p.name)
        # The manifest goes last: a folder without it is an interrupted run, never a cache hit.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_int8(model_dir: Path, threads: int | None = None) -> PreTrainedModel:
    """The int8 model in `model_dir`, in eval mode, ready for launch.generate.generate."""
    model_dir = Path(model_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    manifest = _read_manifest(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model = _empty_model(config)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["shards"]:
        tensors.update(load_file(model_dir / shard))
    for name in manifest["quantized"]:
        weight, scale = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale")
        bias = tensors.pop(f"{name}.bias", None)
        module = _module(model, name)
        if isinstance(module, nn.Embedding):
            _set_module(model, name, Int8Embedding(weight, scale))
        else:
            _set_module(model, name, Int8Linear(weight, scale, bias, tile=False))  # tiled in place below
    tied = manifest.get("tied_lm_head")
    if tied:  # lm_head computes with the embedding's int8 tensors: one copy in memory
        emb = _module(model, tied["embedding"])
        _set_module(model, tied["lm_head"], Int8Linear(emb.weight, emb.scale, tile=False))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantizeError(f"{model_dir}: tensors the model does not have: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False) and not tied:
        model.tie_weights()  # a bf16 tied lm_head is stored once, as the embedding
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise QuantizeError(f"{model_dir}: no weights for {left[:5]} ({len(left)} tensors); re-quantize the source")
    stack_shared_inputs(model)  # q/k/v and gate/up as one call each: fewer, larger GEMVs
    head = model.get_output_embeddings() if tied else None
    for module in model.modules():
        if isinstance(module, Int8Linear) and module is not head:  # a tied head reads the embedding's rows
            module.tile_()
    return model.eval()


# --- quantization ------------------------------------------------------------------------


def _quantize_into(src_dir: Path, out: Path, config: QuantConfig, key: str) -> dict:
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare  # slow import: only here

    # INC logs several lines per block (config warnings); the progress bar is enough.
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)

    model_config = AutoConfig.from_pretrained(src_dir)
    skeleton = _empty_model(model_config)
    index = _tensor_index(src_dir)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    head_name = _head_name(skeleton)
    emb_name = _embedding_name(skeleton)
    # Which 2-D weights INC quantizes: every nn.Linear with a stored weight, plus the
    # embedding table seen as a linear (one scale per token row), each if configured.
    targets: list[str] = []
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in index:
            if name != head_name or config.lm_head:
                targets.append(name)
    if config.embeddings or (tied and config.lm_head):
        targets.append(emb_name)
    tied_head = tied and config.lm_head and f"{head_name}.weight" not in index
    if tied and not tied_head and f"{head_name}.weight" not in index and config.embeddings:
        raise QuantizeError(
            f"{src_dir}: a tied lm_head in bf16 with int8 embeddings is not supported; set lm_head and embeddings alike"
        )

    rtn = RTNConfig(bits=config.bits, use_sym=config.sym, group_size=config.group_size, use_layer_wise=False)
    writer = _ShardWriter(out)
    done: set[str] = set()
    groups = _groups(targets)

    def rtn_int8(batch: list[tuple[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One INC call for (name, 2-D weight) pairs: int8 weights and per-row scales."""
        block = nn.Module()
        for i, (_, w) in enumerate(batch):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w.float(), requires_grad=False)  # scales from exact values
            block.add_module(f"l{i}", lin)
        # use_optimum_format=False keeps signed int8 with float32 scales (the optimum
        # layout shifts to uint8 and rounds scales to float16).
        block = convert(prepare(block, rtn), use_optimum_format=False)
        return [_int8_from_inc(getattr(block, f"l{i}"), name) for i, (name, _) in enumerate(batch)]

    with safe_open_all(index) as get:
        for group in tqdm(groups, desc=f"int8 {src_dir.name}", unit="block"):
            # Slices of rows, at most CHUNK_BYTES of float32 per INC call (one scale per row:
            # the same result as whole weights).
            parts: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in group}
            batches: list[list[tuple[str, torch.Tensor]]] = [[]]
            size = 0
            for name, rows in _row_slices(group, get):
                if batches[-1] and size + 4 * rows.numel() > CHUNK_BYTES:
                    batches.append([])
                    size = 0
                batches[-1].append((name, rows))
                size += 4 * rows.numel()
            for batch in batches:  # the slices are views: only one batch is widened at a time
                for (name, _), q in zip(batch, rtn_int8(batch)):
                    parts[name].append(q)
            for name in group:
                pieces = parts.pop(name)
                weight, scales = (torch.cat([q[k] for q in pieces]) for k in ("int_weight", "scales"))
                writer.add(f"{name}.weight", weight)
                writer.add(f"{name}.weight_scale", scales.reshape(-1).float())
                done.add(f"{name}.weight")
        for name in index:
            if name not in done:
                t = get(name)
                writer.add(name, t.to(torch.bfloat16) if t.is_floating_point() else t)
    shards = writer.close()
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "source": str(src_dir),
        "config": asdict(config),
        "quantized": targets,
        "tied_lm_head": {"lm_head": head_name, "embedding": emb_name} if tied_head else None,
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "neural_compressor": _inc_version()},
    }


def _row_slices(names: list[str], get):
    """(name, rows of its weight) with each slice at most CHUNK_BYTES in float32."""
    for name in names:
        w = get(f"{name}.weight")
        rows = max(1, CHUNK_BYTES // (4 * w.shape[1]))
        for r in range(0, w.shape[0], rows):
            yield name, w[r : r + rows]


def _int8_from_inc(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    unpacked = module.unpack()
    w, scales = unpacked["int_weight"], unpacked["scales"]
    if unpacked.get("zp") is not None or w.min() < -128 or w.max() > 127 or scales.shape[-1] != 1:
        raise QuantizeError(f"{name}: INC returned a layout that is not per-channel symmetric int8")
    return {"int_weight": w.to(torch.int8).contiguous(), "scales": scales}


def _groups(targets: list[str]) -> list[list[str]]:
    """Targets grouped per transformer block (`...layers.N.`), the unit of the progress bar."""
    groups: dict[str, list[str]] = {}
    for name in targets:
        m = re.match(r"(.*?\.(?:layers|h|blocks)\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


class _ShardWriter:
    def __init__(self, out: Path):
        self.out, self.pending, self.size, self.names = out, {}, 0, []

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            name = f"model-{len(self.names) + 1:05d}.safetensors"
            save_file(self.pending, self.out / name, metadata={"format": "pt"})
            (self.out / name).chmod(0o644)
            self.names.append(name)
            self.pending, self.size = {}, 0

    def close(self) -> list[str]:
        self._flush()
        return self.names


class safe_open_all:
    """One reader over every shard: get(name) -> tensor, opening each file once."""

    def __init__(self, index: dict[str, Path]):
        self.index, self.handles = index, {}

    def __enter__(self):
        def get(name: str) -> torch.Tensor:
            path = self.index[name]
            if path not in self.handles:
                self.handles[path] = safe_open(path, framework="pt")
            return self.handles[path].get_tensor(name)

        return get

    def __exit__(self, *exc) -> None:
        self.handles.clear()


def _tensor_index(src_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(src_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                index[name] = path
    if not index:
        raise QuantizeError(f"{src_dir}: no *.safetensors files; convert the model to safetensors first")
    return index


def _hash_safetensors(path: Path, h) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(size.to_bytes(8, "little") + f.read(header_len))
        body = 8 + header_len
        for i in range(32):
            f.seek(body + (size - body) * i // 32)
            h.update(f.read(1 << 16))


# --- model skeleton ------------------------------------------------------------------------


def _empty_model(config) -> PreTrainedModel:
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory), buffers such as rotary frequencies real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)


def _embedding_name(model: PreTrainedModel) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    if not path.is_file():
        raise QuantizeError(f"{model_dir}: no {MANIFEST}; not an int8 folder made by launch.quantize")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise QuantizeError(
            f"{path}: format {manifest.get('format')} v{manifest.get('version')}, this code reads {FORMAT} "
            f"v{FORMAT_VERSION}; delete the folder to quantize again"
        )
    return manifest


def _manifest_key(out: Path) -> str | None:
    try:
        return _read_manifest(out).get("key")
    except (QuantizeError, ValueError):
        return None


def _inc_version() -> str:
    from importlib.metadata import version

    return version("neural-compressor-pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Quantize a bf16 safetensors model folder to int8 (cached).")
    p.add_argument("src_dir", type=Path)
    p.add_argument("--cache-root", type=Path, default=None, help="default: the source folder's parent")
    p.add_argument("--bf16-lm-head", action="store_true", help="keep lm_head (and a tied embedding) in bf16")
    args = p.parse_args(argv)
    config = QuantConfig(lm_head=not args.bf16_lm_head, embeddings=not args.bf16_lm_head)
    started = time.perf_counter()
    out, made = ensure_int8(args.src_dir, args.cache_root or args.src_dir.parent, config)
    print(f"{'quantized' if made else 'cached'}: {out} ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
