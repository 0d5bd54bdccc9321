"""A fused dequantize + GEMV for weight-only Linears on CPU, built for the machine it runs on.

Decode reads every weight once per token for one row (or a few) of activations: it is bound by
memory bandwidth, so int8 weights (1 byte) should run about 4x faster than float32 ones and
packed int4 (half a byte) 8x. The library kernels do not get there on every CPU: on an AVX-512
AMD EPYC without AMX, ``aten._weight_int8pack_mm`` with float32 activations moves 0.4 GB/s
against float32 ``F.linear``'s 13.5 GB/s at M=1 (5632 x 2048, two threads). This kernel
streams the int8 (or packed int4) weights through registers, converts them to float32 there
and multiplies them into float32 activations, so the weights never exist as floats in memory::

    int8, per output channel:  y[m, o] = s[o] * sum_k x[m, k] * q[o, k]
    int4, groups of G:         y[m, o] = sum_g s[o, g] * (sum_{k in g} x[m, k] * q[o, k] - z[o, g] * sum_{k in g} x[m, k])

(packed int4: byte j of a group holds k = j in its low nibble and k = j + G/2 in its high one,
so both halves are contiguous runs the compiler vectorizes.) Rows are computed per output row,
whose weights stay in L1 across the activation rows, in parallel over output rows. With more
than 16 rows (a prefill) the work is compute-bound: blocks of 512 output rows are dequantized
to float32 one at a time and multiplied by PyTorch's GEMM.

It is C++ compiled at first use with ``torch.utils.cpp_extension`` (``-O3 -march=native``:
the vector instructions of this CPU; the build is cached per CPU in torch's extension
directory, about a minute once) and registered as ``torch.ops.fxopt_gemv.*`` through
``torch.library``. Without a C++ compiler, or with ``FXOPT_NATIVE_KERNELS=0``, it is simply not
available, and the weight-only lowering's measured choice picks among the others.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int64_t kTile = 4;  // activation rows that share one pass over a weight row
constexpr int64_t kGemmRows = 16;  // above: dequantized blocks and a GEMM
constexpr int64_t kBlock = 512;  // output rows dequantized at a time

// acc[r] += sum_k x[r][k] * q[k] for the rows r < rows of a tile, k < K; q int8.
static inline void dot_int8(const int8_t* q, const float* const* x, int64_t rows, int64_t K, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__)
  // Four independent accumulators per row: one FMA chain would wait on its own latency.
  __m512 acc[kTile][4];
  for (int64_t r = 0; r < kTile; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    __m512 w[4];
    for (int c = 0; c < 4; ++c)
      w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k + 16 * c))));
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x[r] + k + 16 * c), w[c], acc[r][c]);
  }
  for (; k + 16 <= K; k += 16) {
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k))));
    for (int64_t r = 0; r < rows; ++r) acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x[r] + k), w, acc[r][0]);
  }
  for (int64_t r = 0; r < rows; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
#else
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.f;
#endif
  for (; k < K; ++k)
    for (int64_t r = 0; r < rows; ++r) out[r] += x[r][k] * (float)q[k];
}

// One output row of packed int4 in groups of G: byte j of a group holds value j (low nibble)
// and value j + G/2 (high). out[r] = sum_g s[g] * sum_{k in g} x[r][k] * q[k]; the zero points
// are applied by the caller. The scaled group sums stay in vector registers across groups.
#if defined(__AVX512F__)
// R activation rows at once (a compile-time count, so the accumulators stay in registers),
// four independent FMA chains per row (low and high nibbles of two 16-byte loads): with one
// chain the loop waits on the FMA latency and reads the weights at a third of the speed.
template <int R>
static inline void dot_int4_rows(const uint8_t* q, const float* s, const float* const* x, int64_t K,
                                 int64_t G, float* out) {
  const int64_t half = G / 2, groups = K / G;
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * half;
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= half; j += 32) {
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(qg + j));
      const __m128i b1 = _mm_loadu_si128((const __m128i*)(qg + j + 16));
      const __m512 lo0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b0, mask)));
      const __m512 hi0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b0, 4), mask)));
      const __m512 lo1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b1, mask)));
      const __m512 hi1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b1, 4), mask)));
      for (int r = 0; r < R; ++r) {
        const float* xg = x[r] + g * G + j;
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xg), lo0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + half), hi0, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 16), lo1, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + half + 16), hi1, acc[r][3]);
      }
    }
    if (j < half) {  // half is a multiple of 16: one 16-byte load left
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(qg + j));
      const __m512 lo0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b0, mask)));
      const __m512 hi0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b0, 4), mask)));
      for (int r = 0; r < R; ++r) {
        const float* xg = x[r] + g * G + j;
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xg), lo0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + half), hi0, acc[r][1]);
      }
    }
    const __m512 scale = _mm512_set1_ps(s[g]);
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
      total[r] = _mm512_fmadd_ps(sum, scale, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(total[r]);
}
#endif

static inline void dot_int4(const uint8_t* q, const float* s, const float* const* x, int64_t rows,
                            int64_t K, int64_t G, float* out) {
  const int64_t half = G / 2, groups = K / G;
#if defined(__AVX512F__)
  if (half % 16 == 0) {
    switch (rows) {
      case 1: return dot_int4_rows<1>(q, s, x, K, G, out);
      case 2: return dot_int4_rows<2>(q, s, x, K, G, out);
      case 3: return dot_int4_rows<3>(q, s, x, K, G, out);
      default: return dot_int4_rows<4>(q, s, x, K, G, out);
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * half;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xg = x[r] + g * G;
      float acc = 0.f;
      for (int64_t j = 0; j < half; ++j) acc += xg[j] * (float)(qg[j] & 15) + xg[half + j] * (float)(qg[j] >> 4);
      out[r] += s[g] * acc;
    }
  }
}

// body(o, rows, count, m0) for every output row o and every tile of up to kTile activation rows
// (rows[r] = x[m0 + r]), in parallel over output rows: a weight row is read once per tile.
template <typename Body>
static void for_each_tile(const float* xp, int64_t M, int64_t N, int64_t K, Body&& body) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const float* rows[kTile];
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const int64_t count = std::min(kTile, M - m0);
      for (int64_t r = 0; r < count; ++r) rows[r] = xp + (m0 + r) * K;
      for (int64_t o = begin; o < end; ++o) body(o, rows, count, m0);
    }
  });
}

// x [..., K] -> [..., N]: a graph calls the ops on its activations as they are.
static std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return sizes;
}

static at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s);
static at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                            int64_t G);

// y[..., N] = s[N] * (x[..., K] . q[N, K]^T), q int8.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == q.size(1), "x's last dimension must be q's in features");
  return int8_rows(x.reshape({-1, q.size(1)}).contiguous(), q, s).view(out_sizes(x, q.size(0)));
}

// Packed int4 in groups of G: q[N, K / 2] uint8, sz [2, N, K / G] float (scales, zero points).
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, int64_t G) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == q.size(1) * 2, "x's last dimension must be q's in features");
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == 2, "sz must stack the scales and the zero points");
  return int4_rows(x.reshape({-1, x.size(-1)}).contiguous(), q, sz.select(0, 0), sz.select(0, 1), G)
      .view(out_sizes(x, q.size(0)));
}

static at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.dtype() == at::kFloat && q.dtype() == at::kChar && s.dtype() == at::kFloat, "dtypes");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(), "contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && s.numel() == N, "shapes");
  if (M > kGemmRows) {
    // Many rows (a prefill): compute-bound, so a GEMM over float32 blocks of the weight, each
    // dequantized just before use (a block of kBlock output rows, not the whole weight).
    at::Tensor y = at::empty({M, N}, x.options());
    for (int64_t o0 = 0; o0 < N; o0 += kBlock) {
      const int64_t rows = std::min(kBlock, N - o0);
      at::Tensor w = q.narrow(0, o0, rows).to(at::kFloat).mul_(s.narrow(0, o0, rows).unsqueeze(1));
      y.narrow(1, o0, rows).copy_(at::mm(x, w.t()));
    }
    return y;
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_tile(xp, M, N, K, [&](int64_t o, const float* const* rows, int64_t count, int64_t m0) {
    float out[kTile];
    dot_int8(qp + o * K, rows, count, K, out);
    for (int64_t r = 0; r < count; ++r) yp[(m0 + r) * N + o] = out[r] * sp[o];
  });
  return y;
}

static at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                            int64_t G) {
  TORCH_CHECK(x.dtype() == at::kFloat && q.dtype() == at::kByte && s.dtype() == at::kFloat
              && z.dtype() == at::kFloat, "dtypes");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous() && z.is_contiguous(), "contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(G > 0 && K % G == 0 && G % 2 == 0 && q.size(1) * 2 == K && s.size(1) == K / G, "shapes");
  const int64_t groups = K / G;
  if (M > kGemmRows) {
    // A prefill: as int8, a GEMM over blocks of the weight dequantized to float32 just before use.
    const int64_t half = G / 2;
    at::Tensor y = at::empty({M, N}, x.options());
    for (int64_t o0 = 0; o0 < N; o0 += kBlock) {
      const int64_t rows = std::min(kBlock, N - o0);
      at::Tensor bytes = q.narrow(0, o0, rows).view({rows, groups, 1, half});
      at::Tensor w = at::cat({bytes.bitwise_and(15), bytes.bitwise_right_shift(4)}, 2).to(at::kFloat).view({rows, groups, G});
      w.sub_(z.narrow(0, o0, rows).unsqueeze(2)).mul_(s.narrow(0, o0, rows).unsqueeze(2));
      y.narrow(1, o0, rows).copy_(at::mm(x, w.view({rows, K}).t()));
    }
    return y;
  }
  // Each group's sum of activations, for the zero points: [M, groups].
  at::Tensor xsum = x.view({M, groups, G}).sum(-1).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_tile(xp, M, N, K, [&](int64_t o, const float* const* rows, int64_t count, int64_t m0) {
    float out[kTile];
    dot_int4(qp + o * (K / 2), sp + o * groups, rows, count, K, G, out);
    for (int64_t r = 0; r < count; ++r) {
      float offset = 0.f;  // the zero points: sum_g s[g] z[g] sum_{k in g} x[k]
      for (int64_t g = 0; g < groups; ++g) offset += sp[o * groups + g] * zp[o * groups + g] * xs[(m0 + r) * groups + g];
      yp[(m0 + r) * N + o] = out[r] - offset;
    }
  });
  return y;
}

TORCH_LIBRARY(fxopt_gemv, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor s) -> Tensor", &int8_gemv);
  m.def("int4_gemv(Tensor x, Tensor q, Tensor sz, int G) -> Tensor", &int4_gemv);
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def available() -> bool:
    """Whether the kernel is built (building it now if it was not tried yet in this process)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return bool(_state["ok"])


def _build() -> bool:
    if os.environ.get("FXOPT_NATIVE_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        from fxopt.isa import fingerprint

        tag = hashlib.sha1((fingerprint(threads=0) + _SOURCE).encode()).hexdigest()[:12]
        log.info("fxopt: building the fused dequantize+GEMV kernel for this CPU (once)")
        cpp_extension.load_inline(
            name=f"fxopt_gemv_{tag}", cpp_sources=[_SOURCE], is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"])
        return hasattr(torch.ops.fxopt_gemv, "int8_gemv")
    except Exception as exc:  # noqa: BLE001 -- no compiler, no headers: the kernel is simply absent
        log.info("fxopt: the fused dequantize+GEMV kernel is not available: %s", exc)
        return False


def pack_int4_groups(q: torch.Tensor, group: int) -> torch.Tensor:
    """int4 values ``[N, K]`` (int8 0..15) -> ``[N, K / 2]`` uint8 per group of ``group``: byte j
    of a group holds value j (low nibble) and value j + group/2 (high nibble)."""
    n, k = q.shape
    values = q.to(torch.uint8).reshape(n, k // group, 2, group // 2)
    return (values[:, :, 0] | (values[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
