"""Writes with non-temporal (streaming) stores on x86 CPUs: the per-sample gradients and the factor's columns.

Two kernels, for outputs that are large, written once and not read again soon:

* :func:`outer_sum`: sample-minor sums of outer products,
  ``out[(i K + j) * ldo + s] = sum_l a[i, l, s] * c[j, l, s]`` (a: (M, L, B), c: (K, L, B), s < B): the per-sample
  weight gradient of a layer laid out sample-minor (:mod:`dist_chita.fisher.persample`; s runs over the B samples of a
  micro-batch, i over output and j over input coordinates, l over the few output positions of a convolution,
  L = 1 for a Linear layer);
* :func:`copy_into`: ``dst.copy_(src)`` for float32 (R, C) tensors whose rows of dst are contiguous, with src's
  rows contiguous too (a row copy) or its columns contiguous (a transposing copy, through 16 x 16 register
  transposes; 8 x 8 with AVX2): the column exchange's writes into At and its send buffer
  (:mod:`dist_chita.fisher.factor`).

With ordinary stores every written cache line is first read from memory (read for ownership), so writing costs
two transfers: on the 2-core AMD EPYC development machine ``torch.mul`` writes the outer products at 14-16 GB/s, a
store-only fill at about 23 GB/s, and streaming stores, which skip that read, at 28 GB/s. ``Tensor.copy_`` of a
transposed (b, numel) block into At's columns runs at 2-2.5 GB/s, the kernel at 10-18 GB/s (b = 16-32).

PyTorch has no CPU operator with streaming stores, so this module compiles a few lines of C (AVX-512 or
AVX2 intrinsics) with the system C compiler on first use, caches the shared library under
``$DIST_CHITA_CACHE`` (default ``~/.cache/dist_chita``) keyed by the source, the flags and the CPU, and
calls it through ctypes, which releases the GIL (with several torch threads the rows are split among
Python threads). Each function returns False when it cannot help, writing nothing, and the caller then uses
torch: not CPU float32 tensors of the layouts above, no compiler, not x86, or ``DIST_CHITA_NATIVE=0``. GPUs never
take this path.
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

/* dst[r ldd + c] = src[r sr + c] for r0 <= r < r1, c < C (a row copy); vector-aligned whole vectors streamed. */
void copy_rows(const float* src, float* dst, int64_t r0, int64_t r1, int64_t C, int64_t sr, int64_t ldd) {
  for (int64_t r = r0; r < r1; r++) {
    const float* s = src + r * sr;
    float* d = dst + r * ldd;
    int64_t c = 0;
    for (; c < C && (((uintptr_t)(d + c)) & ALIGN); c++) d[c] = s[c];
    for (; c + W <= C; c += W) STREAM(d + c, LOAD(s + c));
    for (; c < C; c++) d[c] = s[c];
  }
  _mm_sfence();
}

#if defined(__AVX512F__)
/* the 16 x 16 block in r[0..15] (row i in r[i]) transposed in place */
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

/* dst[r ldd + c] = src[r + c sc] for r0 <= r < r1, c < C (a transposing copy), in 16 x 16 blocks */
void copy_t(const float* src, float* dst, int64_t r0, int64_t r1, int64_t C, int64_t sc, int64_t ldd) {
  for (int64_t rb = r0; rb < r1; rb += 16) {
    int64_t rn = r1 - rb < 16 ? r1 - rb : 16;
    __mmask16 rm = (__mmask16)((1u << rn) - 1);
    for (int64_t cb = 0; cb < C; cb += 16) {
      int64_t cn = C - cb < 16 ? C - cb : 16;
      __m512 v[16];
      for (int64_t c = 0; c < 16; c++)
        v[c] = c < cn ? _mm512_maskz_loadu_ps(rm, src + (cb + c) * sc + rb) : _mm512_setzero_ps();
      transpose16(v);
      for (int64_t r = 0; r < rn; r++) {
        float* d = dst + (rb + r) * ldd + cb;
        if (cn == 16 && !(((uintptr_t)d) & 63)) _mm512_stream_ps(d, v[r]);
        else _mm512_mask_storeu_ps(d, (__mmask16)((1u << cn) - 1), v[r]);
      }
    }
  }
  _mm_sfence();
}
#else
/* the 8 x 8 block in r[0..7] (row i in r[i]) transposed in place */
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; i++) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}

/* as the AVX-512 copy_t, in 8 x 8 blocks; partial blocks (the last rows or columns) element by element */
void copy_t(const float* src, float* dst, int64_t r0, int64_t r1, int64_t C, int64_t sc, int64_t ldd) {
  for (int64_t rb = r0; rb < r1; rb += 8) {
    int64_t rn = r1 - rb < 8 ? r1 - rb : 8;
    for (int64_t cb = 0; cb < C; cb += 8) {
      int64_t cn = C - cb < 8 ? C - cb : 8;
      if (rn < 8 || cn < 8) {
        for (int64_t r = 0; r < rn; r++)
          for (int64_t c = 0; c < cn; c++) dst[(rb + r) * ldd + cb + c] = src[(cb + c) * sc + rb + r];
        continue;
      }
      __m256 v[8];
      for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_ps(src + (cb + c) * sc + rb);
      transpose8(v);
      for (int r = 0; r < 8; r++) {
        float* d = dst + (rb + r) * ldd + cb;
        if (((uintptr_t)d) & 31) _mm256_storeu_ps(d, v[r]);
        else _mm256_stream_ps(d, v[r]);
      }
    }
  }
  _mm_sfence();
}
#endif
"""
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
_I64 = ctypes.c_int64
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


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


def _build(arch: str = "native") -> ctypes.CDLL | bool:
    """The compiled library for ``-march=arch`` (built, or loaded from the cache), or False. The tests also build
    it for an AVX2-only architecture (``haswell``) to check that variant on an AVX-512 machine."""
    if os.environ.get("DIST_CHITA_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    flags = [f"-march={arch}", *_FLAGS]
    digest = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DIST_CHITA_CACHE") or Path.home() / ".cache" / "dist_chita")
    path = cache / f"ntstore-{digest}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks may build at once: each its own file
                src, so = Path(tmp) / "ntstore.c", Path(tmp) / "ntstore.so"
                src.write_text(_SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(so)], check=True, capture_output=True, timeout=120)
                os.replace(so, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("streaming-store kernel unavailable (%s); using torch", e)
        return False
    lib.outer_sum.restype = None
    lib.outer_sum.argtypes = [ctypes.c_void_p] * 3 + [_I64] * 6
    lib.copy_rows.restype = None
    lib.copy_rows.argtypes = [ctypes.c_void_p] * 2 + [_I64] * 5
    lib.copy_t.restype = None
    lib.copy_t.argtypes = [ctypes.c_void_p] * 2 + [_I64] * 5
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
    _split(_lib.outer_sum, (a.data_ptr(), c.data_ptr(), out.data_ptr()), M, (K, L, B, out.stride(0)))
    return True


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """``dst.copy_(src)`` with streaming stores. dst: (R, C) float32 with unit stride along its columns (any row
    stride, e.g. a column block of At); src: (R, C) float32 with unit stride along its columns (a row copy) or
    along its rows (a transposing copy), on the CPU, not overlapping dst. Returns False, writing
    nothing, when the kernel does not apply or is unavailable."""
    R, C = dst.shape
    if not (
        src.shape == dst.shape
        and R * C > 0
        and dst.device.type == src.device.type == "cpu"
        and dst.dtype == src.dtype == torch.float32
        and (C == 1 or dst.stride(1) == 1)
        and (R == 1 or dst.stride(0) >= C)
        and available()
    ):
        return False
    if C == 1 or src.stride(1) == 1:
        fn, sr = _lib.copy_rows, src.stride(0)
    elif R == 1 or src.stride(0) == 1:
        fn, sr = _lib.copy_t, src.stride(1)
    else:
        return False
    _split(fn, (src.data_ptr(), dst.data_ptr()), R, (C, sr, dst.stride(0)))
    return True


def _split(fn, pointers: tuple, rows: int, rest: tuple) -> None:
    """fn(*pointers, r0, r1, *rest) over rows [0, rows), split among torch's threads (ctypes releases the GIL)."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1:
        fn(*pointers, 0, rows, *rest)
        return
    global _pool, _pool_pid
    if _pool is None or _pool._max_workers < threads or _pool_pid != os.getpid():  # a forked child has no workers
        _pool, _pool_pid = ThreadPoolExecutor(threads), os.getpid()
    bounds = [rows * t // threads for t in range(threads + 1)]
    jobs = [_pool.submit(fn, *pointers, bounds[t], bounds[t + 1], *rest) for t in range(threads)]
    for job in jobs:
        job.result()
