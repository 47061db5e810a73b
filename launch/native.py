"""Builds the small C++ kernels (int8 matmul, decode attention, decoder layer ops) on first use.

    module = native.load("llmd_int8", SOURCE, ["int8_gemv"], fallback="_weight_int8pack_mm", env="LLMD_INT8_KERNELS")
    native.cpu_isa()   # "avx512", "avx2" or None: the instruction set a kernel may be written for here
    SOURCE = native.VECTOR_HELPERS + "..."   # vec, W, vload/vfma/vexp...: one source for both sets

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


# The start of a kernel source written once for AVX-512 (16 floats a vector) and AVX2 (8): the
# few vector helpers the kernels use (launch/attention.py, launch/decode_layer.py), chosen by the
# instruction set g++ compiles for (CFLAGS).
VECTOR_HELPERS = r"""
#include <torch/extension.h>
#include <immintrin.h>

#ifdef __AVX512F__
using vec = __m512;
constexpr int W = 16;
static inline vec load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
static inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec scale_pow2(vec p, vec n, vec x) {  // p * 2^n where x >= -87, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(-87.f), _CMP_GE_OQ), _mm512_scalef_ps(p, n));
}
#else
using vec = __m256;
constexpr int W = 8;
static inline vec load_bf16(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float hmax(vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vround(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec scale_pow2(vec p, vec n, vec x) {  // p * 2^n where x >= -87 (so n >= -126: a normal float), else 0
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, vset(-87.f), _CMP_GE_OQ));
}
#endif

static inline vec vexp(vec x) {  // e^x for x <= 0, relative error ~1e-7; 0 below -87
  const vec in = x;
  x = vmax(x, vset(-87.f));
  const vec t = vmul(x, vset(1.44269504088896341f));
  const vec n = vround(t);
  const vec f = vsub(t, n);  // 2^t = 2^n * 2^f, |f| <= 0.5: Taylor series of e^(f ln 2)
  vec p = vset(1.5403530393381606e-4f);
  p = vfmadd(p, f, vset(1.3333558146428443e-3f));
  p = vfmadd(p, f, vset(9.6181291076284772e-3f));
  p = vfmadd(p, f, vset(5.5504108664821580e-2f));
  p = vfmadd(p, f, vset(2.4022650695910071e-1f));
  p = vfmadd(p, f, vset(6.9314718055994531e-1f));
  p = vfmadd(p, f, vset(1.f));
  return scale_pow2(p, n, in);
}
"""
