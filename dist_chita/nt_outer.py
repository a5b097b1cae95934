"""Sample-minor sums of outer products written with non-temporal (streaming) stores, on x86 CPUs.

    out[(i K + j) * ldo + s] = sum_l a[i, l, s] * c[j, l, s],   a: (M, L, B), c: (K, L, B), s < B

This is the per-sample weight gradient of a layer laid out sample-minor (:mod:`dist_chita.persample`): s runs
over the B samples of a micro-batch, i over output and j over input coordinates, l over the few output
positions of a convolution (L = 1 for a Linear layer). Such an output is written once and not read again
soon, and it is large (B times the layer's weights). With ordinary stores every written cache line is first
read from memory (read for ownership), so writing costs two transfers: on the 2-core AMD EPYC development
machine ``torch.mul`` writes the outer products at 14-16 GB/s, a store-only fill at about 23 GB/s, and
streaming stores, which skip that read, at 28 GB/s.

PyTorch has no CPU operator with streaming stores, so this module compiles a few lines of C (AVX-512 or
AVX2 intrinsics) with the system C compiler on first use, caches the shared library under
``$DIST_CHITA_CACHE`` (default ``~/.cache/dist_chita``) keyed by the source, the flags and the CPU, and
calls it through ctypes, which releases the GIL (with several torch threads the i range is split among
Python threads). :func:`outer_sum` returns False when it cannot help, and the caller then uses torch:
not a CPU float32 tensor, no compiler, not x86, or ``DIST_CHITA_NATIVE=0``. GPUs never take this path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#if defined(__AVX512F__)
#define W 16
#define VEC __m512
#define LOAD _mm512_loadu_ps
#define MUL _mm512_mul_ps
#define FMA _mm512_fmadd_ps
#define STREAM _mm512_stream_ps
#define ALIGN 63
#elif defined(__AVX2__) && defined(__FMA__)
#define W 8
#define VEC __m256
#define LOAD _mm256_loadu_ps
#define MUL _mm256_mul_ps
#define FMA _mm256_fmadd_ps
#define STREAM _mm256_stream_ps
#define ALIGN 31
#else
#error "needs AVX2+FMA or AVX-512"
#endif

static float one(const float* ai, const float* cj, int64_t L, int64_t B, int64_t s) {
  float acc = 0.f;
  for (int64_t l = 0; l < L; l++) acc += ai[l * B + s] * cj[l * B + s];
  return acc;
}

/* out[(i K + j) ldo + s] = sum_{l < L} a[(i L + l) B + s] c[(j L + l) B + s] for i0 <= i < i1, j < K, s < B.
   c is taken in blocks of about 16 KiB (L1-resident while every i uses them). Whole vectors at vector-aligned
   addresses are streamed, two at a time (two independent sums over l); the rest of a row is stored the
   ordinary way. */
void outer_sum(const float* a, const float* c, float* out, int64_t i0, int64_t i1, int64_t K, int64_t L,
               int64_t B, int64_t ldo) {
  int64_t JB = 4096 / (L * B);
  if (JB < 1) JB = 1;
  for (int64_t j0 = 0; j0 < K; j0 += JB) {
    int64_t j1 = j0 + JB < K ? j0 + JB : K;
    for (int64_t i = i0; i < i1; i++) {
      const float* ai = a + i * L * B;
      for (int64_t j = j0; j < j1; j++) {
        const float* cj = c + j * L * B;
        float* o = out + (i * K + j) * ldo;
        int64_t s = 0;
        for (; s < B && (((uintptr_t)(o + s)) & ALIGN); s++) o[s] = one(ai, cj, L, B, s);
        for (; s + 2 * W <= B; s += 2 * W) {
          VEC acc0 = MUL(LOAD(ai + s), LOAD(cj + s)), acc1 = MUL(LOAD(ai + s + W), LOAD(cj + s + W));
          for (int64_t l = 1; l < L; l++) {
            acc0 = FMA(LOAD(ai + l * B + s), LOAD(cj + l * B + s), acc0);
            acc1 = FMA(LOAD(ai + l * B + s + W), LOAD(cj + l * B + s + W), acc1);
          }
          STREAM(o + s, acc0);
          STREAM(o + s + W, acc1);
        }
        for (; s + W <= B; s += W) {
          VEC acc = MUL(LOAD(ai + s), LOAD(cj + s));
          for (int64_t l = 1; l < L; l++) acc = FMA(LOAD(ai + l * B + s), LOAD(cj + l * B + s), acc);
          STREAM(o + s, acc);
        }
        for (; s < B; s++) o[s] = one(ai, cj, L, B, s);
      }
    }
  }
  _mm_sfence();
}
"""
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99"]
_I64 = ctypes.c_int64
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_pool: ThreadPoolExecutor | None = None


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the machine and its CPU's model and flags."""
    key = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0].splitlines(True)
        key += "".join(line for line in first_cpu if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return key


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("DIST_CHITA_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    digest = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DIST_CHITA_CACHE") or Path.home() / ".cache" / "dist_chita")
    path = cache / f"nt_outer-{digest}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks may build at once: each its own file
                src, so = Path(tmp) / "nt_outer.c", Path(tmp) / "nt_outer.so"
                src.write_text(_SOURCE)
                subprocess.run([cc, *_FLAGS, str(src), "-o", str(so)], check=True, capture_output=True, timeout=120)
                os.replace(so, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("streaming-store kernel unavailable (%s); using torch", e)
        return False
    lib.outer_sum.restype = None
    lib.outer_sum.argtypes = [ctypes.c_void_p] * 3 + [_I64] * 6
    return lib


def available() -> bool:
    """Whether the compiled kernel can be used on this machine (builds it on the first call)."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib is not False


def outer_sum(a: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> bool:
    """out (M K, B) = sum_l a[:, l, :] (x) c[:, l, :] sample-minor (row i K + j, column s), written with
    streaming stores. a: (M, L, B) and c: (K, L, B), contiguous float32; out: float32 with unit stride along
    its columns (any row stride, e.g. columns of a larger array), all on the CPU. Returns False, writing
    nothing, when the kernel does not apply or is unavailable."""
    M, L, B = a.shape
    K = c.shape[0]
    if not (
        a.device.type == c.device.type == out.device.type == "cpu"
        and a.dtype == c.dtype == out.dtype == torch.float32
        and a.is_contiguous()
        and c.is_contiguous()
        and c.shape[1:] == (L, B)
        and out.shape == (M * K, B)
        and (B == 1 or out.stride(1) == 1)
        and out.stride(0) >= B
        and available()
    ):
        return False
    args = (a.data_ptr(), c.data_ptr(), out.data_ptr())
    threads = min(torch.get_num_threads(), M)
    if threads <= 1:
        _lib.outer_sum(*args, 0, M, K, L, B, out.stride(0))
        return True
    global _pool
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(threads)
    bounds = [M * t // threads for t in range(threads + 1)]
    jobs = [
        _pool.submit(_lib.outer_sum, *args, bounds[t], bounds[t + 1], K, L, B, out.stride(0)) for t in range(threads)
    ]
    for job in jobs:
        job.result()
    return True
