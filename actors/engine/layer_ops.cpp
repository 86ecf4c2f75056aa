// The elementwise work of a Llama-family decoder layer around its linears, one call each instead of the ten or so
// small torch ops (and their dispatch) of the eager layer: RMSNorm with the residual add before it, and rotary
// embedding of q and k with the step's keys and values written into the paged cache. Used by decoder_forward.py.
//
// The arithmetic is the eager layer's (transformers' LlamaRMSNorm, apply_rotary_pos_emb), to the bit: every
// bfloat16 op there computes in float32 and rounds to bfloat16, and so does each step here; the RMSNorm's sum of
// squares adds in the order torch's CPU sum does (torch_order_sum). Built without -ffast-math and with
// -ffp-contract=off (cpu_kernels.py), so the compiler keeps that order and fuses no multiply-add.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> T rounded to nearest even, as torch converts (NaN to the quiet NaN); in plain integer ops, which the
// compiler vectorizes and which -ffast-math cannot reorder.
template <typename T>
inline T narrow(float x);
template <>
inline float narrow<float>(float x) { return x; }
template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  c10::BFloat16 b;
  b.x = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return b;
}

// The value a T op would return for the float32 result x.
template <typename T>
inline float rounded(float x) { return widen(narrow<T>(x)); }

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = uint64_t(x) - 1; v > 1; v >>= 1) ++bits;  // floor(log2(x - 1))
  return bits + 1;
}

// x[0] + ... + x[n - 1] as torch's CPU sum reduction adds a contiguous float32 row with vectors of `lanes` floats
// (8 with torch 2.13 on AVX2 and AVX-512 machines alike; cpu_kernels.py checks which). The row's whole vectors go,
// one after another, into four interleaved vector accumulators (vector v into accumulator v % 4), cascaded every
// 16 rounds of four vectors into up to three higher levels so that only partial sums of similar size meet; the
// levels are folded back, the vectors past the last whole round added to accumulator 0, then accumulators 1-3 to
// accumulator 0; the elements past the last whole vector are summed from 0, and accumulator 0's lanes added to
// that, lane 0 first. The order is what makes the result torch's to the last bit.
template <int64_t lanes>
float torch_order_sum(const float* x, int64_t n) {
  constexpr int64_t kLevels = 4, kAccumulators = 4;
  const int64_t vectors = n / lanes, rounds = vectors / kAccumulators;
  const int64_t power = std::max<int64_t>(4, ceil_log2(rounds) / kLevels), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  float acc[kLevels][kAccumulators][lanes] = {};
  auto add_round = [&](int64_t round) {
    for (int64_t a = 0; a < kAccumulators; ++a) {
      const float* v = x + (round * kAccumulators + a) * lanes;
      for (int64_t l = 0; l < lanes; ++l) acc[0][a][l] += v[l];
    }
  };
  int64_t round = 0;
  while (round + step <= rounds) {
    for (int64_t j = 0; j < step; ++j) add_round(round++);
    for (int64_t level = 1; level < kLevels; ++level) {
      for (int64_t a = 0; a < kAccumulators; ++a) {
        for (int64_t l = 0; l < lanes; ++l) {
          acc[level][a][l] += acc[level - 1][a][l];
          acc[level - 1][a][l] = 0.f;
        }
      }
      if ((round & (mask << (level * power))) != 0) break;
    }
  }
  for (; round < rounds; ++round) add_round(round);
  for (int64_t level = 1; level < kLevels; ++level) {
    for (int64_t a = 0; a < kAccumulators; ++a) {
      for (int64_t l = 0; l < lanes; ++l) acc[0][a][l] += acc[level][a][l];
    }
  }
  for (int64_t v = rounds * kAccumulators; v < vectors; ++v) {
    for (int64_t l = 0; l < lanes; ++l) acc[0][0][l] += x[v * lanes + l];
  }
  for (int64_t a = 1; a < kAccumulators; ++a) {
    for (int64_t l = 0; l < lanes; ++l) acc[0][0][l] += acc[0][a][l];
  }
  float total = 0.f;
  for (int64_t i = vectors * lanes; i < n; ++i) total += x[i];
  for (int64_t l = 0; l < lanes; ++l) total += acc[0][0][l];
  return total;
}

// Rows of at least this many elements a thread: a decode step's few rows stay on the calling thread.
constexpr int64_t kGrainElements = 1 << 15;

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, T* residual, int64_t res_stride, const T* weight, T* out,
                   int64_t out_stride, int64_t rows, int64_t n, float eps, int64_t sum_lanes) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    std::vector<float> h(n), squares(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      if (residual != nullptr) {  // the layer's `residual + hidden`, kept as the next residual
        T* res = residual + r * res_stride;
        for (int64_t i = 0; i < n; ++i) {
          const T sum = narrow<T>(widen(res[i]) + widen(xr[i]));
          res[i] = sum;
          h[i] = widen(sum);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) h[i] = widen(xr[i]);
      }
      // The eager norm: mean(h ** 2) (on CPU torch's sum, then a division), 1 / sqrt of it plus eps.
      for (int64_t i = 0; i < n; ++i) squares[i] = h[i] * h[i];
      const float sum = sum_lanes == 16 ? torch_order_sum<16>(squares.data(), n)
                                        : torch_order_sum<8>(squares.data(), n);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
      T* o = out + r * out_stride;
      for (int64_t k = 0; k < n; ++k) o[k] = narrow<T>(widen(weight[k]) * rounded<T>(h[k] * inv));
    }
  });
}

// x [.., D] of one head at one position, rotated: x * cos + rotate_half(x) * sin, each product and the sum rounded
// as T ops round them. dst may be x.
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, int64_t dim, T* dst, float* scratch) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float turned = d < half ? -widen(x[d + half]) : widen(x[d - half]);
    scratch[d] = rounded<T>(rounded<T>(widen(x[d]) * widen(cos[d])) + rounded<T>(turned * widen(sin[d])));
  }
  for (int64_t d = 0; d < dim; ++d) dst[d] = narrow<T>(scratch[d]);
}

template <typename T>
void rope_rows(T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v, int64_t v_stride, const T* cos,
               const T* sin, int64_t cs_stride, const int64_t* slots, T* k_cache, T* v_cache, int64_t cache_stride,
               int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / ((heads + kv_heads) * dim)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dim);
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * cs_stride;
      const T* s = sin + t * cs_stride;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = q + t * q_stride + h * dim;
        rotate(row, c, s, dim, row, scratch.data());
      }
      T* k_dst = k_cache + slots[t] * cache_stride;
      for (int64_t h = 0; h < kv_heads; ++h) rotate(k + t * k_stride + h * dim, c, s, dim, k_dst + h * dim,
                                                    scratch.data());
      std::memcpy(v_cache + slots[t] * cache_stride, v + t * v_stride, kv_heads * dim * sizeof(T));
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

}  // namespace

void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out,
              const c10::optional<torch::Tensor>& residual, int64_t sum_lanes) {
  // x, out, residual: [R, N]; weight: [N]. With `residual`, residual += x first (in x's dtype) and the sum is
  // normalized. out may be x. sum_lanes: the float32 vector width of torch's CPU kernels here (8 or 16).
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(sum_lanes == 8 || sum_lanes == 16, "sum_lanes is 8 or 16");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && out.sizes() == x.sizes(), "RMSNorm shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(), "one dtype");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual like x");
  }
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rms_norm_rows<float>(x.data_ptr<float>(), x.stride(0), residual ? residual->data_ptr<float>() : nullptr,
                           residual ? residual->stride(0) : 0, weight.data_ptr<float>(), out.data_ptr<float>(),
                           out.stride(0), x.size(0), x.size(1), static_cast<float>(eps), sum_lanes);
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = c10::BFloat16;
      rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual ? residual->data_ptr<T>() : nullptr,
                       residual ? residual->stride(0) : 0, weight.data_ptr<T>(), out.data_ptr<T>(), out.stride(0),
                       x.size(0), x.size(1), static_cast<float>(eps), sum_lanes);
    }));
}

torch::Tensor sum_rows(const torch::Tensor& x, int64_t lanes) {
  // The sums of x's rows [R, N] (float32) in torch_order_sum's order: how cpu_kernels.py checks `lanes`.
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && (lanes == 8 || lanes == 16), "float32 rows, 8 or 16 lanes");
  auto out = torch::empty({x.size(0)}, x.options());
  for (int64_t r = 0; r < x.size(0); ++r) {
    const float* row = x.data_ptr<float>() + r * x.stride(0);
    out.data_ptr<float>()[r] = lanes == 16 ? torch_order_sum<16>(row, x.size(1)) : torch_order_sum<8>(row, x.size(1));
  }
  return out;
}

void rope_store(torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                const torch::Tensor& sin, const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache) {
  // q [T, H * D] rotated in place; k [T, Hkv * D] rotated into k_cache[slots[t]], v copied into v_cache[slots[t]];
  // cos, sin [T, D]; caches [S, Hkv, D] contiguous.
  using Tensors = std::initializer_list<const torch::Tensor*>;
  for (const torch::Tensor* t : Tensors{&q, &k, &v, &cos, &sin}) check_rows(*t, "q, k, v, cos and sin");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes(), "caches [S, Hkv, D], contiguous");
  const int64_t rows = q.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2);
  TORCH_CHECK(dim % 2 == 0 && cos.size(1) == dim && sin.sizes() == cos.sizes() && cos.size(0) == rows, "rotary shapes");
  TORCH_CHECK(q.size(1) % dim == 0 && k.size(1) == kv_heads * dim && v.sizes() == k.sizes() && k.size(0) == rows,
              "q, k, v shapes");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == rows, "slots");
  for (const torch::Tensor* t : Tensors{&k, &v, &cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "one dtype");
  }
  AT_DISPATCH_SWITCH(q.scalar_type(), "rope_store",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rope_rows<float>(q.data_ptr<float>(), q.stride(0), k.data_ptr<float>(), k.stride(0), v.data_ptr<float>(),
                       v.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0),
                       slots.data_ptr<int64_t>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                       kv_heads * dim, rows, q.size(1) / dim, kv_heads, dim);
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = c10::BFloat16;
      rope_rows<T>(q.data_ptr<T>(), q.stride(0), k.data_ptr<T>(), k.stride(0), v.data_ptr<T>(), v.stride(0),
                   cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), slots.data_ptr<int64_t>(),
                   k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), kv_heads * dim, rows, q.size(1) / dim, kv_heads,
                   dim);
    }));
}

// Without the GIL, as torch's own ops run: the replica's event loop (streaming the last step's tokens) runs beside
// them rather than waiting for the engine thread to return to Python.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, after adding them into a residual if one is given", release());
  m.def("sum_rows", &sum_rows, "row sums in the order of torch's CPU sum with vectors of `lanes` floats");
  m.def("rope_store", &rope_store, "rotary embedding of q in place and of k into the KV cache, v into the cache",
        release());
}
