// The fused q/k/v projection's output into rotary-embedded heads, on the CPU (model/layers.py,
// rotary_qkv): for qkv [B, T, 3, H, D] (one token's q, k and v rows side by side),
//   forward:  the same layout with q and k's channel pairs (2i, 2i+1) at position t rotated by
//             angle_t,i: (x0 cos - x1 sin, x0 sin + x1 cos), v copied; q, k, v are its [B, H, T, D] views;
//   backward: the same with the angle negated, from the heads' gradients into one [B, T, 3, H, D].
// One pass each way. PyTorch's path is a rotation per tensor each way (complex products) plus a
// copy that stacks the three gradients into the projection's layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

// One head row: out[2i], out[2i+1] = rotation by (cos[i], sign * sin[i]) of in[2i], in[2i+1].
template <typename T>
inline void rotate_row(const T* __restrict__ in, const T* __restrict__ cos, const T* __restrict__ sin, T sign,
                       int64_t half, T* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const T x0 = in[2 * i], x1 = in[2 * i + 1], c = cos[i], s = sign * sin[i];
    out[2 * i] = x0 * c - x1 * s;
    out[2 * i + 1] = x0 * s + x1 * c;
  }
}

// Token-major rows [B, T, 3, H, D] of `rows` <-> the heads of q, k, v: parts 0 and 1 (q, k) rotated
// by +angle towards the heads (to_heads) or -angle back; part 2 (v) copied. heads[p] is addressed
// through its strides (b, h, t; unit stride along D): the heads are views of `rows` forward, and
// backward the gradients come in whatever layout attention's backward gave them.
template <typename T>
void move(T* rows, T* const* heads, const int64_t* strides, const T* cos, const T* sin, int64_t B, int64_t Tn,
          int64_t H, int64_t D, bool to_heads) {
  const int64_t half = D / 2;
  const T sign = to_heads ? T(1) : T(-1);
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / Tn, t = bt % Tn;
      for (int64_t p = 0; p < 3; ++p)
        for (int64_t h = 0; h < H; ++h) {
          T* row = rows + ((bt * 3 + p) * H + h) * D;
          T* head = heads[p] + b * strides[3 * p] + h * strides[3 * p + 1] + t * strides[3 * p + 2];
          T* out = to_heads ? head : row;
          const T* in = to_heads ? row : head;
          if (p < 2) {
            rotate_row(in, cos + t * half, sin + t * half, sign, half, out);
          } else {
            std::memcpy(out, in, D * sizeof(T));
          }
        }
    }
  });
}

void check_tables(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& like, int64_t Tn, int64_t D) {
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == Tn && t->size(1) == D / 2 &&
                    t->scalar_type() == like.scalar_type(),
                "rotary_qkv: cos and sin must be contiguous [T, D/2] of the projection's dtype");
}

}  // namespace

// qkv [B, T, 3 * H * D] -> the same layout with q and k rotated (v copied): q, k, v are its views
// [B, H, T, D] (attention reads them strided, as it would read the projection's)
at::Tensor rotary_qkv_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t H) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.dim() == 3 && H > 0 && qkv.size(2) % (3 * H) == 0 &&
                  (qkv.size(2) / (3 * H)) % 2 == 0,
              "rotary_qkv: a contiguous [B, T, 3 * heads * head_dim] projection with an even head_dim");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble, "rotary_qkv: float32 or float64");
  const int64_t B = qkv.size(0), Tn = qkv.size(1), D = qkv.size(2) / (3 * H);
  check_tables(cos, sin, qkv, Tn, D);
  auto out = at::empty_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "rotary_qkv_forward", [&] {
    scalar_t* base = out.data_ptr<scalar_t>();
    scalar_t* heads[3] = {base, base + H * D, base + 2 * H * D};
    const int64_t s[3] = {Tn * 3 * H * D, D, 3 * H * D};
    const int64_t strides[9] = {s[0], s[1], s[2], s[0], s[1], s[2], s[0], s[1], s[2]};
    move<scalar_t>(const_cast<scalar_t*>(qkv.data_ptr<scalar_t>()), heads, strides, cos.data_ptr<scalar_t>(),
                   sin.data_ptr<scalar_t>(), B, Tn, H, D, true);
  });
  return out;
}

// the gradients of q, k, v ([B, H, T, D] each, unit stride along D) -> the projection's [B, T, 3 * H * D]
at::Tensor rotary_qkv_backward(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& cos,
                               const at::Tensor& sin) {
  for (const auto* g : {&gq, &gk, &gv})
    TORCH_CHECK(g->dim() == 4 && g->stride(3) == 1 && g->sizes() == gq.sizes() && g->scalar_type() == gq.scalar_type(),
                "rotary_qkv: the gradients must be [B, H, T, D] of one dtype, unit stride along D");
  TORCH_CHECK(gq.scalar_type() == at::kFloat || gq.scalar_type() == at::kDouble, "rotary_qkv: float32 or float64");
  const int64_t B = gq.size(0), H = gq.size(1), Tn = gq.size(2), D = gq.size(3);
  TORCH_CHECK(D % 2 == 0, "rotary_qkv: an even head_dim");
  check_tables(cos, sin, gq, Tn, D);
  auto grad = at::empty({B, Tn, 3 * H * D}, gq.options());
  AT_DISPATCH_FLOATING_TYPES(gq.scalar_type(), "rotary_qkv_backward", [&] {
    scalar_t* src[3] = {const_cast<scalar_t*>(gq.data_ptr<scalar_t>()), const_cast<scalar_t*>(gk.data_ptr<scalar_t>()),
                        const_cast<scalar_t*>(gv.data_ptr<scalar_t>())};
    int64_t strides[9];
    const at::Tensor* g[3] = {&gq, &gk, &gv};
    for (int p = 0; p < 3; ++p)
      for (int d = 0; d < 3; ++d) strides[3 * p + d] = g[p]->stride(d);
    move<scalar_t>(grad.data_ptr<scalar_t>(), src, strides, cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), B,
                   Tn, H, D, false);
  });
  return grad;
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("rotary_qkv_forward", &rotary_qkv_forward);
  m.def("rotary_qkv_backward", &rotary_qkv_backward);
}
