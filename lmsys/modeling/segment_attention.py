"""The attention of a packed row in one C++ call (AVX-512 BF16), for training and prediction: every segment causal
on its own, a swap tree's continuing segment after its prefix's keys (prediction: trees have no backward here),
read from and written to the (T, H, D) layout the projections leave, flash-attention style (an online softmax over
blocks of keys; no scores tensor, no stacked copies).

The kernel is built at first use with torch's extension builder (~25-45 s once a machine, cached in its extension
directory; a changed source is built anew), with its own instruction sets rather than -march=native, so that a build
cached in a home directory shared by machines of different CPUs runs on any with AVX-512 BF16 (checked before
loading). Where it cannot run (another CPU, no C++ compiler or ninja, a failed build: logged once)
`segment_attention_op()` is None, and the compiled attention's own calls (attention.CompiledCausalAttention) remain.

Forward: per (segment, key/value head) the keys are packed once into the operand layout of `vdpbf16ps` (pairs of a
key's dimensions side by side, 16 keys to a vector) and the values into pairs of keys; then per block of BQ query
tokens (BQ * g rows: a key/value head's g query heads, token by token, as attention.causal_attention_forward stacks
them), blocks of BK keys up to the block's last token: the bf16 scores accumulate in float32, the row's running
maximum and sum rescale the float32 output, the weights are rounded to bf16 for their product with v (as the
compiled attention rounds them). Blocks run largest first on OpenMP's dynamic schedule. It returns each row's
log-sum-exp as well.

Backward (SegmentAttention): per (segment, key/value head), query block by query block, the weights recomputed
from the log-sum-exp (one product more than keeping them, for no (T, T) memory), dS = P (dP - rowsum(dO O)), dQ
of the block complete after its key blocks, dK and dV summed in float32 over the query blocks, transposed, so that
their sums run over pairs of rows, which P and dS are written as.

Measured on an AMD EPYC with AVX-512 BF16 (2 threads, SmolLM2-135M's 9 query and 3 key/value heads of 64): without
gradients 0.43-0.68 of the compiled attention's forward on the bench's prediction shapes, 0.28-0.46 of torch's
flash forward from 512 to 2,048 tokens; forward + backward 0.69-0.90 of the compiled attention's on the bench's
training micro-batches (0.79 in total), 0.39-0.54 of torch's bf16 sdpa's at 512 to 2,048 tokens; in one process,
taking turns, the bench's TTA passes 0.925 and its training epochs 0.970 of the time. Equal to float64 attention
within bf16 rounding, gradients included (tests/modeling/test_segment_attention.py).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("lmsys")

NAME = "lmsys_segment_attention"  # the build's name in torch's extension cache
# The kernel's own instruction sets, not -march=native: a build cached in a home directory shared by machines
# of different CPUs runs on any with AVX-512 BF16 (checked before loading).
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]


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
#include <memory>
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

// out (TILE rows, 16 * NV dims from `column`) = out * rescale + weights (TILE, 2 * key_pairs; rows `stride` apart)
// . values packed as [key pair][dim][2]
template <int NV>
static void value_tile(const bf16* weights, int64_t stride, const bf16* values, int64_t dim, int64_t key_pairs,
                       int64_t column, const float* rescale, float* out) {
  __m512 acc[TILE][NV];
  for (int r = 0; r < TILE; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(out + r * dim + column + 16 * v), _mm512_set1_ps(rescale[r]));
  for (int64_t p = 0; p < key_pairs; ++p) {
    __m512bh x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load_pairs(values + p * dim * 2 + (column + 16 * v) * 2);
    for (int r = 0; r < TILE; ++r) {
      __m512bh b = pair_broadcast(weights + r * stride + 2 * p);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, x[v]);
    }
  }
  for (int r = 0; r < TILE; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * dim + column + 16 * v, acc[r][v]);
}

// The segment's keys of one head (its prefix's, then its own): key j = prefix_first + j for j < prefix_length,
// else first + j - prefix_length.
// out (TILE rows of dim) = out * rescale + weights . values, in column chunks of up to 64
static void value_rows(const bf16* weights, int64_t stride, const bf16* values, int64_t dim, int64_t key_pairs,
                       const float* rescale, float* out) {
  for (int64_t column = 0; column < dim; column += 64) {
    switch (std::min<int64_t>(4, (dim - column) / 16)) {
      case 1: value_tile<1>(weights, stride, values, dim, key_pairs, column, rescale, out); break;
      case 2: value_tile<2>(weights, stride, values, dim, key_pairs, column, rescale, out); break;
      case 3: value_tile<3>(weights, stride, values, dim, key_pairs, column, rescale, out); break;
      default: value_tile<4>(weights, stride, values, dim, key_pairs, column, rescale, out); break;
    }
  }
}

// scores (TILE, 16 * vectors) = q . keys (score_tile), 0 to 4 vectors
static void score_rows(const bf16* q, int64_t dim, const bf16* keys, int64_t vectors, float* scores) {
  switch (vectors) {
    case 0: break;
    case 1: score_tile<1>(q, dim, keys, scores); break;
    case 2: score_tile<2>(q, dim, keys, scores); break;
    case 3: score_tile<3>(q, dim, keys, scores); break;
    default: score_tile<4>(q, dim, keys, scores); break;
  }
}

static inline const bf16* key_row(const torch::Tensor& t, const Segment& s, int64_t head, int64_t j) {
  int64_t token = j < s.prefix_length ? s.prefix_first + j : s.first + j - s.prefix_length;
  return t.data_ptr<bf16>() + token * t.stride(0) + head * t.stride(1);
}

// rows row(0 .. count - 1) of dim (zeros up to `padded`) -> score_tile's operand: [16-row vector][dim / 2][16][2]
template <typename Row>
static void pack_vectors(Row row, int64_t count, int64_t padded, int64_t dim, bf16* out) {
  const int64_t pairs = dim / 2;
  uint32_t* y = reinterpret_cast<uint32_t*>(out);  // a pair of bf16 as one 32-bit lane
  for (int64_t j = 0; j < padded; ++j) {
    uint32_t* lane = y + (j / 16) * pairs * 16 + j % 16;
    if (j < count) {
      const uint32_t* x = reinterpret_cast<const uint32_t*>(row(j));
      for (int64_t p = 0; p < pairs; ++p) lane[p * 16] = x[p];
    } else {
      for (int64_t p = 0; p < pairs; ++p) lane[p * 16] = 0;
    }
  }
}

// two rows of dim bf16 (dim a multiple of 16) side by side: y[2 d] = a[d], y[2 d + 1] = b[d]
static inline void interleave(const bf16* a, const bf16* b, int64_t dim, bf16* y) {
  for (int64_t d = 0; d < dim; d += 16) {
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + d));
    __m256i low = _mm256_unpacklo_epi16(x0, x1), high = _mm256_unpackhi_epi16(x0, x1);  // per 128-bit lane
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 2 * d), _mm256_permute2x128_si256(low, high, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 2 * d + 16), _mm256_permute2x128_si256(low, high, 0x31));
  }
}

// rows row(0 .. count - 1) of dim (padded with zeros to `padded`, even) -> value_tile's operand: [row pair][dim][2]
template <typename Row>
static void pack_pairs(Row row, int64_t count, int64_t padded, int64_t dim, bf16* out) {
  std::vector<bf16> zeros(dim, bf16(0.f));
  for (int64_t j = 0; j < padded; j += 2)
    interleave(j < count ? row(j) : zeros.data(), j + 1 < count ? row(j + 1) : zeros.data(), dim, out + j * dim);
}

// a segment's keys (padded to BK) for the scores, its values for the weights' product
static void pack(const torch::Tensor& key, const torch::Tensor& value, const Segment& s, int64_t head,
                 int64_t padded, bf16* keys, bf16* values) {
  const int64_t dim = key.size(2), count = s.prefix_length + s.length;
  pack_vectors([&](int64_t j) { return key_row(key, s, head, j); }, count, padded, dim, keys);
  pack_pairs([&](int64_t j) { return key_row(value, s, head, j); }, count, padded, dim, values);
}

struct Block { int64_t segment, head, start; double cost; };

struct Scratch {
  std::vector<bf16> queries, weights;
  std::vector<float> scores, out, top, total, rescale;
  Scratch(int64_t rows, int64_t dim)
      : queries(rows * dim), weights(rows * BK), scores(rows * BK), out(rows * dim), top(rows), total(rows),
        rescale(rows) {}
};

// the lanes of the 16 keys from k that a row sees, of its first `visible`
static inline __mmask16 lanes_of(int64_t visible, int64_t k) {
  return visible - k >= 16 ? 0xFFFF : (visible > k ? (__mmask16)((1u << (visible - k)) - 1) : 0);
}

// One row's softmax step over a block of keys: `visible` of its scores count; its weights rounded to bf16 (zero
// past them), its running maximum and sum updated, its output's rescale factor set.
static void softmax_step(const float* scores, bf16* weights, int64_t visible, int64_t width, float scale,
                         float& top, float& total, float& rescale) {
  if (visible <= 0) {
    std::fill(weights, weights + width, bf16(0.f));
    rescale = 1.f;
    return;
  }
  __m512 most = _mm512_set1_ps(-std::numeric_limits<float>::infinity());  // of the unscaled scores (scale > 0)
  for (int64_t k = 0; k < width; k += 16)
    most = _mm512_mask_max_ps(most, lanes_of(visible, k), most, _mm512_loadu_ps(scores + k));
  const float next = std::max(top, _mm512_reduce_max_ps(most) * scale);
  rescale = std::exp(top - next);  // 0 at a row's first block (top = -inf)
  __m512 sum = _mm512_setzero_ps();
  for (int64_t k = 0; k < width; k += 16) {
    const __mmask16 lanes = lanes_of(visible, k);
    __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(scores + k), _mm512_set1_ps(scale), _mm512_set1_ps(next));
    __m512 e = _mm512_maskz_mov_ps(lanes, static_cast<__m512>(Floats(_mm512_maskz_mov_ps(lanes, x)).exp_u20()));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights + k), (__m256i)_mm512_cvtneps_pbh(e));
  }
  total = total * rescale + _mm512_reduce_add_ps(sum);
  top = next;
}

static void attend_block(const torch::Tensor& query, const Segment& s, int64_t head, int64_t groups, int64_t start,
                         const bf16* keys, const bf16* values, float scale, Scratch& w, torch::Tensor& output,
                         torch::Tensor& logsumexp) {
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
      score_rows(w.queries.data() + t * TILE * dim, dim, keys + (k0 / 16) * dim * 16, vectors,
                 w.scores.data() + t * TILE * BK);
      for (int64_t r = t * TILE; r < t * TILE + TILE; ++r) {
        const int64_t visible = r < rows ? std::min<int64_t>(BK, seen + r / groups + 1 - k0) : 0;
        softmax_step(w.scores.data() + r * BK, w.weights.data() + r * BK, visible, vectors * 16, scale, w.top[r],
                     w.total[r], w.rescale[r]);
      }
      if (vectors == 0) continue;
      const int64_t pairs = (needed + 1) / 2;
      value_rows(w.weights.data() + t * TILE * BK, BK, values + (k0 / 2) * dim * 2, dim, pairs,
                 w.rescale.data() + t * TILE, w.out.data() + t * TILE * dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = output.data_ptr<bf16>() + (s.first + start + r / groups) * output.stride(0) +
                (head * groups + r % groups) * output.stride(1);
    const float inverse = 1.f / w.total[r];
    logsumexp.data_ptr<float>()[(s.first + start + r / groups) * logsumexp.stride(0) + head * groups + r % groups] =
        w.top[r] + std::log(w.total[r]);
    const float* o = w.out.data() + r * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inverse)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)rounded);
    }
  }
}

static std::vector<Segment> read_segments(const torch::Tensor& segments, int64_t tokens) {
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4,
              "segments: (S, 4) int64");
  auto table = segments.contiguous();
  std::vector<Segment> list(table.size(0));
  std::memcpy(list.data(), table.data_ptr<int64_t>(), list.size() * sizeof(Segment));
  for (const Segment& s : list)
    TORCH_CHECK(s.length >= 1 && s.first >= 0 && s.first + s.length <= tokens && s.prefix_length >= 0 &&
                s.prefix_first >= 0 && s.prefix_first + s.prefix_length <= tokens, "a segment outside the tokens");
  return list;
}

static void check_inputs(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value) {
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 3 && key.dim() == 3 && value.sizes() == key.sizes(),
              "segment_attention takes query (T, H, D), key and value (T, H_kv, D) on CPU");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
              value.scalar_type() == at::kBFloat16, "segment_attention takes bf16 tensors");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1, "the last dimension contiguous");
  TORCH_CHECK(key.size(2) == query.size(2) && query.size(2) % 16 == 0 && query.size(1) % key.size(1) == 0 &&
              key.size(0) == query.size(0),
              "segment_attention: head dims a multiple of 16, query heads a multiple of key/value heads");
}

// query (T, H, D), key and value (T, H_kv, D) bf16 CPU, the last dimension contiguous; segments (S, 4) int64:
// first token, length, the prefix's first token and length (0: none) -> output (T, H, D) bf16, each segment's
// tokens attending causally to its prefix and its own keys, and each row's log-sum-exp of its scaled scores
// (T, H) float32. Tokens in no segment are left unwritten.
std::tuple<torch::Tensor, torch::Tensor> segment_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value,
                                                           torch::Tensor segments,
                                double scale) {
  check_inputs(query, key, value);
  const int64_t dim = query.size(2), heads = query.size(1), kv_heads = key.size(1), tokens = query.size(0);
  std::vector<Segment> list = read_segments(segments, tokens);
  std::vector<int64_t> offsets(list.size() + 1, 0);
  for (size_t i = 0; i < list.size(); ++i)
    offsets[i + 1] = offsets[i] + (list[i].prefix_length + list[i].length + BK - 1) / BK * BK;
  const int64_t groups = heads / kv_heads;
  std::unique_ptr<bf16[]> keys(new bf16[offsets.back() * kv_heads * dim]);  // every element packed
  std::unique_ptr<bf16[]> values(new bf16[offsets.back() * kv_heads * dim]);
  std::vector<Block> blocks;
  for (size_t i = 0; i < list.size(); ++i)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t start = 0; start < list[i].length; start += BQ) {
        double rows = std::min<int64_t>(BQ, list[i].length - start);
        blocks.push_back({(int64_t)i, h, start, rows * (list[i].prefix_length + start + rows)});
      }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.cost > b.cost; });
  auto output = torch::empty_like(query, at::MemoryFormat::Contiguous);
  auto logsumexp = torch::empty({tokens, heads}, query.options().dtype(at::kFloat));
  const int64_t pairs = list.size() * kv_heads;
  const float s = static_cast<float>(scale);
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    #pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t i = p / kv_heads, h = p % kv_heads, padded = offsets[i + 1] - offsets[i];
      const int64_t at = (offsets[i] * kv_heads + h * padded) * dim;
      pack(key, value, list[i], h, padded, keys.get() + at, values.get() + at);
    }
    Scratch scratch(((BQ * groups + TILE - 1) / TILE) * TILE, dim);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < (int64_t)blocks.size(); ++b) {
      const Block& block = blocks[b];
      const int64_t padded = offsets[block.segment + 1] - offsets[block.segment];
      const int64_t at = (offsets[block.segment] * kv_heads + block.head * padded) * dim;
      attend_block(query, list[block.segment], block.head, groups, block.start, keys.get() + at,
                   values.get() + at, s, scratch, output, logsumexp);
    }
  }
  return {output, logsumexp};
}

// The backward of one segment's key/value head (no prefix): its queries in blocks of BQ tokens, each against the
// key blocks up to its last token; the weights recomputed from the log-sum-exp, dS = P (dP - rowsum(dO O)) scale;
// dQ of a query block complete after its key blocks; dK and dV transposed ((D, keys), so that the rows' sums run
// over pairs of rows, as P and dS are written) summed in float32 over the query blocks.
struct Gradients {
  const torch::Tensor &query, &key, &value, &output, &grad_output, &logsumexp;
  torch::Tensor &grad_query, &grad_key, &grad_value;
};

struct BackwardScratch {
  std::vector<bf16> keys, values_t, key_pairs, q, q_t, g, g_t, ds, p_pairs, ds_pairs;
  std::vector<float> grad_keys_t, grad_values_t, grad_q, scores, dp, top, delta, ones;
  BackwardScratch(int64_t padded, int64_t rows, int64_t dim)
      : keys(padded * dim), values_t(padded * dim), key_pairs(padded * dim), q(rows * dim), q_t(rows * dim),
        g(rows * dim), g_t(rows * dim), ds(rows * BK), p_pairs(rows * BK), ds_pairs(rows * BK),
        grad_keys_t(padded * dim), grad_values_t(padded * dim), grad_q(rows * dim), scores(rows * BK),
        dp(rows * BK), top(rows), delta(rows), ones(TILE, 1.f) {}
};

static inline const bf16* row_of(const torch::Tensor& t, int64_t token, int64_t head) {
  return t.data_ptr<bf16>() + token * t.stride(0) + head * t.stride(1);
}

// 16 float32 -> bf16 into row `row`'s places of a [row pair][key][2] layout (the other row's left as they are)
static inline void store_paired(bf16* pairs, int64_t row, __m512 x) {
  __m512i wide = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  if (row % 2) wide = _mm512_slli_epi32(wide, 16);
  _mm512_mask_storeu_epi16(pairs, row % 2 ? 0xAAAAAAAAu : 0x55555555u, wide);
}

// P and dS of row r over a key block: `visible` keys (of width), zero past them; dS row-major (for dQ), both in
// pairs of rows (for dV and dK)
static void gradient_row(const float* scores, const float* dp, int64_t r, int64_t visible, int64_t width,
                         float scale, float logsumexp, float delta, BackwardScratch& w) {
  for (int64_t k = 0; k < BK; k += 16) {
    const __mmask16 lanes = k >= width ? 0 : lanes_of(visible, k);
    __m512 e = _mm512_setzero_ps(), d = _mm512_setzero_ps();
    if (lanes) {
      __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(scores + k), _mm512_set1_ps(scale), _mm512_set1_ps(logsumexp));
      e = _mm512_maskz_mov_ps(lanes, static_cast<__m512>(Floats(_mm512_maskz_mov_ps(lanes, x)).exp_u20()));
      d = _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(dp + k), _mm512_set1_ps(delta))),
                        _mm512_set1_ps(scale));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.ds.data() + r * BK + k), (__m256i)_mm512_cvtneps_pbh(d));
    store_paired(w.p_pairs.data() + (r / 2) * BK * 2 + k * 2, r, e);
    store_paired(w.ds_pairs.data() + (r / 2) * BK * 2 + k * 2, r, d);
  }
}

// out (TILE rows of a transposed gradient, 16 * NV keys; rows `stride` apart) += x_t (TILE rows, pairs of rows
// side by side; rows `x_stride` apart) . pairs ([row pair][BK keys][2]) over `row_pairs` pairs
template <int NV>
static void transposed_tile(const bf16* x_t, int64_t x_stride, const bf16* pairs, int64_t row_pairs, float* out,
                            int64_t stride) {
  __m512 acc[TILE][NV];
  for (int r = 0; r < TILE; ++r) for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(out + r * stride + 16 * v);
  for (int64_t p = 0; p < row_pairs; ++p) {
    __m512bh k[NV];
    for (int v = 0; v < NV; ++v) k[v] = load_pairs(pairs + p * BK * 2 + 32 * v);
    for (int r = 0; r < TILE; ++r) {
      __m512bh b = pair_broadcast(x_t + r * x_stride + 2 * p);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, k[v]);
    }
  }
  for (int r = 0; r < TILE; ++r) for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * stride + 16 * v, acc[r][v]);
}

// out (dim rows, the block's keys from its first; rows `stride` apart) += x_t (dim, rows) . pairs
static void transposed_rows(const bf16* x_t, int64_t rows, const bf16* pairs, int64_t vectors, int64_t dim,
                            float* out, int64_t stride) {
  for (int64_t d = 0; d < dim; d += TILE) {
    const bf16* x = x_t + d * rows;
    switch (vectors) {
      case 1: transposed_tile<1>(x, rows, pairs, rows / 2, out + d * stride, stride); break;
      case 2: transposed_tile<2>(x, rows, pairs, rows / 2, out + d * stride, stride); break;
      case 3: transposed_tile<3>(x, rows, pairs, rows / 2, out + d * stride, stride); break;
      default: transposed_tile<4>(x, rows, pairs, rows / 2, out + d * stride, stride); break;
    }
  }
}

static inline void store_row(const float* x, int64_t dim, bf16* y) {  // dim a multiple of 16
  for (int64_t d = 0; d < dim; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + d)));
}

// a query block's rows (q and dO, row-major and transposed (D, rows)), log-sum-exps and rowsum(dO O)
static void load_query_block(const Gradients& a, const Segment& s, int64_t head, int64_t groups, int64_t start,
                             int64_t rows, int64_t padded_rows, BackwardScratch& w) {
  const int64_t dim = a.query.size(2);
  for (int64_t r = 0; r < padded_rows; ++r) {
    const int64_t token = s.first + start + r / groups, h = head * groups + r % groups;
    bf16 *q = w.q.data() + r * dim, *g = w.g.data() + r * dim;
    if (r < rows) {
      std::copy(row_of(a.query, token, h), row_of(a.query, token, h) + dim, q);
      std::copy(row_of(a.grad_output, token, h), row_of(a.grad_output, token, h) + dim, g);
      const bf16* o = row_of(a.output, token, h);
      float sum = 0.f;
      for (int64_t d = 0; d < dim; ++d) sum += static_cast<float>(o[d]) * static_cast<float>(g[d]);
      w.delta[r] = sum;
      w.top[r] = a.logsumexp.data_ptr<float>()[token * a.logsumexp.stride(0) + h];
    } else {
      std::fill(q, q + dim, bf16(0.f));
      std::fill(g, g + dim, bf16(0.f));
      w.delta[r] = w.top[r] = 0.f;
    }
  }
  std::vector<bf16> pair(2 * dim);
  for (int64_t r = 0; r < padded_rows; r += 2) {  // (D, rows): a row pair's two values of d side by side
    for (auto [x, y] : {std::pair{w.q.data(), w.q_t.data()}, std::pair{w.g.data(), w.g_t.data()}}) {
      interleave(x + r * dim, x + (r + 1) * dim, dim, pair.data());
      const uint32_t* both = reinterpret_cast<const uint32_t*>(pair.data());
      for (int64_t d = 0; d < dim; ++d) std::memcpy(y + d * padded_rows + r, both + d, 4);
    }
  }
}

static void backward_query_block(const Gradients& a, const Segment& s, int64_t head, int64_t groups, int64_t start,
                                 float scale, int64_t padded, BackwardScratch& w) {
  const int64_t dim = a.query.size(2), tokens = std::min<int64_t>(BQ, s.length - start);
  const int64_t rows = tokens * groups, padded_rows = (rows + TILE - 1) / TILE * TILE;
  load_query_block(a, s, head, groups, start, rows, padded_rows, w);
  std::fill(w.grad_q.begin(), w.grad_q.begin() + padded_rows * dim, 0.f);
  const int64_t end = start + tokens;
  for (int64_t k0 = 0; k0 < end; k0 += BK) {
    for (int64_t t = 0; t < padded_rows / TILE; ++t) {
      const int64_t last_row = std::min(rows - 1, t * TILE + TILE - 1);
      const int64_t needed = std::min<int64_t>(BK, start + last_row / groups + 1 - k0);
      const int64_t vectors = std::max<int64_t>(0, (needed + 15) / 16);
      score_rows(w.q.data() + t * TILE * dim, dim, w.keys.data() + (k0 / 16) * dim * 16, vectors,
                 w.scores.data() + t * TILE * BK);
      score_rows(w.g.data() + t * TILE * dim, dim, w.values_t.data() + (k0 / 16) * dim * 16, vectors,
                 w.dp.data() + t * TILE * BK);
      for (int64_t r = t * TILE; r < t * TILE + TILE; ++r) {
        const int64_t visible = r < rows ? std::min<int64_t>(BK, start + r / groups + 1 - k0) : 0;
        gradient_row(w.scores.data() + r * BK, w.dp.data() + r * BK, r, visible, vectors * 16, scale, w.top[r],
                     w.delta[r], w);
      }
      if (vectors > 0)
        value_rows(w.ds.data() + t * TILE * BK, BK, w.key_pairs.data() + (k0 / 2) * dim * 2, dim, (needed + 1) / 2,
                   w.ones.data(), w.grad_q.data() + t * TILE * dim);
    }
    const int64_t vectors = (std::min<int64_t>(BK, end - k0) + 15) / 16;  // the keys any row of the block sees
    transposed_rows(w.g_t.data(), padded_rows, w.p_pairs.data(), vectors, dim, w.grad_values_t.data() + k0, padded);
    transposed_rows(w.q_t.data(), padded_rows, w.ds_pairs.data(), vectors, dim, w.grad_keys_t.data() + k0, padded);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_row(w.grad_q.data() + r * dim, dim,
              a.grad_query.data_ptr<bf16>() + (s.first + start + r / groups) * a.grad_query.stride(0) +
                  (head * groups + r % groups) * a.grad_query.stride(1));
}

static void backward_segment(const Gradients& a, const Segment& s, int64_t head, int64_t groups, float scale) {
  const int64_t dim = a.query.size(2), padded = (s.length + BK - 1) / BK * BK;
  BackwardScratch w(padded, (BQ * groups + TILE - 1) / TILE * TILE, dim);
  auto k_row = [&](int64_t j) { return row_of(a.key, s.first + j, head); };
  auto v_row = [&](int64_t j) { return row_of(a.value, s.first + j, head); };
  pack_vectors(k_row, s.length, padded, dim, w.keys.data());
  pack_vectors(v_row, s.length, padded, dim, w.values_t.data());
  pack_pairs(k_row, s.length, padded, dim, w.key_pairs.data());
  for (int64_t start = 0; start < s.length; start += BQ)
    backward_query_block(a, s, head, groups, start, scale, padded, w);
  for (int64_t j = 0; j < s.length; ++j) {
    bf16* dk = a.grad_key.data_ptr<bf16>() + (s.first + j) * a.grad_key.stride(0) + head * a.grad_key.stride(1);
    bf16* dv = a.grad_value.data_ptr<bf16>() + (s.first + j) * a.grad_value.stride(0) + head * a.grad_value.stride(1);
    for (int64_t d = 0; d < dim; ++d) {
      dk[d] = bf16(w.grad_keys_t[d * padded + j]);
      dv[d] = bf16(w.grad_values_t[d * padded + j]);
    }
  }
}

// segment_attention's backward (segments without a prefix): the gradients of query, key and value (their shapes,
// contiguous, bf16) from its output, log-sum-exp and the output's gradient (T, H, D).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> segment_attention_backward(
    torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor output, torch::Tensor grad_output,
    torch::Tensor logsumexp, torch::Tensor segments, double scale) {
  check_inputs(query, key, value);
  TORCH_CHECK(output.sizes() == query.sizes() && grad_output.sizes() == query.sizes() && output.stride(2) == 1 &&
              grad_output.stride(2) == 1 && output.scalar_type() == at::kBFloat16 &&
              grad_output.scalar_type() == at::kBFloat16, "the output and its gradient: the query's shape, bf16");
  TORCH_CHECK(logsumexp.scalar_type() == at::kFloat && logsumexp.dim() == 2, "logsumexp (T, H) float32");
  std::vector<Segment> list = read_segments(segments, query.size(0));
  for (const Segment& s : list) TORCH_CHECK(s.prefix_length == 0, "segment_attention_backward: no prefixes");
  const int64_t kv_heads = key.size(1), groups = query.size(1) / kv_heads;
  auto grad_query = torch::zeros_like(query, at::MemoryFormat::Contiguous);
  auto grad_key = torch::zeros_like(key, at::MemoryFormat::Contiguous);
  auto grad_value = torch::zeros_like(value, at::MemoryFormat::Contiguous);
  Gradients a{query, key, value, output, grad_output, logsumexp, grad_query, grad_key, grad_value};
  std::vector<std::pair<double, int64_t>> items;  // (cost, segment * H_kv + head), largest first
  for (size_t i = 0; i < list.size(); ++i)
    for (int64_t h = 0; h < kv_heads; ++h)
      items.push_back({double(list[i].length) * list[i].length, int64_t(i) * kv_heads + h});
  std::stable_sort(items.begin(), items.end(), [](auto& x, auto& y) { return x.first > y.first; });
  const float s = static_cast<float>(scale);
  #pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < (int64_t)items.size(); ++i) {
    const int64_t item = items[i].second;
    backward_segment(a, list[item / kv_heads], item % kv_heads, groups, s);
  }
  return {grad_query, grad_key, grad_value};
}
"""


@functools.cache
def segment_attention_op():
    """The kernel's module (segment_attention, segment_attention_backward), built or loaded once a process; None,
    with a warning, where the CPU lacks AVX-512 BF16 or the build fails (no compiler or ninja)."""
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():  # a private check: absent, no kernel
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        module = load_inline(NAME, cpp_sources=[SOURCE], functions=["segment_attention", "segment_attention_backward"],
                             extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as error:  # no compiler or ninja, or the build failed
        log.warning("attention: the C++ segment attention could not be built (%s); the compiled attention's own "
                    "calls are used", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    log.info("attention: the C++ segment attention (AVX-512 BF16) is in use")
    return module


def fits(dim: int) -> bool:
    """Whether the kernel takes heads of `dim` dimensions (whole vectors of 16 float32 lanes)."""
    return dim % 16 == 0


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[tuple[int, ...]],
                      scaling: float) -> torch.Tensor:
    """query (T, H, D), key and value (T, H_kv, D) in bf16 -> (T, H, D): each segment (first, length, prefix_first,
    prefix_length) causal over its prefix's keys and its own. Only where segment_attention_op() is not None."""
    table = torch.tensor(segments, dtype=torch.int64).view(-1, 4)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        if any(segment[3] for segment in segments):
            raise ValueError("segment_attention: a segment continuing a prefix (a swap tree) has no backward")
        return SegmentAttention.apply(query, key, value, table, float(scaling))
    return segment_attention_op().segment_attention(query, key, value, table, float(scaling))[0]


class SegmentAttention(torch.autograd.Function):
    """segment_attention with gradients (segments without a prefix: training has no swap trees): the forward keeps
    q, k, v, the output and its log-sum-exp (T, H) float32, the backward recomputes the weights from them."""

    @staticmethod
    def forward(ctx, query, key, value, table, scaling):
        output, logsumexp = segment_attention_op().segment_attention(query, key, value, table, scaling)
        ctx.save_for_backward(query, key, value, output, logsumexp, table)
        ctx.scaling = scaling
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp, table = ctx.saved_tensors
        grads = segment_attention_op().segment_attention_backward(  # an expanded gradient (of a sum) made whole
            query, key, value, output, grad_output.contiguous(), logsumexp, table, ctx.scaling)
        return *grads, None, None

