"""Turn an original checkpoint folder into a native transformers folder, one shard at a time.

The model modules (launch.chatglm3, launch.qwen) say how names, shapes and configs map; this
module does the reading, writing, caching and progress bar they share. Peak memory is about one
output shard (MAX_SHARD_BYTES) plus the tensor being converted: the 24 GiB machine cannot hold
Qwen-7B in float32, so the whole model is never in memory.

    python -m launch.convert chatglm3-6b|qwen-7b-chat SRC_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel

# Output shards this big keep the peak near 2 GiB + one source tensor.
MAX_SHARD_BYTES = 2 * 1024**3
MARKER = "conversion.json"
# Files besides the weights whose content decides the output.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "qwen.tiktoken")
MODULES = {"chatglm3-6b": "launch.chatglm3", "qwen-7b-chat": "launch.qwen"}

Rename = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class SourceError(Exception):
    """The original checkpoint folder is missing or incomplete. The message says how to fetch it."""


class ConversionError(Exception):
    """The checkpoint holds something this converter does not know how to map exactly."""


def convert_checkpoint(
    src: Path,
    out: Path,
    *,
    name: str,
    version: str,
    config: PretrainedConfig,
    model_class: type[PreTrainedModel],
    rename: Rename,
    write_extras: Callable[[Path], None],
    progress: bool = True,
) -> Path:
    """Convert `src` into `out` unless `out` already holds this exact source; return `out`.

    `rename` maps one original tensor to zero or more native (name, tensor) pairs and raises
    ConversionError for names it does not know. `write_extras` writes tokenizer and generation
    config into the folder being built. The folder appears atomically: a crash leaves no half
    folder behind that a later run would take for a finished one.
    """
    weights = weight_files(src, name)
    with exclusive(out):
        previous = read_marker(out)
        key, stats = fingerprint(src, weights, version, previous, progress)
        if previous is not None and previous.get("key") == key:
            if previous.get("stat") != stats:  # same content, touched files: skip hashing next time
                write_marker(out, {**previous, "stat": stats})
            return out
        partial = out.parent / f".{out.name}.partial"
        remove_ours(partial)
        partial.mkdir(parents=True)
        try:
            write_native(src, partial, weights, name, config, model_class, rename, progress)
            write_extras(partial)
            write_marker(partial, {"model": name, "source": str(src.resolve()), "key": key, "stat": stats})
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        replace(partial, out)
    return out


def write_native(src: Path, folder: Path, weights: list[Path], name: str, config: PretrainedConfig,
                 model_class: type[PreTrainedModel], rename: Rename, progress: bool) -> None:
    """Weights and config.json of the native model, streamed one source tensor at a time."""
    expected = expected_shapes(model_class, config)
    writer = ShardWriter(folder)
    total = sum(f.stat().st_size for f in weights)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {name}", disable=not progress) as bar:
        for file in weights:
            size, seen = file.stat().st_size, 0
            for src_name, tensor in read_shard(file):
                for new_name, new in rename(src_name, tensor):
                    check_shape(new_name, new, expected)
                    writer.add(new_name, new)
                step = min(tensor.nbytes, size - seen)
                seen += step
                bar.update(step)
            bar.update(size - seen)
    writer.finish()
    missing = sorted(set(expected) - set(writer.names))
    if missing:
        raise ConversionError(f"{src} lacks weights for {len(missing)} tensors, e.g. {missing[:3]}")
    config.save_pretrained(folder)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Two processes converting into the same folder take turns; the second finds the result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def weight_files(src: Path, name: str) -> list[Path]:
    """The source's weight files, checked to be all there; safetensors preferred over .bin."""
    fetch = f"Fetch it with `python -m launch.download {name}`"
    if not (src / "config.json").is_file():
        what = "does not exist" if not src.exists() else "has no config.json"
        raise SourceError(f"The {name} checkpoint folder {src} {what}. {fetch}.")
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [src / s for s in shard_names]
        elif (src / single).is_file():
            files = [src / single]
        else:
            continue
        if all(usable(f) for f in files):
            return files
        if index_name.startswith("model.safetensors") and (src / "pytorch_model.bin.index.json").is_file():
            continue  # an incomplete safetensors set next to a .bin set: try the .bin set
        bad = [f.name for f in files if not usable(f)]
        raise SourceError(
            f"The {name} checkpoint folder {src} is incomplete: {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''} missing or only a git-lfs pointer "
            f"(a clone needs `git lfs install` first). {fetch}."
        )
    raise SourceError(f"The {name} checkpoint folder {src} has no weights (*.safetensors or *.bin). {fetch}.")


def usable(file: Path) -> bool:
    # A clone without git-lfs leaves ~130-byte text pointers in place of the weights.
    return file.is_file() and file.stat().st_size > 1024


def read_config(src: Path, name: str, needs: tuple[str, ...] = ()) -> dict:
    """config.json of a source folder checked to be complete: weights and the files in `needs`."""
    weight_files(src, name)  # the folder's completeness is the first thing a user needs to hear
    missing = [n for n in needs if not (src / n).is_file()]
    if missing:
        raise SourceError(
            f"The {name} checkpoint folder {src} is incomplete: {', '.join(missing)} missing. "
            f"Fetch it with `python -m launch.download {name}`."
        )
    return json.loads((src / "config.json").read_text())


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard, read lazily so only what is held stays in memory."""
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield key, f.get_tensor(key)
        return
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "zipfile" not in str(e):
            raise
        state = torch.load(file, map_location="cpu", weights_only=True)  # pre-1.6 format cannot be mapped
    yield from state.items()
    del state


class ShardWriter:
    """Collects tensors and writes them as shards of at most `max_bytes`, named the way
    transformers names them: model-00001-of-00002.safetensors (or pytorch_model-*.bin) + index."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES, fmt: str = "safetensors") -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.prefix, self.ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.names: list[str] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or name in self.names:
            raise ConversionError(f"two source tensors map to {name}")
        if self.buffered and self.buffered + tensor.nbytes > self.max_bytes:
            self.flush()
        # safetensors refuses views sharing storage (q/k/v slices of one qkv tensor): own copies.
        if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        self.buffer[name] = tensor
        self.buffered += tensor.nbytes
        self.names.append(name)
        self.total += tensor.nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f"part-{len(self.files) + 1:05d}.{self.ext}"
        if self.ext == "safetensors":
            save_file(self.buffer, path, metadata={"format": "pt"})
        else:
            torch.save(self.buffer, path)
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / f"{self.prefix}.{self.ext}")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = f"{self.prefix}-{i:05d}-of-{len(self.files):05d}.{self.ext}"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / f"{self.prefix}.{self.ext}.index.json").write_text(json.dumps(index, indent=2))


def expected_shapes(model_class: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    # The meta device builds the module tree without allocating: the library says what it will load.
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shape(name: str, tensor: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
    if name not in expected:
        raise ConversionError(f"converted tensor {name} has no place in the native model")
    if tuple(tensor.shape) != expected[name]:
        raise ConversionError(f"{name}: shape {tuple(tensor.shape)} but the config implies {expected[name]}")


def fingerprint(
    src: Path, weights: list[Path], version: str, previous: dict | None, progress: bool
) -> tuple[str, list]:
    """Content hash of everything that decides the output, plus a stat signature of those files.

    Hashing ~15 GB takes a while, so an unchanged stat signature reuses the recorded hash; any
    change (a re-download, a `git pull`) falls back to reading the content.
    """
    files = sorted({*weights, *(src / n for n in SIDE_FILES if (src / n).is_file())})
    files += sorted(p for p in src.glob("*.index.json") if p not in files)
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if previous is not None and previous.get("stat") == stats and "key" in previous:
        return previous["key"], stats
    digest = hashlib.sha256(f"converter {version}\n".encode())
    total = sum(s[1] for s in stats)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing source", disable=not progress) as bar:
        for f in files:
            digest.update(f"{f.name} {f.stat().st_size}\n".encode())
            with f.open("rb") as fh:
                while chunk := fh.read(16 * 1024**2):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest(), stats


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, data: dict) -> None:
    (folder / MARKER).write_text(json.dumps(data, indent=2))


def remove_ours(folder: Path) -> None:
    """Delete a folder only if this module made it (a marker or a leftover .partial)."""
    if not folder.exists():
        return
    if folder.name.endswith(".partial") or (folder / MARKER).is_file():
        shutil.rmtree(folder)
        return
    raise ConversionError(f"refusing to overwrite {folder}: it is not a folder this converter wrote")


def replace(partial: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        remove_ours(out)
    elif out.exists():
        out.rmdir()
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    import importlib

    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODULES))
    parser.add_argument("src", type=Path, help="original checkpoint folder")
    parser.add_argument("out", type=Path, help="folder for the native checkpoint")
    args = parser.parse_args(argv)
    module = importlib.import_module(MODULES[args.model])
    # Run as `-m`, this file is __main__; the model modules raise launch.convert's classes.
    errors = importlib.import_module("launch.convert")
    try:
        print(module.convert(args.src, args.out))
    except (errors.SourceError, errors.ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
