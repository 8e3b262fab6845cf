"""Prediction's attention of a packed row in one C++ call (AVX-512 BF16): every segment causal on its own, a swap
tree's continuing segment after its prefix's keys, read from and written to the (T, H, D) layout the projections
leave, flash-attention style (an online softmax over blocks of keys; no scores tensor, no stacked copies).

The kernel is built at first use with torch's extension builder (lmsys.modeling.causal_softmax.build_kernel, the
same flags and fallbacks as the causal softmax): `segment_attention_op()` is None where it cannot run, and the
compiled attention's calls (attention.CompiledCausalAttention.attend_parts) remain.

Per (segment, key/value head) the keys are packed once into the operand layout of `vdpbf16ps` (pairs of a key's
dimensions side by side, 16 keys to a vector) and the values into pairs of keys; then per block of BQ query
tokens (BQ * g rows: a key/value head's g query heads, token by token, as attention.causal_attention_forward
stacks them), blocks of BK keys up to the block's last token: the bf16 scores accumulate in float32, the row's
running maximum and sum rescale the float32 output, the weights are rounded to bf16 for their product with v (as
the compiled attention rounds them). Blocks run largest first on OpenMP's dynamic schedule (causal blocks differ in
cost). Equal to float64 attention within bf16 rounding (tests/modeling/test_segment_attention.py).
"""

from __future__ import annotations

import functools

import torch

from lmsys.modeling.causal_softmax import build_kernel

NAME = "lmsys_segment_attention"

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using bf16 = at::BFloat16;
using Floats = at::vec::Vectorized<float>;
constexpr int BQ = 32;  // query tokens of a block
constexpr int BK = 64;  // keys of a block: 4 vectors of 16
constexpr int TILE = 4; // query rows of a register tile

struct Segment { int64_t first, length, prefix_first, prefix_length; };

// A pair of bf16 (two dimensions, or two keys) as one 32-bit lane, broadcast to 16 lanes.
static inline __m512bh pair_broadcast(const bf16* pair) {
  int32_t bits; std::memcpy(&bits, pair, 4);
  return (__m512bh)_mm512_set1_epi32(bits);
}

static inline __m512bh load_pairs(const bf16* x) { return (__m512bh)_mm512_loadu_si512(x); }

// scores (TILE, 16 * NV) += q (TILE rows of dim) . keys packed as [16-key vector][dim / 2][16][2]
template <int NV>
static void score_tile(const bf16* q, int64_t dim, const bf16* keys, float* scores) {
  __m512 acc[TILE][NV];
  for (int r = 0; r < TILE; ++r) for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t pairs = dim / 2, vector_stride = pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh k[NV];
    for (int v = 0; v < NV; ++v) k[v] = load_pairs(keys + v * vector_stride + p * 32);
    for (int r = 0; r < TILE; ++r) {
      __m512bh b = pair_broadcast(q + r * dim + 2 * p);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, k[v]);
    }
  }
  for (int r = 0; r < TILE; ++r) for (int v = 0; v < NV; ++v) _mm512_storeu_ps(scores + r * BK + 16 * v, acc[r][v]);
}

// out (TILE rows, 16 * NV dims from `column`) = out * rescale + weights (TILE, 2 * key_pairs) . values packed as
// [key pair][dim][2]
template <int NV>
static void value_tile(const bf16* weights, const bf16* values, int64_t dim, int64_t key_pairs, int64_t column,
                       const float* rescale, float* out) {
  __m512 acc[TILE][NV];
  for (int r = 0; r < TILE; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(out + r * dim + column + 16 * v), _mm512_set1_ps(rescale[r]));
  for (int64_t p = 0; p < key_pairs; ++p) {
    __m512bh x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load_pairs(values + p * dim * 2 + (column + 16 * v) * 2);
    for (int r = 0; r < TILE; ++r) {
      __m512bh b = pair_broadcast(weights + r * BK + 2 * p);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, x[v]);
    }
  }
  for (int r = 0; r < TILE; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * dim + column + 16 * v, acc[r][v]);
}

// The segment's keys of one head (its prefix's, then its own): key j = prefix_first + j for j < prefix_length,
// else first + j - prefix_length.
static inline const bf16* key_row(const torch::Tensor& t, const Segment& s, int64_t head, int64_t j) {
  int64_t token = j < s.prefix_length ? s.prefix_first + j : s.first + j - s.prefix_length;
  return t.data_ptr<bf16>() + token * t.stride(0) + head * t.stride(1);
}

// keys (padded to BK) -> [16-key vector][dim / 2][16][2]; values -> [key pair][dim][2]; zeros past the keys.
static void pack(const torch::Tensor& key, const torch::Tensor& value, const Segment& s, int64_t head,
                 int64_t padded, bf16* keys, bf16* values) {
  const int64_t dim = key.size(2), count = s.prefix_length + s.length;
  std::memset(keys, 0, padded * dim * sizeof(bf16));
  std::memset(values, 0, padded * dim * sizeof(bf16));
  for (int64_t j = 0; j < count; ++j) {
    const bf16* k = key_row(key, s, head, j);
    const bf16* v = key_row(value, s, head, j);
    bf16* kv = keys + (j / 16) * dim * 16 + (j % 16) * 2;
    for (int64_t d = 0; d < dim; d += 2) { kv[d * 16] = k[d]; kv[d * 16 + 1] = k[d + 1]; }
    bf16* vv = values + (j / 2) * dim * 2 + (j % 2);
    for (int64_t d = 0; d < dim; ++d) vv[2 * d] = v[d];
  }
}

struct Block { int64_t segment, head, start; double cost; };

struct Scratch {
  std::vector<bf16> queries, weights;
  std::vector<float> scores, out, top, total, rescale;
  Scratch(int64_t rows, int64_t dim)
      : queries(rows * dim), weights(rows * BK), scores(rows * BK), out(rows * dim), top(rows), total(rows),
        rescale(rows) {}
};

// One row's softmax step over a block of keys: `visible` of its scores count; its weights rounded to bf16 (zero
// past them), its running maximum and sum updated, its output's rescale factor set.
static void softmax_step(float* scores, bf16* weights, int64_t visible, int64_t width, float scale, float& top,
                         float& total, float& rescale) {
  if (visible <= 0) {
    std::fill(weights, weights + width, bf16(0.f));
    rescale = 1.f;
    return;
  }
  float most = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < width; k += 16) {
    __mmask16 lanes = visible - k >= 16 ? 0xFFFF : (visible > k ? (__mmask16)((1u << (visible - k)) - 1) : 0);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(scores + k), _mm512_set1_ps(scale));
    _mm512_storeu_ps(scores + k, x);
    if (lanes) most = std::max(most, _mm512_mask_reduce_max_ps(lanes, x));
  }
  const float next = std::max(top, most);
  rescale = std::exp(top - next);  // 0 at a row's first block (top = -inf)
  __m512 sum = _mm512_setzero_ps();
  for (int64_t k = 0; k < width; k += 16) {
    __mmask16 lanes = visible - k >= 16 ? 0xFFFF : (visible > k ? (__mmask16)((1u << (visible - k)) - 1) : 0);
    __m512 x = _mm512_sub_ps(_mm512_loadu_ps(scores + k), _mm512_set1_ps(next));
    __m512 e = _mm512_maskz_mov_ps(lanes, static_cast<__m512>(Floats(_mm512_maskz_mov_ps(lanes, x)).exp_u20()));
    sum = _mm512_add_ps(sum, e);
    __m256bh rounded = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights + k), (__m256i)rounded);
  }
  total = total * rescale + _mm512_reduce_add_ps(sum);
  top = next;
}

static void attend_block(const torch::Tensor& query, const Segment& s, int64_t head, int64_t groups, int64_t start,
                         const bf16* keys, const bf16* values, float scale, Scratch& w, torch::Tensor& output) {
  const int64_t dim = query.size(2), tokens = std::min<int64_t>(BQ, s.length - start);
  const int64_t rows = tokens * groups, tiles = (rows + TILE - 1) / TILE;
  for (int64_t r = 0; r < tiles * TILE; ++r) {  // row r: token start + r / groups, query head head * groups + r % g
    bf16* q = w.queries.data() + r * dim;
    if (r < rows) {
      const bf16* src = query.data_ptr<bf16>() + (s.first + start + r / groups) * query.stride(0) +
                        (head * groups + r % groups) * query.stride(1);
      std::copy(src, src + dim, q);
    } else {
      std::fill(q, q + dim, bf16(0.f));
    }
    w.top[r] = -std::numeric_limits<float>::infinity();
    w.total[r] = 0.f;
    std::fill(w.out.data() + r * dim, w.out.data() + (r + 1) * dim, 0.f);
  }
  const int64_t seen = s.prefix_length + start;  // keys before the block's first token
  const int64_t end = seen + tokens;             // the block's keys: 0 .. end - 1
  for (int64_t k0 = 0; k0 < end; k0 += BK) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t last_row = std::min(rows - 1, t * TILE + TILE - 1);
      const int64_t needed = std::min<int64_t>(BK, seen + last_row / groups + 1 - k0);  // keys the tile sees here
      const int64_t vectors = std::max<int64_t>(0, (needed + 15) / 16);
      const bf16* q = w.queries.data() + t * TILE * dim;
      const bf16* k = keys + (k0 / 16) * dim * 16;
      float* scores = w.scores.data() + t * TILE * BK;
      switch (vectors) {
        case 0: break;
        case 1: score_tile<1>(q, dim, k, scores); break;
        case 2: score_tile<2>(q, dim, k, scores); break;
        case 3: score_tile<3>(q, dim, k, scores); break;
        default: score_tile<4>(q, dim, k, scores); break;
      }
      for (int64_t r = t * TILE; r < t * TILE + TILE; ++r) {
        const int64_t visible = r < rows ? std::min<int64_t>(BK, seen + r / groups + 1 - k0) : 0;
        softmax_step(w.scores.data() + r * BK, w.weights.data() + r * BK, visible, vectors * 16, scale, w.top[r],
                     w.total[r], w.rescale[r]);
        std::fill(w.weights.data() + r * BK + vectors * 16, w.weights.data() + (r + 1) * BK, bf16(0.f));
      }
      if (vectors == 0) continue;
      const int64_t pairs = (needed + 1) / 2;
      const bf16* weights = w.weights.data() + t * TILE * BK;
      const bf16* pairs_at = values + (k0 / 2) * dim * 2;
      float *rescale = w.rescale.data() + t * TILE, *out = w.out.data() + t * TILE * dim;
      for (int64_t column = 0; column < dim; column += 64) {
        switch (std::min<int64_t>(4, (dim - column) / 16)) {
          case 1: value_tile<1>(weights, pairs_at, dim, pairs, column, rescale, out); break;
          case 2: value_tile<2>(weights, pairs_at, dim, pairs, column, rescale, out); break;
          case 3: value_tile<3>(weights, pairs_at, dim, pairs, column, rescale, out); break;
          default: value_tile<4>(weights, pairs_at, dim, pairs, column, rescale, out); break;
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = output.data_ptr<bf16>() + (s.first + start + r / groups) * output.stride(0) +
                (head * groups + r % groups) * output.stride(1);
    const float inverse = 1.f / w.total[r];
    const float* o = w.out.data() + r * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inverse)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)rounded);
    }
  }
}

// query (T, H, D), key and value (T, H_kv, D) bf16 CPU, the last dimension contiguous; segments (S, 4) int64:
// first token, length, the prefix's first token and length (0: none) -> output (T, H, D) bf16, each segment's
// tokens attending causally to its prefix and its own keys. Tokens in no segment are left unwritten.
torch::Tensor segment_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor segments,
                                double scale) {
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 3 && key.dim() == 3 && value.sizes() == key.sizes(),
              "segment_attention takes query (T, H, D), key and value (T, H_kv, D) on CPU");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
              value.scalar_type() == at::kBFloat16, "segment_attention takes bf16 tensors");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1, "the last dimension contiguous");
  const int64_t dim = query.size(2), heads = query.size(1), kv_heads = key.size(1), tokens = query.size(0);
  TORCH_CHECK(key.size(2) == dim && dim % 16 == 0 && heads % kv_heads == 0 && key.size(0) == tokens,
              "segment_attention: head dims a multiple of 16, query heads a multiple of key/value heads");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4,
              "segments: (S, 4) int64");
  auto table = segments.contiguous();
  std::vector<Segment> list(table.size(0));
  std::memcpy(list.data(), table.data_ptr<int64_t>(), list.size() * sizeof(Segment));
  std::vector<int64_t> offsets(list.size() + 1, 0);
  for (size_t i = 0; i < list.size(); ++i) {
    const Segment& s = list[i];
    TORCH_CHECK(s.length >= 1 && s.first >= 0 && s.first + s.length <= tokens && s.prefix_length >= 0 &&
                s.prefix_first >= 0 && s.prefix_first + s.prefix_length <= tokens, "a segment outside the tokens");
    offsets[i + 1] = offsets[i] + (s.prefix_length + s.length + BK - 1) / BK * BK;
  }
  const int64_t groups = heads / kv_heads;
  std::vector<bf16> keys(offsets.back() * kv_heads * dim), values(offsets.back() * kv_heads * dim);
  std::vector<Block> blocks;
  for (size_t i = 0; i < list.size(); ++i)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t start = 0; start < list[i].length; start += BQ) {
        double rows = std::min<int64_t>(BQ, list[i].length - start);
        blocks.push_back({(int64_t)i, h, start, rows * (list[i].prefix_length + start + rows)});
      }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.cost > b.cost; });
  auto output = torch::empty_like(query, at::MemoryFormat::Contiguous);
  const int64_t pairs = list.size() * kv_heads;
  const float s = static_cast<float>(scale);
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    #pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t i = p / kv_heads, h = p % kv_heads, padded = offsets[i + 1] - offsets[i];
      const int64_t at = (offsets[i] * kv_heads + h * padded) * dim;
      pack(key, value, list[i], h, padded, keys.data() + at, values.data() + at);
    }
    Scratch scratch(((BQ * groups + TILE - 1) / TILE) * TILE, dim);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < (int64_t)blocks.size(); ++b) {
      const Block& block = blocks[b];
      const int64_t padded = offsets[block.segment + 1] - offsets[block.segment];
      const int64_t at = (offsets[block.segment] * kv_heads + block.head * padded) * dim;
      attend_block(query, list[block.segment], block.head, groups, block.start, keys.data() + at,
                   values.data() + at, s, scratch, output);
    }
  }
  return output;
}
"""


@functools.cache
def segment_attention_op():
    """The kernel's function (query, key, value, segments, scale) -> output, built or loaded once a process; None
    where it cannot run (lmsys.modeling.causal_softmax.build_kernel)."""
    return build_kernel(NAME, SOURCE, "segment_attention", "the C++ segment attention")


def fits(dim: int) -> bool:
    """Whether the kernel takes heads of `dim` dimensions (whole vectors of 16 float32 lanes)."""
    return dim % 16 == 0


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[tuple[int, ...]],
                      scaling: float) -> torch.Tensor:
    """query (T, H, D), key and value (T, H_kv, D) in bf16 -> (T, H, D): each segment (first, length, prefix_first,
    prefix_length) causal over its prefix's keys and its own. Only where segment_attention_op() is not None."""
    table = torch.tensor(segments, dtype=torch.int64).view(-1, 4)
    return segment_attention_op()(query, key, value, table, float(scaling))
