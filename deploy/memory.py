"""Pre-flight memory check: will the profile's workers fit? Estimated from the prepared model
folders before anything starts, so that the kernel never OOM-kills a worker halfway through
loading (this machine class has no swap)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil
from safetensors import safe_open

from launch.config import Deployment, ModelConfig

GiB = 1024**3
WORKER_OVERHEAD = int(0.6 * GiB)  # torch, tokenizer, activations: a demo worker's RSS minus its weights
STACK_OVERHEAD = 1 * GiB  # controller, API server, web UI
BYTES = {"bfloat16": 2, "float32": 4}


class MemoryCheckError(Exception):
    pass


@dataclass(frozen=True)
class Estimate:
    model: str
    weights: int
    kv_cache: int
    context: int
    dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + WORKER_OVERHEAD

    def describe(self) -> str:
        return (f"{self.model:<24} {self.weights / GiB:5.1f} GiB weights ({self.dtype}) + {self.kv_cache / GiB:4.1f} GiB "
                f"KV cache ({self.context} tokens) + {WORKER_OVERHEAD / GiB:.1f} GiB overhead = {self.total / GiB:5.1f} GiB")


def check(deployment: Deployment, model_dirs: dict[str, Path], running: list[psutil.Process]) -> list[Estimate]:
    """Raise MemoryCheckError, with the numbers and what to change, if the profile does not fit
    in `stack.memory_limit_gib` or else in the memory available now plus what the stack's own
    `running` processes hold (an update replaces them)."""
    estimates = [estimate(w.model, model_dirs[w.model.name]) for w in deployment.workers()]
    needed = sum(e.total for e in estimates) + STACK_OVERHEAD
    limit_gib = deployment.stack.memory_limit_gib
    if limit_gib is not None:
        limit, source = int(limit_gib * GiB), "stack.memory_limit_gib"
    else:
        limit, source = psutil.virtual_memory().available + _rss(running), "available on this machine"
    if needed > limit:
        lines = "\n".join(f"  {e.describe()}" for e in estimates)
        raise MemoryCheckError(
            f"profile '{deployment.profile}' needs about {needed / GiB:.1f} GiB, but {limit / GiB:.1f} GiB is "
            f"{source}:\n{lines}\n  {'rest of the stack':<24} {STACK_OVERHEAD / GiB:.1f} GiB\n"
            f"Start fewer models at once (a smaller profile), lower context_length or concurrency, "
            f"or quantize a model (quant: int8 in its conf/models/NAME.yaml halves its weights)."
        )
    return estimates


def estimate(model: ModelConfig, folder: Path) -> Estimate:
    config = json.loads((folder / "config.json").read_text())
    per = BYTES[model.dtype]
    files = list(folder.glob("*.safetensors"))
    # int8 folders are served as stored (int8 weights, their scales, the rest in bf16).
    weights = sum(_stored_bytes(f) for f in files) if model.quant == "int8" else sum(_elements(f) for f in files) * per
    layers = config.get("num_hidden_layers", 0)
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    context = model.context_length or config.get("max_position_embeddings") or 2048
    kv = 2 * layers * kv_heads * head_dim * context * per * model.concurrency
    return Estimate(model.name, weights, kv, context, "int8" if model.quant == "int8" else model.dtype)


def _elements(file: Path) -> int:
    total = 0
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


STORED = {"I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def _stored_bytes(file: Path) -> int:
    with safe_open(file, framework="pt") as f:
        total = 0
        for key in f.keys():
            s = f.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            total += n * STORED.get(s.get_dtype(), 4)
    return total


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total
