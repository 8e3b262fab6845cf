"""The causal softmax of the compiled CPU attention (`model.attention_kernel=compiled`, bf16): a C++ kernel built
at first use with torch's extension builder, on CPUs with AVX-512 BF16.

The attention's weights, row by row (attention.causal_attention_forward's layout: row r of a query block is token
`first + r // groups`, and sees the keys up to that token): scale the bf16 scores, take the maximum, exponentiate
once into a float32 row buffer while summing, normalize and round to bf16; the keys after the token are written
as zeros without being read. inductor's loop for the same softmax (the float32 arithmetic of
attention._causal_weights) reads every score three times, exponentiates twice, and computes the causal mask of
every key in int64 vectors, masked ones included. Equal to it within a bf16 rounding of the weights (both round
float32 weights to nearest even; the exponentials differ in their last float32 bits).

Measured on an AMD EPYC with AVX-512 BF16 (no AMX), 2 threads, the attention forward without gradients (both
batched products with the softmax between them) on prediction shapes (4 x 430, 6 x 300 and 2 x 700 tokens in 4
query blocks, 1 x 250 and 3 x 200 in one, swap trees' continuing 300 and 150 tokens after prefixes of 280 and 150;
SmolLM2's 9 query and 3 key/value heads of 64), median of 9 with the two taking turns: 103.5 against 166.9 ms for
the compiled graph.

Where the kernel cannot run (another CPU, no C++ compiler or ninja, a failed build: logged once), the attention
keeps the compiled graph's softmax: `causal_softmax_op()` is then None.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("lmsys")

NAME = "lmsys_causal_softmax"  # the build's name in torch's extension cache (a changed source is built anew)
# The kernel's own instruction sets, not -march=native: a build cached in a home directory shared by machines
# of different CPUs runs on any with AVX-512 BF16 (checked before loading).
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using Floats = at::vec::Vectorized<float>;  // 16 lanes under AVX-512

static inline Floats load_bf16(const at::BFloat16* x) {  // 16 bf16 -> 16 float32 (exact)
  __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return Floats(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
}

static inline void store_bf16(at::BFloat16* y, Floats v) {  // 16 float32 -> 16 bf16, round to nearest even
  __m256bh rounded = _mm512_cvtneps_pbh(static_cast<__m512>(v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)rounded);
}

// scores (N, R, L) bf16, contiguous -> weights (N, R, L) bf16: the softmax of scale * scores over the keys
// 0 .. first + r / groups of row r (of every n), zero after them.
torch::Tensor causal_softmax(torch::Tensor scores, double scale, int64_t groups, int64_t first) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 3 && scores.is_contiguous() &&
              scores.scalar_type() == at::kBFloat16, "causal_softmax takes contiguous (N, R, L) bf16 CPU scores");
  const int64_t R = scores.size(1), L = scores.size(2);
  auto weights = torch::empty_like(scores);
  const at::BFloat16* in = scores.data_ptr<at::BFloat16>();
  at::BFloat16* out = weights.data_ptr<at::BFloat16>();
  const float s = static_cast<float>(scale);
  const int64_t W = Floats::size();
  at::parallel_for(0, scores.size(0) * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(L);
    float lanes[64];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t seen = std::min<int64_t>(L, first + (i % R) / groups + 1);  // keys up to the row's token
      const at::BFloat16* x = in + i * L;
      at::BFloat16* y = out + i * L;
      Floats top(-std::numeric_limits<float>::infinity());
      int64_t k = 0;
      for (; k + W <= seen; k += W) {
        Floats v = load_bf16(x + k) * Floats(s);
        v.store(row.data() + k);
        top = at::vec::maximum(top, v);
      }
      top.store(lanes);
      float most = *std::max_element(lanes, lanes + W);
      for (; k < seen; ++k) {
        row[k] = static_cast<float>(x[k]) * s;
        most = std::max(most, row[k]);
      }
      Floats total(0.f);
      for (k = 0; k + W <= seen; k += W) {
        Floats e = (Floats::loadu(row.data() + k) - Floats(most)).exp_u20();
        e.store(row.data() + k);
        total = total + e;
      }
      total.store(lanes);
      float sum = 0.f;
      for (int64_t j = 0; j < W; ++j) sum += lanes[j];
      for (; k < seen; ++k) {
        row[k] = std::exp(row[k] - most);
        sum += row[k];
      }
      const float inverse = 1.f / sum;
      for (k = 0; k + W <= seen; k += W) store_bf16(y + k, Floats::loadu(row.data() + k) * Floats(inverse));
      for (; k < seen; ++k) y[k] = static_cast<at::BFloat16>(row[k] * inverse);
      std::fill(y + seen, y + L, static_cast<at::BFloat16>(0.f));
    }
  });
  return weights;
}
"""


@functools.cache
def causal_softmax_op():
    """The kernel's function (scores, scale, groups, first) -> weights, built or loaded once a process; None where
    it cannot run (see the module's docstring)."""
    module = build_kernel(NAME, SOURCE, ["causal_softmax"], "the C++ causal softmax")
    return None if module is None else module.causal_softmax


def build_kernel(name: str, source: str, functions: list[str], description: str):
    """The C++ `source` built (or loaded from torch's extension cache) as `name` with FLAGS: a module of its
    `functions`; None, with a warning, where the CPU lacks AVX-512 BF16 or the build fails (no compiler or ninja)."""
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():  # a private check: absent, no kernel
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        module = load_inline(name, cpp_sources=[source], functions=functions, extra_cflags=FLAGS,
                             extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as error:  # no compiler or ninja, or the build failed
        log.warning("attention: %s could not be built (%s); the compiled attention's own is used", description,
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    log.info("attention: %s (AVX-512 BF16) is in use", description)
    return module


def causal_softmax(scores: torch.Tensor, scaling: float, groups: int, first: int) -> torch.Tensor:
    """Weights (N, R, L) in bf16 of bf16 scores (N, R, L): row r is token first + r // groups and sees the keys up
    to it (attention._causal_weights rounded to bf16). Only where causal_softmax_op() is not None."""
    return causal_softmax_op()(scores.contiguous(), float(scaling), int(groups), int(first))
