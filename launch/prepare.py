"""Prepare every model of a profile into the model cache, once.

    python -m launch.prepare [--conf conf] [--profile demo]

A prepared model is a folder transformers loads natively. Conversions are cached under
the model cache dir by a key of their inputs, and published with an atomic rename, so an
interrupted run leaves nothing half-written and a second run converts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from launch import config
from launch.config import ConfigError, LocalSource, ModelConfig, OriginalSource, PypiGgufSource


class PrepareError(Exception):
    """A model could not be prepared; the message says why and what to do."""


def prepare(model: ModelConfig, cache_dir: Path) -> Path:
    """Return the folder to serve `model` from, converting (and quantizing) it first if not cached."""
    folder = _prepare_source(model, cache_dir)
    if model.quant == "int8":
        from launch.quantize import QuantConfig, QuantizeError, ensure_int8

        # One switch for both (a tied lm_head is the embedding table); part of the cache key.
        quant = QuantConfig(lm_head=model.quant_lm_head, embeddings=model.quant_lm_head)
        try:
            folder, _ = ensure_int8(folder, cache_dir / "models" / model.name, quant)
        except QuantizeError as e:
            raise PrepareError(f"model '{model.name}': {e}") from None
    return folder


def _prepare_source(model: ModelConfig, cache_dir: Path) -> Path:
    source = model.source
    if isinstance(source, LocalSource):
        return _check_local(model, source)
    if isinstance(source, PypiGgufSource):
        from launch import pypi_gguf

        # Keyed by the package, not the model name: models made from the same file share it.
        package = source.package.split("==")[0]
        out = cache_dir / "models" / package / f"{model.dtype}-{pypi_gguf.cache_key(source)}"
        return cached(out, lambda tmp: pypi_gguf.convert(source, model.dtype, cache_dir / "downloads", tmp))
    if isinstance(source, OriginalSource):
        return _convert_original(model, source, cache_dir)
    raise AssertionError(f"unhandled source kind {source.kind}")


def cached(out: Path, build: Callable[[Path], None]) -> Path:
    """`out` if it exists, else `build(tmp)` then publish tmp as `out` atomically."""
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():  # else another `make up` published the same result first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_original(model: ModelConfig, source: OriginalSource, cache_dir: Path) -> Path:
    import importlib

    from launch.convert import MODULES, ConversionError, SourceError

    src = (source.path or cache_dir / "sources" / source.kind).expanduser().resolve()
    # One conversion per source folder, shared by the models made from it (bf16 and int8, say);
    # the converter itself checks the folder's content and publishes its output atomically.
    out = cache_dir / "models" / source.kind / f"native-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"
    try:
        return importlib.import_module(MODULES[source.kind]).convert(src, out)
    except (SourceError, ConversionError) as e:
        raise PrepareError(f"model '{model.name}': {e}") from None


def _check_local(model: ModelConfig, source: LocalSource) -> Path:
    path = source.path.expanduser()
    if not (path / "config.json").is_file():
        raise PrepareError(
            f"model '{model.name}': {path} is not a transformers model folder (no config.json); "
            f"fix source.path in conf/models/{model.name}.yaml"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="conf", help="configuration folder (default: conf)")
    parser.add_argument("--profile", default=config.DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    try:
        deployment = config.load(args.conf, args.profile)
        for model in deployment.models:
            path = prepare(model, deployment.stack.model_cache_dir)
            print(f"{model.name}: {path}")
    except (ConfigError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
