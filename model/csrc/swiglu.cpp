// SwiGLU's activation on the CPU (model/layers.py, _SwiGLUFunction): for rows [gate | up] of the fused
// projection,
//   forward:  out = silu(g) * u,        g = min(gate, c), u = clamp(up, -c, c)   (no clamp: c = inf)
//   backward: d_up = grad * silu(g) * [-c <= up <= c],   d_gate = grad * u * silu'(g) * [gate <= c]
//             (the masks only with a clamp), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
// One pass each way, nothing saved but the projection itself: PyTorch's path is two elementwise
// kernels forward (saving silu(g)) and three backward. float32 runs 16 lanes at a time (8 without
// AVX-512) with its own exp (below), bfloat16 (autocast) the same in float32 lanes, rounded once on
// the way out; float64 (gradient checks) runs the same formulas with std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace {

#ifdef __AVX512F__  // the exp's arithmetic bounds the forward: 16 lanes took it from 0.72 to 0.53 ms (default FFN)
constexpr int kBytes = 64;
#else
constexpr int kBytes = 32;
#endif
typedef float vf __attribute__((vector_size(kBytes)));
typedef int32_t vi __attribute__((vector_size(kBytes)));
typedef uint32_t vu __attribute__((vector_size(kBytes)));
constexpr int64_t kLanes = kBytes / sizeof(float);

inline vf splat(float v) { return vf{} + v; }

// e^x for x <= 0, x >= -87.3 (clamped there: e^x stays a normal float); NaN stays NaN. x = n ln2 + r
// with |r| <= ln2/2 (n rounded to nearest by adding and removing 1.5 * 2^23), e^r by its Taylor
// series to r^7 (truncation error 6e-9 relative, below float's half-ulp), 2^n written into the
// exponent bits.
inline vf exp_nonpositive(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  const vf magic = splat(12582912.0f);
  const vf n = (x * splat(1.44269504f) + magic) - magic;
  const vf r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
  vf p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vu bits = __builtin_convertvector(__builtin_convertvector(n, vi) + 127, vu) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// sigmoid(g) from e = e^{-|g|} in (0, 1]: no overflow at either end.
inline vf sigmoid(vf g) {
  const vf a = g < splat(0.0f) ? g : -g;
  const vf e = exp_nonpositive(a);
  return (g < splat(0.0f) ? e : splat(1.0f)) / (splat(1.0f) + e);  // one division: the costly part
}
inline double sigmoid(double g) {
  const double e = std::exp(-std::abs(g));
  return g < 0 ? e / (1 + e) : 1 / (1 + e);
}

inline vf lanes_min(vf a, float c) { return a > splat(c) ? splat(c) : a; }  // NaN stays NaN
inline double lanes_min(double a, double c) { return a > c ? c : a; }
inline vf lanes_max(vf a, float c) { return a < splat(c) ? splat(c) : a; }
inline double lanes_max(double a, double c) { return a < c ? c : a; }

template <typename T, typename S>
inline T forward_value(T gate, T up, S c) {
  const T g = lanes_min(gate, c), u = lanes_max(lanes_min(up, c), -c);
  return g * sigmoid(g) * u;
}

// (d_gate, d_up); `clamped`: mask the gradient where the clamp cut the input (also where it is NaN)
template <typename T, typename S>
inline void backward_value(T grad, T gate, T up, S c, bool clamped, T& d_gate, T& d_up) {
  const T g = lanes_min(gate, c), u = lanes_max(lanes_min(up, c), -c);
  const T s = sigmoid(g);
  d_up = grad * (g * s);
  d_gate = grad * u * (s * (S(1) + g * (S(1) - s)));
  if (clamped) {
    if constexpr (std::is_same_v<T, vf>) {
      d_gate = gate <= splat(c) ? d_gate : splat(0.0f);
      d_up = (up >= splat(-c)) & (up <= splat(c)) ? d_up : splat(0.0f);
    } else {
      d_gate = gate <= c ? d_gate : 0;
      d_up = up >= -c && up <= c ? d_up : 0;
    }
  }
}

// n < kLanes only at a row's end: whole vectors are copied with a constant size (one instruction),
// the partial one lane by lane.
inline vf load(const float* p, int64_t n) {
  vf v = {};
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  }
  return v;
}
inline void store(float* p, vf v, int64_t n) {
  if (n == kLanes) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) p[l] = v[l];
  }
}

// bfloat16 (autocast): the upper half of a float32; stored rounded to nearest even, NaN as quiet NaN
// (c10::BFloat16's rounding)
typedef uint16_t vh __attribute__((vector_size(kBytes / 2)));
inline vf load(const at::BFloat16* p, int64_t n) {
  vh h = {};
  if (n == kLanes) {
    std::memcpy(&h, p, sizeof(h));
  } else {
    for (int64_t l = 0; l < n; ++l) h[l] = p[l].x;
  }
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline void store(at::BFloat16* p, vf v, int64_t n) {
  vu bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vu nan = (vu)(v != v);
  bits = (((bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16) & ~nan) | (nan & 0x7FC0u);
  const vh h = __builtin_convertvector(bits, vh);
  if (n == kLanes) {
    std::memcpy(p, &h, sizeof(h));
  } else {
    for (int64_t l = 0; l < n; ++l) p[l].x = h[l];
  }
}

void check(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "swiglu: a contiguous [..., 2 * hidden] projection");
  const auto t = gate_up.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, "swiglu: float32, float64 or bfloat16");
}

// float32 or bfloat16 storage S, float32 lanes
template <typename S>
void forward_rows(const S* X, S* O, int64_t rows, int64_t H, float c) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < H; i += kLanes) {
        const int64_t n = std::min(kLanes, H - i);
        store(O + r * H + i, forward_value(load(X + r * 2 * H + i, n), load(X + r * 2 * H + H + i, n), c), n);
      }
  });
}

template <typename S>
void backward_rows(const S* G, const S* X, S* D, int64_t rows, int64_t H, float c, bool clamped) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < H; i += kLanes) {
        const int64_t n = std::min(kLanes, H - i);
        vf dg, du;
        backward_value(load(G + r * H + i, n), load(X + r * 2 * H + i, n), load(X + r * 2 * H + H + i, n), c,
                       clamped, dg, du);
        store(D + r * 2 * H + i, dg, n);
        store(D + r * 2 * H + H + i, du, n);
      }
  });
}

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& gate_up, double clamp) {
  check(gate_up);
  const int64_t H = gate_up.size(-1) / 2, rows = H ? gate_up.numel() / (2 * H) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = H;
  auto out = at::empty(sizes, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    forward_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, H, static_cast<float>(clamp));
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    forward_rows(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, H, static_cast<float>(clamp));
  } else {
    const double* X = gate_up.data_ptr<double>();
    double* O = out.data_ptr<double>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < H; ++i) O[r * H + i] = forward_value(X[r * 2 * H + i], X[r * 2 * H + H + i], clamp);
    });
  }
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up, double clamp, bool clamped) {
  check(gate_up);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == gate_up.scalar_type() &&
                  grad.numel() * 2 == gate_up.numel(),
              "swiglu: the gradient must be a contiguous [..., hidden] of the projection's dtype");
  const int64_t H = gate_up.size(-1) / 2, rows = H ? gate_up.numel() / (2 * H) : 0;
  auto d = at::empty_like(gate_up);
  if (gate_up.scalar_type() == at::kFloat) {
    backward_rows(grad.data_ptr<float>(), gate_up.data_ptr<float>(), d.data_ptr<float>(), rows, H,
                  static_cast<float>(clamp), clamped);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    backward_rows(grad.data_ptr<at::BFloat16>(), gate_up.data_ptr<at::BFloat16>(), d.data_ptr<at::BFloat16>(), rows,
                  H, static_cast<float>(clamp), clamped);
  } else {
    const double *X = gate_up.data_ptr<double>(), *G = grad.data_ptr<double>();
    double* D = d.data_ptr<double>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < H; ++i)
          backward_value(G[r * H + i], X[r * 2 * H + i], X[r * 2 * H + H + i], clamp, clamped, D[r * 2 * H + i],
                         D[r * 2 * H + H + i]);
    });
  }
  return d;
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward", &swiglu_backward);
}
