// Attention of short queries (decodes, and verifications of a few draft tokens) over the paged KV cache, reading
// each key and value row in place at its slot: no gathered copy of a sequence's context, no padding to the longest
// sequence, one task per sequence for all its query heads. Built on first use by cpu_kernels.py.
//
// Sequence i has query rows q_rows[q_offsets[i] .. q_offsets[i + 1]) (n rows: the last committed token, then its
// n - 1 draft tokens) and context slots slots[ctx_offsets[i] .. ctx_offsets[i + 1]) (L keys, in position order;
// the last n - 1 are the draft tokens' own). Every query sees keys 0 .. L - n; query row r sees draft key
// L - n + d (d = 1 .. n - 1) where bit d - 1 of visible[r] is set (a chain: d <= r; a tree: r's ancestors and r).
// Sums are float32; the output is written at each query row of `out` [T, H, D]. With AVX-512 BF16 and bfloat16
// caches, the query-key products use the CPU's bfloat16 dot product, 16 keys at a time (scores_bf16).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

namespace {

// The score of a key a query does not see: exp(kHidden - max) is 0. Finite, as the file is built with -ffast-math.
constexpr float kHidden = -1e30f;

// 16 independent float32 lanes (one AVX-512 register, two AVX2 ones), summed at the end: a single running sum
// would make every multiply-add wait for the one before it.
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    for (int j = 0; j < 16; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float sum = 0.f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return sum;
}

// How many keys ahead the loops prefetch: the rows sit wherever their blocks are, so the hardware's stride
// prefetcher sees only runs of one block.
constexpr int64_t kPrefetch = 8;

// Asks for a slot's row (`elements` values, every KV head) to be brought into the cache.
template <typename scalar_t>
inline void prefetch_slot(const scalar_t* cache, int64_t slot, int64_t stride_s, int64_t elements) {
  const char* row = reinterpret_cast<const char*>(cache + slot * stride_s);
  for (int64_t b = 0; b < elements * (int64_t)sizeof(scalar_t); b += 64) __builtin_prefetch(row + b);
}

// The row kPrefetch keys after l, if the context has one.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* cache, const int64_t* ctx, int64_t l, int64_t len, int64_t stride_s,
                         int64_t elements) {
  if (l + kPrefetch < len) prefetch_slot(cache, ctx[l + kPrefetch], stride_s, elements);
}

// Key (or value) l of a context, every KV head, as float32 into dst [kv_heads * dim]; prefetches row l + kPrefetch.
template <typename scalar_t>
inline void load_row(const scalar_t* cache, const int64_t* ctx, int64_t l, int64_t len, int64_t stride_s,
                     int64_t stride_h, int64_t kv_heads, int64_t dim, float* dst) {
  prefetch_row(cache, ctx, l, len, stride_s, kv_heads * dim);
  const scalar_t* row = cache + ctx[l] * stride_s;
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t d = 0; d < dim; ++d) dst[h * dim + d] = static_cast<float>(row[h * stride_h + d]);
  }
}

#if defined(__AVX512F__)
// bfloat16 rows as float32, 16 values a step (exact: a bfloat16 is the top half of its float32).
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* cache, const int64_t* ctx, int64_t l, int64_t len,
                                    int64_t stride_s, int64_t stride_h, int64_t kv_heads, int64_t dim, float* dst) {
  prefetch_row(cache, ctx, l, len, stride_s, kv_heads * dim);
  const c10::BFloat16* row = cache + ctx[l] * stride_s;
  for (int64_t h = 0; h < kv_heads; ++h) {
    const c10::BFloat16* src = row + h * stride_h;
    float* out = dst + h * dim;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
      _mm512_storeu_ps(out + d, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    }
    for (; d < dim; ++d) out[d] = static_cast<float>(src[d]);
  }
}
#endif

#if defined(__AVX512BF16__)
// Lane j of the result is the sum of v[j]'s 16 lanes: 16 horizontal sums in 30 shuffles and 15 adds, against
// about 8 instructions for each one alone.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 s[8], w[4];
  for (int i = 0; i < 8; ++i) {  // within each 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int m = 0; m < 4; ++m) {  // lane k of 128 bits: the sums over lane k of v[4m .. 4m + 3]
    w[m] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * m], s[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * m], s[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scaled query-key products of every query row (r * heads + h) with keys 0 .. len, 16 keys at a time; a key a row
// does not see gets kHidden. dim is a multiple of 32.
inline void scores_bf16(const c10::BFloat16* q, int64_t q_stride_t, int64_t q_stride_h, const int64_t* q_rows,
                        const c10::BFloat16* k_cache, int64_t stride_s, int64_t stride_h, const int64_t* ctx,
                        int64_t len, const int64_t* visible, int64_t n, int64_t heads, int64_t groups, int64_t dim,
                        float scale, float* scores) {
  const int64_t prefix = len - n + 1, elements = (heads / groups) * dim;
  const c10::BFloat16* keys[16];
  __m512 acc[16];
  alignas(64) float block[16];
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int64_t nb = std::min<int64_t>(16, len - l0);
    for (int64_t j = 0; j < 16; ++j) keys[j] = k_cache + ctx[l0 + (j < nb ? j : 0)] * stride_s;
    for (int64_t j = l0 + 16; j < std::min(len, l0 + 32); ++j) {  // the next block's rows
      prefetch_slot(k_cache, ctx[j], stride_s, elements);
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        const c10::BFloat16* qr = q + q_rows[r] * q_stride_t + h * q_stride_h;
        const int64_t off = (h / groups) * stride_h;
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 32) {
          const __m512bh qd = (__m512bh)_mm512_loadu_si512(qr + d);
          for (int j = 0; j < 16; ++j) {
            acc[j] = _mm512_dpbf16_ps(acc[j], qd, (__m512bh)_mm512_loadu_si512(keys[j] + off + d));
          }
        }
        _mm512_store_ps(block, _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale)));
        float* s = scores + (r * heads + h) * len + l0;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t l = l0 + j;
          s[j] = l < prefix || ((visible[r] >> (l - prefix)) & 1) ? block[j] : kHidden;
        }
      }
    }
  }
}
#endif

template <typename scalar_t>
void attend(const scalar_t* q, int64_t q_stride_t, int64_t q_stride_h,
            const scalar_t* k_cache, const scalar_t* v_cache, int64_t cache_stride_s, int64_t cache_stride_h,
            const int64_t* q_rows, const int64_t* q_offsets, const int64_t* slots, const int64_t* ctx_offsets,
            const int64_t* visible, float scale, scalar_t* out, int64_t out_stride_t, int64_t out_stride_h,
            int64_t num_seqs, int64_t kv_heads, int64_t groups, int64_t dim) {
  // One task per sequence, all its heads: a slot's K (or V) row of every head is one read.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    const int64_t heads = kv_heads * groups, width = kv_heads * dim;
    std::vector<float> qf, scores, acc, sums, kf(width), vf(width);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t q0 = q_offsets[seq], n = q_offsets[seq + 1] - q0;
      const int64_t c0 = ctx_offsets[seq], len = ctx_offsets[seq + 1] - c0;
      const int64_t* ctx = slots + c0;
      const int64_t rows = n * heads;  // row r * heads + h: query r of head h (KV head h / groups)
      scores.resize(rows * len);  // every entry is written below
      acc.assign(rows * dim, 0.f);
      sums.assign(rows, 0.f);
      const int64_t prefix = len - n + 1;  // keys every query sees
      bool scored = false;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (dim % 32 == 0) {  // bfloat16 keys and queries straight into the CPU's bf16 dot product
          scores_bf16(q, q_stride_t, q_stride_h, q_rows + q0, k_cache, cache_stride_s, cache_stride_h, ctx, len,
                      visible + q0, n, heads, groups, dim, scale, scores.data());
          scored = true;
        }
      }
#endif
      if (!scored) {  // float32 queries against each key row converted to float32
        qf.resize(rows * dim);
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* src = q + q_rows[q0 + r] * q_stride_t + h * q_stride_h;
            float* dst = qf.data() + (r * heads + h) * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
          }
        }
        for (int64_t l = 0; l < len; ++l) {
          load_row(k_cache, ctx, l, len, cache_stride_s, cache_stride_h, kv_heads, dim, kf.data());
          for (int64_t r = 0; r < n; ++r) {
            const bool seen = l < prefix || ((visible[q0 + r] >> (l - prefix)) & 1);
            for (int64_t h = 0; h < heads; ++h) {
              const int64_t row = r * heads + h;
              scores[row * len + l] =
                  seen ? dot(qf.data() + row * dim, kf.data() + (h / groups) * dim, dim) * scale : kHidden;
            }
          }
        }
      }
      for (int64_t row = 0; row < rows; ++row) {
        float* s = scores.data() + row * len;
        const float mx = *std::max_element(s, s + len);
        float sum = 0.f;
        for (int64_t l = 0; l < len; ++l) {
          s[l] = std::exp(s[l] - mx);
          sum += s[l];
        }
        sums[row] = sum;
      }
      for (int64_t l = 0; l < len; ++l) {
        load_row(v_cache, ctx, l, len, cache_stride_s, cache_stride_h, kv_heads, dim, vf.data());
        for (int64_t row = 0; row < rows; ++row) {
          const float p = scores[row * len + l];
          if (p == 0.f) continue;
          float* a = acc.data() + row * dim;
          const float* vh = vf.data() + ((row % heads) / groups) * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * vh[d];
        }
      }
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t r = row / heads, h = row % heads;
        scalar_t* dst = out + q_rows[q0 + r] * out_stride_t + h * out_stride_h;
        const float inv = 1.f / sums[row];
        const float* a = acc.data() + row * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(a[d] * inv);
      }
    }
  });
}

}  // namespace

void paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& q_rows, const torch::Tensor& q_offsets, const torch::Tensor& slots,
                            const torch::Tensor& ctx_offsets, const torch::Tensor& visible, double scale,
                            torch::Tensor& out) {
  // q: [T, H, D] (any strides, unit stride over D); caches: [S, Hkv, D]; out: [T, H, D].
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3 && out.dim() == 3, "expected 3-D tensors");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(2) == 1, "caches of one layout");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(), "one dtype");
  for (const auto* t : {&q_rows, &q_offsets, &slots, &ctx_offsets, &visible}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors are contiguous int64");
  }
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1), dim = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(2) == dim, "head geometry");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    attend<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k_cache.data_ptr<scalar_t>(),
                     v_cache.data_ptr<scalar_t>(), k_cache.stride(0), k_cache.stride(1), q_rows.data_ptr<int64_t>(),
                     q_offsets.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), ctx_offsets.data_ptr<int64_t>(),
                     visible.data_ptr<int64_t>(), static_cast<float>(scale), out.data_ptr<scalar_t>(), out.stride(0),
                     out.stride(1), q_offsets.size(0) - 1, kv_heads, heads / kv_heads, dim);
  });
}

// Without the GIL, as torch's own ops run (see layer_ops.cpp).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "short queries over the paged KV cache, in place",
        py::call_guard<py::gil_scoped_release>());
}
