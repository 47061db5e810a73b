"""Fetch an original checkpoint folder from ModelScope.

    python -m launch.download chatglm3-6b|qwen-7b-chat [--dir DIR]

The folder is the original release as published (remote code included, never run here); the
stack converts it once into native transformers classes. Default folder: where the model's
conf looks when it names no path, MODEL_CACHE_DIR/sources/NAME (conf/stack.yaml; $LLMD_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.config import ConfigError, load_stack
from launch.convert import SourceError, weight_files

REPOS = {"chatglm3-6b": "ZhipuAI/chatglm3-6b", "qwen-7b-chat": "qwen/Qwen-7B-Chat"}
# What the converters read; the rest of the release (remote code, docs) is left out. Weights
# as safetensors if the release has them, else as .bin (never both: twice the download).
SIDE = {"chatglm3-6b": ["tokenizer.model"], "qwen-7b-chat": ["qwen.tiktoken"]}
COMMON = ["config.json", "generation_config.json"]
WEIGHTS = (["*.safetensors", "model.safetensors.index.json"], ["*.bin", "pytorch_model.bin.index.json"])


class DownloadError(Exception):
    """The download did not produce a complete folder; the message says what to do instead."""


def default_dir(name: str, conf: Path = Path("conf")) -> Path:
    return load_stack(conf).model_cache_dir / "sources" / name


def download(name: str, folder: Path | None = None) -> Path:
    """Download `name` into `folder` (resuming a partial download) and check it is complete."""
    folder = folder or default_dir(name)
    repo = REPOS[name]
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise DownloadError("the modelscope package is missing: pip install modelscope") from None
    for weights in WEIGHTS:
        try:
            snapshot_download(repo, local_dir=str(folder), allow_patterns=COMMON + SIDE[name] + weights)
        except Exception as e:  # noqa: BLE001 (network, hub and disk failures all end the same way)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DownloadError(
                f"could not download {repo} from ModelScope into {folder}: {reason[:300]}\n"
                f"If this machine cannot reach ModelScope, fetch the folder elsewhere with "
                f"`python -m launch.download {name} --dir DIR` (or `git lfs install && "
                f"git clone https://www.modelscope.cn/{repo}.git`), copy it here, and point the "
                f"model's path at it."
            ) from None
        try:
            weight_files(folder, name)
            return folder
        except SourceError as e:
            problem = e
    raise DownloadError(f"the download finished but the folder is not usable: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.download", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(REPOS))
    parser.add_argument("--dir", type=Path, help="target folder (default: MODEL_CACHE_DIR/sources/MODEL)")
    parser.add_argument("--conf", type=Path, default=Path("conf"), help="configuration folder (default: conf)")
    args = parser.parse_args(argv)
    try:
        print(download(args.model, args.dir or default_dir(args.model, args.conf)))
    except (DownloadError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
