"""Builds the small C++ kernels (int8 matmul, decode attention) on first use.

    module = native.load("llmd_int8", SOURCE, ["int8_gemv"], fallback="_weight_int8pack_mm", env="LLMD_INT8_KERNELS")
    native.cpu_isa()   # "avx512", "avx2" or None: the instruction set a kernel may be written for here

Compiled with g++ through torch.utils.cpp_extension into torch's extension directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions: ~30 s once per source version; the
directory's lock file serialises workers that build at the same time). Returns None, after a
warning that names the slower path used instead, when this machine cannot build or run them: a
kernel is a speed-up, never a reason for a model not to serve.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# What g++ may use for each instruction set a kernel is written for. AVX2 comes with FMA on every
# CPU that has it (Intel since Haswell, AMD since Zen), and torch reports AVX2 only with FMA.
CFLAGS = {
    "avx512": ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp"],
    "avx2": ["-O3", "-mavx2", "-mfma", "-fopenmp"],
}


def load(name: str, source: str, functions: list[str], fallback: str, env: str, logger: logging.Logger = log,
         isa: str = "avx512") -> ModuleType | None:
    """The compiled extension, or None (then the caller runs `fallback`); `env`=0 turns it off.
    `isa`: the instruction set `source` is written for (a key of CFLAGS)."""
    if os.environ.get(env, "1") == "0":
        return None
    if (missing := cannot_build(isa)) is not None:
        logger.warning("%s: %s; using the slower %s", name, missing, fallback)
        return None
    from torch.utils.cpp_extension import load_inline

    # torch runs `ninja` from PATH; the venv's own (the `ninja` package) is on it only when the
    # venv is activated, which supervisor's programs are not.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    logger.info("%s: loading the kernel (compiled with %s on first use, ~30 s)", name, _compiler())
    _remove_stale_lock(name, logger)
    try:
        # -fopenmp: at::parallel_for's OpenMP pragma; torch's own libgomp is already loaded.
        return load_inline(name=name, cpp_sources=[source], functions=functions, extra_cflags=CFLAGS[isa],
                           extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - a broken toolchain must not stop the model from serving
        logger.warning("%s: building the kernel failed (%s: %s); using the slower %s",
                       name, type(e).__name__, str(e).strip()[-500:], fallback)
        return None


_NAMES = {"avx512": "AVX-512", "avx2": "AVX2"}


def cpu_isa() -> str | None:
    """The widest instruction set of CFLAGS that this CPU has (as torch detects it), or None."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())


def cannot_build(isa: str = "avx512") -> str | None:
    """Why kernels written for `isa` (AVX-512 kernels run on AVX-512 CPUs, AVX2 ones on both) cannot be
    built and run here, or None when they can."""
    have = cpu_isa()
    if have is None or (isa == "avx512" and have != "avx512"):
        return f"this CPU has no {_NAMES[isa]} (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler ({_compiler()!r} not found; install g++) to build the kernel"
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


# A build takes ~30 s; a lock older than this was left by a build that was killed (torch waits
# for such a lock forever, and so would every worker starting after it).
STALE_LOCK_S = 600


def _remove_stale_lock(name: str, logger: logging.Logger) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        lock = os.path.join(_get_build_directory(name, False), "lock")
        age = time.time() - os.stat(lock).st_mtime
    except OSError:  # no lock: the usual case
        return
    if age > STALE_LOCK_S:
        logger.warning("%s: removing a build lock left %.0f s ago by a build that did not finish (%s)", name, age, lock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
