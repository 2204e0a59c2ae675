// The fused q/k/v projection's output into rotary-embedded heads, on the CPU (model/layers.py,
// rotary_qkv): for qkv [B, T, 3, H, D] (one token's q, k and v rows side by side),
//   forward:  the same layout with q and k's channel pairs (2i, 2i+1) at position t rotated by
//             angle_t,i: (x0 cos - x1 sin, x0 sin + x1 cos), v copied; q, k, v are its [B, H, T, D] views;
//   backward: the same with the angle negated, from the heads' gradients into one [B, T, 3, H, D].
// One pass each way. PyTorch's path is a rotation per tensor each way (complex products) plus a
// copy that stacks the three gradients into the projection's layout. A bfloat16 or float16
// projection (autocast) gives float32 heads: attention runs in float32 on the CPU (model/layers.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// One head row: out[2i], out[2i+1] = rotation by (cos[i], sign * sin[i]) of in[2i], in[2i+1], in A.
template <typename A, typename In, typename Out>
inline void rotate_row(const In* __restrict__ in, const A* __restrict__ cos, const A* __restrict__ sin, A sign,
                       int64_t half, Out* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const A x0 = static_cast<A>(in[2 * i]), x1 = static_cast<A>(in[2 * i + 1]), c = cos[i], s = sign * sin[i];
    out[2 * i] = static_cast<Out>(x0 * c - x1 * s);
    out[2 * i + 1] = static_cast<Out>(x0 * s + x1 * c);
  }
}

template <typename In, typename Out>
inline void copy_row(const In* __restrict__ in, int64_t D, Out* __restrict__ out) {
  if constexpr (std::is_same_v<In, Out>) {
    std::memcpy(out, in, D * sizeof(In));
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<Out>(static_cast<float>(in[d]));
  }
}

// Token-major rows [B, T, 3, H, D] of `rows` (type R) <-> the heads of q, k, v (type Hd): parts 0
// and 1 (q, k) rotated by +angle towards the heads (to_heads) or -angle back; part 2 (v) copied;
// arithmetic in A. heads[p] is addressed through its strides (b, h, t; unit stride along D): the
// heads are views of one output forward, and backward the gradients come in whatever layout
// attention's backward gave them.
template <typename A, typename R, typename Hd>
void move(R* rows, Hd* const* heads, const int64_t* strides, const A* cos, const A* sin, int64_t B, int64_t Tn,
          int64_t H, int64_t D, bool to_heads) {
  const int64_t half = D / 2;
  const A sign = to_heads ? A(1) : A(-1);
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / Tn, t = bt % Tn;
      for (int64_t p = 0; p < 3; ++p)
        for (int64_t h = 0; h < H; ++h) {
          R* row = rows + ((bt * 3 + p) * H + h) * D;
          Hd* head = heads[p] + b * strides[3 * p] + h * strides[3 * p + 1] + t * strides[3 * p + 2];
          if (to_heads) {
            if (p < 2) rotate_row<A>(row, cos + t * half, sin + t * half, sign, half, head);
            else copy_row(row, D, head);
          } else {
            if (p < 2) rotate_row<A>(head, cos + t * half, sin + t * half, sign, half, row);
            else copy_row(head, D, row);
          }
        }
    }
  });
}

// The heads' dtype and the projection's: (float32, float32 / bfloat16 / float16) or (float64, float64).
// A: the heads' dtype, in which the tables come and the arithmetic runs.
template <typename F>
void dispatch(at::ScalarType heads, at::ScalarType rows, F&& f) {
  if (heads == at::kDouble && rows == at::kDouble) return f(double{}, double{});
  TORCH_CHECK(heads == at::kFloat, "rotary_qkv: float32 heads for a float32, bfloat16 or float16 projection, "
              "or float64 for float64; got heads ", heads, ", projection ", rows);
  if (rows == at::kFloat) return f(float{}, float{});
  if (rows == at::kBFloat16) return f(float{}, at::BFloat16{});
  if (rows == at::kHalf) return f(float{}, at::Half{});
  TORCH_CHECK(false, "rotary_qkv: a float32, bfloat16 or float16 projection for float32 heads; got ", rows);
}

void check_tables(const at::Tensor& cos, const at::Tensor& sin, at::ScalarType heads, int64_t Tn, int64_t D) {
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == Tn && t->size(1) == D / 2 &&
                    t->scalar_type() == heads,
                "rotary_qkv: cos and sin must be contiguous [T, D/2] of the heads' dtype");
}

}  // namespace

// qkv [B, T, 3 * H * D] -> the same layout in `heads` dtype with q and k rotated (v copied): q, k, v
// are its views [B, H, T, D] (attention reads them strided, as it would read the projection's)
at::Tensor rotary_qkv_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                              at::ScalarType heads) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.dim() == 3 && H > 0 && qkv.size(2) % (3 * H) == 0 &&
                  (qkv.size(2) / (3 * H)) % 2 == 0,
              "rotary_qkv: a contiguous [B, T, 3 * heads * head_dim] projection with an even head_dim");
  const int64_t B = qkv.size(0), Tn = qkv.size(1), D = qkv.size(2) / (3 * H);
  check_tables(cos, sin, heads, Tn, D);
  auto out = at::empty(qkv.sizes(), qkv.options().dtype(heads));
  dispatch(heads, qkv.scalar_type(), [&](auto a, auto r) {
    using A = decltype(a);
    using R = decltype(r);
    A* base = out.data_ptr<A>();
    A* dst[3] = {base, base + H * D, base + 2 * H * D};
    const int64_t s[3] = {Tn * 3 * H * D, D, 3 * H * D};
    const int64_t strides[9] = {s[0], s[1], s[2], s[0], s[1], s[2], s[0], s[1], s[2]};
    move<A>(const_cast<R*>(qkv.data_ptr<R>()), dst, strides, cos.data_ptr<A>(), sin.data_ptr<A>(), B, Tn, H, D,
            true);
  });
  return out;
}

// the gradients of q, k, v ([B, H, T, D] each, one dtype, unit stride along D) -> the projection's
// [B, T, 3 * H * D] in dtype `rows`
at::Tensor rotary_qkv_backward(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& cos,
                               const at::Tensor& sin, at::ScalarType rows) {
  for (const auto* g : {&gq, &gk, &gv})
    TORCH_CHECK(g->dim() == 4 && g->stride(3) == 1 && g->sizes() == gq.sizes() && g->scalar_type() == gq.scalar_type(),
                "rotary_qkv: the gradients must be [B, H, T, D] of one dtype, unit stride along D");
  const int64_t B = gq.size(0), H = gq.size(1), Tn = gq.size(2), D = gq.size(3);
  TORCH_CHECK(D % 2 == 0, "rotary_qkv: an even head_dim");
  check_tables(cos, sin, gq.scalar_type(), Tn, D);
  auto grad = at::empty({B, Tn, 3 * H * D}, gq.options().dtype(rows));
  dispatch(gq.scalar_type(), rows, [&](auto a, auto r) {
    using A = decltype(a);
    using R = decltype(r);
    A* src[3] = {const_cast<A*>(gq.data_ptr<A>()), const_cast<A*>(gk.data_ptr<A>()), const_cast<A*>(gv.data_ptr<A>())};
    int64_t strides[9];
    const at::Tensor* g[3] = {&gq, &gk, &gv};
    for (int p = 0; p < 3; ++p)
      for (int d = 0; d < 3; ++d) strides[3 * p + d] = g[p]->stride(d);
    move<A>(grad.data_ptr<R>(), src, strides, cos.data_ptr<A>(), sin.data_ptr<A>(), B, Tn, H, D, false);
  });
  return grad;
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("rotary_qkv_forward", &rotary_qkv_forward);
  m.def("rotary_qkv_backward", &rotary_qkv_backward);
}
