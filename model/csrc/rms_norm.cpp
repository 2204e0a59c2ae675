// RMSNorm over the last dimension on the CPU (model/layers.py, _RMSNormFunction): for rows x [N, C],
//   forward:  y = x * r * w,  r = 1 / sqrt(sum(x^2) / C + eps)       (w = 1 without a weight)
//   backward: dx = r * g * w - x * r^3 * sum(g * w * x) / C,  dw = sum over rows of g * x * r.
// One pass over a row each way, while it is in L1; the forward saves r only. PyTorch's CPU
// rms_norm is about six elementwise kernels forward and a dozen backward, each a pass over x.
// dw sums rows in fixed chunks, then the chunks in order: it does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunkRows = 256;  // rows per partial sum of dw

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.dim() >= 1, "rms_norm: ", what, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "rms_norm: float32 or float64 ", what);
}

void check_weight(const c10::optional<at::Tensor>& w, const at::Tensor& x) {
  if (w.has_value())
    TORCH_CHECK(w->is_contiguous() && w->dim() == 1 && w->size(0) == x.size(-1) && w->scalar_type() == x.scalar_type(),
                "rms_norm: the weight must be a contiguous [C] of the input's dtype");
}

template <typename T>
void forward_rows(const T* X, const T* W, double eps, int64_t N, int64_t C, T* Y, T* R) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* x = X + n * C;
      T* y = Y + n * C;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
      const T r = T(1) / std::sqrt(ss / T(C) + T(eps));
      R[n] = r;
      if (W) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) y[c] = x[c] * r * W[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) y[c] = x[c] * r;
      }
    }
  });
}

template <typename T>
void backward_rows(const T* G, const T* X, const T* W, const T* R, int64_t N, int64_t C, T* DX, T* DW) {
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  std::vector<T> partial(DW ? chunks * C : 0, T(0));
  // One chunk of rows per task: the chunk boundaries (and so dw's rounding) are fixed by N alone.
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task * kChunkRows, last = std::min(N, first + kChunkRows);
      T* dw = DW ? partial.data() + task * C : nullptr;
      for (int64_t n = first; n < last; ++n) {
        const T *g = G + n * C, *x = X + n * C;
        const T r = R[n];
        T a = 0;
        if (W) {
#pragma omp simd reduction(+ : a)
          for (int64_t c = 0; c < C; ++c) a += g[c] * W[c] * x[c];
        } else {
#pragma omp simd reduction(+ : a)
          for (int64_t c = 0; c < C; ++c) a += g[c] * x[c];
        }
        if (DX) {
          T* dx = DX + n * C;
          const T coef = -a * r * r * r / T(C);
          if (W) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dx[c] = r * g[c] * W[c] + x[c] * coef;
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dx[c] = r * g[c] + x[c] * coef;
          }
        }
        if (dw) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dw[c] += g[c] * x[c] * r;
        }
      }
    }
  });
  if (DW) {
    for (int64_t c = 0; c < C; ++c) DW[c] = 0;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) DW[c] += partial[k * C + c];
  }
}

}  // namespace

// (y, r): y like x, r [N] with N = x.numel() / C
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
  check_rows(x, "input");
  check_weight(weight, x);
  const int64_t C = x.size(-1), N = C ? x.numel() / C : 0;
  auto y = at::empty_like(x);
  auto r = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), weight ? weight->data_ptr<scalar_t>() : nullptr, eps, N, C,
                           y.data_ptr<scalar_t>(), r.data_ptr<scalar_t>());
  });
  return {y, r};
}

// (dx, dw): each only where asked for (else an empty tensor)
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                          const c10::optional<at::Tensor>& weight, const at::Tensor& r,
                                          bool need_x, bool need_w) {
  check_rows(x, "input");
  check_rows(grad, "gradient");
  check_weight(weight, x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "rms_norm: the gradient must match the input");
  const int64_t C = x.size(-1), N = C ? x.numel() / C : 0;
  TORCH_CHECK(r.is_contiguous() && r.numel() == N && r.scalar_type() == x.scalar_type(), "rms_norm: r must be [N]");
  at::Tensor dx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor dw = need_w && weight ? at::empty({C}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
    backward_rows<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                            weight ? weight->data_ptr<scalar_t>() : nullptr, r.data_ptr<scalar_t>(), N, C,
                            dx.defined() ? dx.data_ptr<scalar_t>() : nullptr,
                            dw.defined() ? dw.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw};
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
}
