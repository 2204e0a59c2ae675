// Fused CPU kernels for hyper-connections (model/mhc.py, model/hc_kernel.py).
//
// Eager PyTorch spends an mHC sublayer in ~15 passes over the n-times-wide stream state plus ~100
// tiny Sinkhorn ops. Here each token's n*C state row is loaded once per kernel and everything that
// depends on it (RMS, the phi projection, sigmoid gates, Sinkhorn, the stream read) happens while
// it is in L1; the backward recomputes Sinkhorn per token instead of storing its iterations.
//
// Two kernels, each with its backward:
//   mhc_in:  X [T, n*C] -> m = phi X / rms(X); pre = sigmoid(a0 m + b_pre) + eps_hc;
//            (with mix) post = 2 sigmoid(a1 m + b_post), res = Sinkhorn(a2 m + b_res)^T (V4's
//            iteration on its comb layout [input, output]; res is output x input);
//            x_in = sum_i pre_i X_i.                        (without mix: the final stream reduce)
//   mix:     X' [j] = sum_i res[j, i] X_i + post_j y.
// The phi products happen in the same passes, as register tiles over the block's rows while they are
// in cache (hc_tiles.h). The parameter gradients go to a fixed number of token chunks summed in
// order, so they do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "hc_tiles.h"

namespace {

constexpr int64_t kChunks = 32;  // token chunks for parameter-gradient sums
// Blocks whose mp gradients feed one pass over phi's gradient sum (K x S, in L2 at best): one pass
// per block read and wrote it 3x the state's bytes, and the backward at d_model = 1024 lost time.
constexpr int64_t kRun = 4;

// Sinkhorn's backward through converged iterations leaves gradients that shrink towards zero and
// pass through the denormal range, where x86 arithmetic takes a slow path (the mHC backward took
// a third longer in a training step). For its lifetime on this thread, denormal results and inputs
// count as zero: a change below 1.2e-38 (float32's smallest normal), which no gradient can see.
struct DenormalsAreZero {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) and DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// DeepSeek-V4's Sinkhorn on V tokens at once; every array is [entries][V]. The logits z [n*n]
// (row i, column j) get a softmax along each row plus eps, then 2*iters - 1 line normalisations
// alternating column, row, column, ... (V4: one column normalisation, then iters - 1 x (row,
// column)); every denominator is line sum + eps. Keeps each normalisation for the backward.
template <typename acc_t>
struct SinkhornBlock {
  int64_t n, steps;
  acc_t eps;
  std::vector<acc_t> buf;  // s [n*n] (the softmax, before eps); per step: inv [n] = 1 / (line sum + eps), p [n*n]

  SinkhornBlock(int64_t n_, int64_t iters_, acc_t eps_)
      : n(n_), steps(iters_ > 0 ? 2 * iters_ - 1 : 0), eps(eps_), buf((n_ * n_ + steps * (n_ + n_ * n_)) * V) {}

  acc_t* s0() { return buf.data(); }
  acc_t* inv(int64_t t) { return buf.data() + (n * n + t * (n + n * n)) * V; }
  acc_t* p(int64_t t) { return inv(t) + n * V; }
  // Step t's lines: line l's entries are l*across + k*along (columns: 1, n; rows: n, 1).
  int64_t across(int64_t t) const { return t % 2 == 0 ? 1 : n; }
  int64_t along(int64_t t) const { return t % 2 == 0 ? n : 1; }

  // Restrict-qualified: the arrays share one buffer, and without the promise the compiler keeps
  // the lane loops scalar.
  const acc_t* forward(const acc_t* __restrict__ z) {
    acc_t* __restrict__ S0 = s0();
    for (int64_t i = 0; i < n; ++i) {
      acc_t mx[V], s[V];
      for (int64_t v = 0; v < V; ++v) mx[v] = z[(i * n) * V + v], s[v] = 0;
      for (int64_t j = 1; j < n; ++j)
        for (int64_t v = 0; v < V; ++v) mx[v] = std::max(mx[v], z[(i * n + j) * V + v]);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t v = 0; v < V; ++v) s[v] += (S0[(i * n + j) * V + v] = std::exp(z[(i * n + j) * V + v] - mx[v]));
      for (int64_t v = 0; v < V; ++v) s[v] = acc_t(1) / s[v];
      for (int64_t j = 0; j < n; ++j)
        for (int64_t v = 0; v < V; ++v) S0[(i * n + j) * V + v] *= s[v];
    }
    const acc_t* P = S0;
    for (int64_t t = 0; t < steps; ++t) {
      normalize(P, t == 0 ? eps : acc_t(0), inv(t), p(t), across(t), along(t));
      P = p(t);
    }
    return P;
  }

  // Y = (X + shift) / (line sum of (X + shift) + eps); inv keeps the reciprocal: one division per
  // line, not per entry.
  void normalize(const acc_t* __restrict__ X, acc_t shift, acc_t* __restrict__ inv_, acc_t* __restrict__ Y,
                 int64_t across_, int64_t along_) {
    for (int64_t l = 0; l < n; ++l) {
      acc_t s[V];
      for (int64_t v = 0; v < V; ++v) s[v] = eps;
      for (int64_t k = 0; k < n; ++k)
        for (int64_t v = 0; v < V; ++v) s[v] += X[(l * across_ + k * along_) * V + v] + shift;
      for (int64_t v = 0; v < V; ++v) inv_[l * V + v] = acc_t(1) / s[v];
      for (int64_t k = 0; k < n; ++k)
        for (int64_t v = 0; v < V; ++v)
          Y[(l * across_ + k * along_) * V + v] = (X[(l * across_ + k * along_) * V + v] + shift) * inv_[l * V + v];
    }
  }

  // Gradient of the logits from the gradient g [n*n] of the result (overwritten); after forward().
  void backward(acc_t* __restrict__ g) {
    for (int64_t t = steps - 1; t >= 0; --t) lines_backward(g, p(t), inv(t), across(t), along(t));
    const acc_t* __restrict__ S = s0();  // the softmax's; the eps added to it is a constant
    for (int64_t i = 0; i < n; ++i) {
      acc_t s[V] = {};
      for (int64_t j = 0; j < n; ++j)
        for (int64_t v = 0; v < V; ++v) s[v] += g[(i * n + j) * V + v] * S[(i * n + j) * V + v];
      for (int64_t j = 0; j < n; ++j)
        for (int64_t v = 0; v < V; ++v) g[(i * n + j) * V + v] = S[(i * n + j) * V + v] * (g[(i * n + j) * V + v] - s[v]);
    }
  }

  // y = x / (sum x + eps) along each line  =>  dL/dx = (dL/dy - sum(dL/dy * y)) / (sum x + eps), the
  // division being a product with the reciprocal the forward stored in inv.
  void lines_backward(acc_t* __restrict__ g, const acc_t* __restrict__ y, const acc_t* __restrict__ inv_,
                      int64_t across_, int64_t along_) {
    for (int64_t l = 0; l < n; ++l) {
      acc_t s[V] = {};
      for (int64_t k = 0; k < n; ++k)
        for (int64_t v = 0; v < V; ++v) s[v] += g[(l * across_ + k * along_) * V + v] * y[(l * across_ + k * along_) * V + v];
      for (int64_t k = 0; k < n; ++k)
        for (int64_t v = 0; v < V; ++v)
          g[(l * across_ + k * along_) * V + v] = (g[(l * across_ + k * along_) * V + v] - s[v]) * inv_[l * V + v];
    }
  }
};

// dst = the transpose of the n x n lane matrix src ([n*n][V]): V4's comb [input, output] <-> res [output, input]
template <typename acc_t>
inline void transpose_square(const acc_t* __restrict__ src, int64_t n, acc_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t v = 0; v < V; ++v) dst[(j * n + i) * V + v] = src[(i * n + j) * V + v];
}

template <typename scalar_t, typename acc_t>
inline const acc_t* load(const scalar_t* src, int64_t len, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t k = 0; k < len; ++k) buf[k] = static_cast<acc_t>(src[k]);
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* src, int64_t len, scalar_t* dst) {
  for (int64_t k = 0; k < len; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

template <typename acc_t>
inline acc_t sigmoid(acc_t v) { return acc_t(1) / (acc_t(1) + std::exp(-v)); }

// rows [count][len] of src (token-major, `count` <= V valid) -> dst [len][V], zero-padded lanes
template <typename scalar_t, typename acc_t>
inline void load_transposed(const scalar_t* src, int64_t count, int64_t len, acc_t* dst) {
  if (count < V) std::fill(dst, dst + len * V, acc_t(0));
  for (int64_t v = 0; v < count; ++v)
    for (int64_t k = 0; k < len; ++k) dst[k * V + v] = static_cast<acc_t>(src[v * len + k]);
}

template <typename scalar_t, typename acc_t>
inline void store_transposed(const acc_t* src, int64_t count, int64_t len, scalar_t* dst) {
  for (int64_t v = 0; v < count; ++v)
    for (int64_t k = 0; k < len; ++k) dst[v * len + k] = static_cast<scalar_t>(src[k * V + v]);
}

// The wide state in the accumulation type, as the projections' tiles read it.
inline at::Tensor in_acc(at::Tensor x, const at::Tensor& like) {
  return x.scalar_type() == like.scalar_type() ? x : x.to(like.scalar_type());
}

void check_state(const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && n > 0 && x.size(1) % n == 0,
              "stream state must be a contiguous [tokens, n*C] tensor; got ", x.sizes(), " with n=", n);
}

void check_rows(const at::Tensor& t, int64_t T, int64_t width, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.size(0) == T && t.size(1) == width, what, " must be a contiguous [",
              T, ", ", width, "] tensor; got ", t.sizes());
}

void check_coefficients(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                        const at::Tensor& b_pre, const at::Tensor& b_post, const at::Tensor& b_res, int64_t n) {
  check_state(x, n);
  const int64_t K = phi.size(0);
  TORCH_CHECK(phi.dim() == 2 && phi.is_contiguous() && phi.size(1) == x.size(1) && (K == n || K == n * n + 2 * n),
              "phi must be a contiguous [n or n*n+2n, n*C] tensor; got ", phi.sizes());
  const bool mix = K > n;
  TORCH_CHECK(alpha.numel() >= (mix ? 3 : 1) && b_pre.numel() == n && (!mix || (b_post.numel() == n && b_res.numel() == n * n)),
              "gate and bias sizes do not match n=", n);
}

// ---------------------------------------------------------------------------------------------
// mhc_in

std::vector<at::Tensor> mhc_in_forward(at::Tensor x, at::Tensor phi, at::Tensor alpha, at::Tensor b_pre,
                                          at::Tensor b_post, at::Tensor b_res, int64_t n, int64_t iters,
                                          double eps_norm, double eps_hc) {
  check_coefficients(x, phi, alpha, b_pre, b_post, b_res, n);
  const int64_t T = x.size(0), S = x.size(1), C = S / n, K = phi.size(0);
  const bool mix = K > n;
  auto acc_opts = phi.options();
  auto xa = in_acc(x, phi);
  auto mp = at::empty({T, K}, acc_opts);  // phi X, before the RMS scale
  auto x_in = at::empty({T, C}, x.options());
  auto pre = at::empty({T, n}, acc_opts);
  auto post = at::empty({T, mix ? n : 0}, acc_opts);
  auto res = at::empty({T, mix ? n * n : 0}, acc_opts);
  auto rinv = at::empty({T}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mhc_in_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t* X = xa.data_ptr<acc_t>();
    const acc_t* a = alpha.data_ptr<acc_t>();
    const acc_t* bp = b_pre.data_ptr<acc_t>();
    const acc_t* bq = mix ? b_post.data_ptr<acc_t>() : nullptr;
    const acc_t* br = mix ? b_res.data_ptr<acc_t>() : nullptr;
    scalar_t* OUT = x_in.data_ptr<scalar_t>();
    const acc_t* PHI = phi.data_ptr<acc_t>();
    acc_t *PRE = pre.data_ptr<acc_t>(), *POST = mix ? post.data_ptr<acc_t>() : nullptr,
          *RES = mix ? res.data_ptr<acc_t>() : nullptr, *MP = mp.data_ptr<acc_t>(), *RI = rinv.data_ptr<acc_t>();
    const int64_t blocks = (T + V - 1) / V;
    at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
      DenormalsAreZero daz;
      std::vector<acc_t> m(K * V), pre_(n * V), post_(n * V), z(n * n * V), o(C);
      std::vector<const acc_t*> src(n);
      SinkhornBlock<acc_t> sk(n, iters, eps_hc);
      for (int64_t b = bb; b < be; ++b) {
        const int64_t t0 = b * V, cnt = std::min(V, T - t0);
        acc_t r[V];
        for (int64_t v = 0; v < V; ++v) {
          const acc_t* xs = X + (t0 + std::min(v, cnt - 1)) * S;
          r[v] = acc_t(1) / std::sqrt(dot(xs, xs, S) / acc_t(S) + acc_t(eps_norm));
        }
        project(X + t0 * S, cnt, PHI, S, K, m.data());
        store_transposed(m.data(), cnt, K, MP + t0 * K);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t v = 0; v < V; ++v) pre_[i * V + v] = sigmoid(a[0] * m[i * V + v] * r[v] + bp[i]) + acc_t(eps_hc);
        if (mix) {
          for (int64_t i = 0; i < n; ++i)
            for (int64_t v = 0; v < V; ++v) post_[i * V + v] = 2 * sigmoid(a[1] * m[(n + i) * V + v] * r[v] + bq[i]);
          for (int64_t k = 0; k < n * n; ++k)
            for (int64_t v = 0; v < V; ++v) z[k * V + v] = a[2] * m[(2 * n + k) * V + v] * r[v] + br[k];
          store_transposed(post_.data(), cnt, n, POST + t0 * n);
          transpose_square(sk.forward(z.data()), n, z.data());  // z is read: its buffer takes res
          store_transposed(z.data(), cnt, n * n, RES + t0 * n * n);
        }
        store_transposed(pre_.data(), cnt, n, PRE + t0 * n);
        for (int64_t v = 0; v < cnt; ++v) {
          const acc_t* xs = X + (t0 + v) * S;
          for (int64_t i = 0; i < n; ++i) src[i] = xs + i * C;
          combine(o.data(), src.data(), PRE + (t0 + v) * n, n, C);
          store(o.data(), C, OUT + (t0 + v) * C);
          RI[t0 + v] = r[v];
        }
      }
    });
  });
  return {x_in, pre, post, res, mp, rinv};
}

// g_mix: the gradient of the mix X' = res X + post y that consumes this X, or empty. Its part of X's
// gradient, res^T g_mix, is added here in the same pass instead of the mix writing it out.
std::vector<at::Tensor> mhc_in_backward(at::Tensor x, at::Tensor phi, at::Tensor alpha, at::Tensor b_res,
                                           at::Tensor pre, at::Tensor post, at::Tensor mp, at::Tensor rinv,
                                           at::Tensor g_in, at::Tensor g_post, at::Tensor g_res,
                                           at::Tensor g_mix, at::Tensor res, int64_t n, int64_t iters, double eps_hc) {
  check_state(x, n);
  TORCH_CHECK(phi.dim() == 2 && phi.is_contiguous() && phi.size(1) == x.size(1) &&
                  (phi.size(0) == n || phi.size(0) == n * n + 2 * n) && alpha.numel() >= (phi.size(0) > n ? 3 : 1),
              "phi or alpha do not match the stream state");
  const int64_t T = x.size(0), S = x.size(1), C = S / n, K = phi.size(0);
  const bool mix = K > n, add = g_mix.numel() > 0;
  check_rows(g_in, T, C, "the gradient of x_in");
  check_rows(pre, T, n, "pre");
  check_rows(mp, T, K, "the saved projection");
  if (mix) {
    check_rows(post, T, n, "post");
    check_rows(g_post, T, n, "the gradient of post");
    check_rows(g_res, T, n * n, "the gradient of res");
    TORCH_CHECK(b_res.numel() == n * n, "b_res must have n*n elements");
  }
  if (add) {
    check_rows(g_mix, T, S, "the mix's gradient");
    check_rows(res, T, n * n, "res");
  }
  const int64_t P = 3 + 2 * n + n * n;  // alpha, b_pre, b_post, b_res
  const int64_t blocks = (T + V - 1) / V;
  int64_t chunks = std::min<int64_t>(kChunks, std::max<int64_t>(blocks, 1));
  const int64_t per = (blocks + chunks - 1) / chunks;
  if (per > 0) chunks = (blocks + per - 1) / per;  // none left empty (33 blocks: 17 chunks of 2)
  auto xa = in_acc(x, phi);
  auto dx = at::empty_like(xa);
  auto dphi_parts = at::zeros({chunks, K, S}, phi.options());
  auto dsmall_parts = at::zeros({chunks, P}, phi.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mhc_in_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t* X = xa.data_ptr<acc_t>();
    const scalar_t* G = g_in.data_ptr<scalar_t>();
    const scalar_t* GM = add ? g_mix.data_ptr<scalar_t>() : nullptr;
    const acc_t* RS = add ? res.data_ptr<acc_t>() : nullptr;
    const acc_t* a = alpha.data_ptr<acc_t>();
    const acc_t* br = mix ? b_res.data_ptr<acc_t>() : nullptr;
    const acc_t *PRE = pre.data_ptr<acc_t>(), *POST = mix ? post.data_ptr<acc_t>() : nullptr;
    const acc_t *GP = mix ? g_post.data_ptr<acc_t>() : nullptr, *GR = mix ? g_res.data_ptr<acc_t>() : nullptr;
    const acc_t *MP = mp.data_ptr<acc_t>(), *RI = rinv.data_ptr<acc_t>(), *PHI = phi.data_ptr<acc_t>();
    acc_t* DX = dx.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      DenormalsAreZero daz;
      std::vector<acc_t> gb(C), mb(S), m(K * V), dm(K * V), pre_(n * V), post_(n * V), z(n * n * V), gz(n * n * V),
          gres(n * n * V), w(2 + n);
      std::vector<const acc_t*> src(2 + n);
      // Per-lane partial sums of the small parameters' gradients: a sum straight into one scalar
      // would be a chain of dependent adds through memory.
      std::vector<acc_t> lanes(P * V);
      std::vector<acc_t> run(K * kRun * V);  // mp's gradient of up to kRun consecutive blocks, [K][kRun*V]
      int64_t run_t0 = 0, run_len = 0;
      auto flush = [&](acc_t* dphi) {  // dphi_k += sum_v run[k][v] X_v over the run's tokens
        if (run_len) gemm_accumulate(dphi, K, run.data(), 1, kRun * V, X + run_t0 * S, run_len, S);
        run_len = 0;
      };
      SinkhornBlock<acc_t> sk(n, iters, eps_hc);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        acc_t* dphi = dphi_parts.data_ptr<acc_t>() + chunk * K * S;
        std::fill(lanes.begin(), lanes.end(), acc_t(0));
        acc_t *da = lanes.data(), *dbp = da + 3 * V, *dbq = dbp + n * V, *dbr = dbq + n * V;
        for (int64_t b = chunk * per; b < std::min(blocks, (chunk + 1) * per); ++b) {
          const int64_t t0 = b * V, cnt = std::min(V, T - t0);
          acc_t r[V] = {};
          std::fill(pre_.begin(), pre_.end(), acc_t(0));  // padded lanes contribute nothing
          for (int64_t v = 0; v < cnt; ++v) {
            r[v] = RI[t0 + v];
            const acc_t* gs = load(G + (t0 + v) * C, C, gb);
            for (int64_t i = 0; i < n; ++i) {
              const acc_t p = PRE[(t0 + v) * n + i] - acc_t(eps_hc);  // the sigmoid
              pre_[i * V + v] = dot(X + (t0 + v) * S + i * C, gs, C) * p * (1 - p);  // d(pre logit)
            }
          }
          load_transposed(MP + t0 * K, cnt, K, m.data());
          for (int64_t i = 0; i < n; ++i)
            for (int64_t v = 0; v < V; ++v) {
              const acc_t dl = pre_[i * V + v];
              dm[i * V + v] = a[0] * dl;
              da[v] += m[i * V + v] * r[v] * dl;
              dbp[i * V + v] += dl;
            }
          if (mix) {
            load_transposed(POST + t0 * n, cnt, n, post_.data());
            load_transposed(GP + t0 * n, cnt, n, z.data());
            for (int64_t i = 0; i < n; ++i)
              for (int64_t v = 0; v < V; ++v) {
                const acc_t q = post_[i * V + v], dl = z[i * V + v] * q * (1 - q / 2);
                dm[(n + i) * V + v] = a[1] * dl;
                da[V + v] += m[(n + i) * V + v] * r[v] * dl;
                dbq[i * V + v] += dl;
              }
            for (int64_t k = 0; k < n * n; ++k)
              for (int64_t v = 0; v < V; ++v) z[k * V + v] = a[2] * m[(2 * n + k) * V + v] * r[v] + br[k];
            load_transposed(GR + t0 * n * n, cnt, n * n, gres.data());
            transpose_square(gres.data(), n, gz.data());  // res's gradient -> comb's
            sk.forward(z.data());
            sk.backward(gz.data());
            for (int64_t k = 0; k < n * n; ++k)
              for (int64_t v = 0; v < V; ++v) {
                dm[(2 * n + k) * V + v] = a[2] * gz[k * V + v];
                da[2 * V + v] += m[(2 * n + k) * V + v] * r[v] * gz[k * V + v];
                dbr[k * V + v] += gz[k * V + v];
              }
          }
          // m = mp * r with r = (|x|^2 / S + eps)^(-1/2): the gradient of mp, and of x through r
          acc_t cx[V] = {};
          for (int64_t k = 0; k < K; ++k)
            for (int64_t v = 0; v < V; ++v) cx[v] += dm[k * V + v] * m[k * V + v];
          for (int64_t k = 0; k < K; ++k)
            for (int64_t v = 0; v < V; ++v) dm[k * V + v] *= r[v];  // now mp's gradient
          if (run_len == 0) run_t0 = t0;
          for (int64_t k = 0; k < K; ++k)
            for (int64_t v = 0; v < cnt; ++v) run[k * kRun * V + run_len + v] = dm[k * V + v];
          run_len += cnt;
          if (run_len == kRun * V) flush(dphi);
          for (int64_t v = 0; v < cnt; ++v) {
            const acc_t c3 = -cx[v] * r[v] * r[v] * r[v] / acc_t(S);
            const acc_t* xs = X + (t0 + v) * S;
            const acc_t* gs = load(G + (t0 + v) * C, C, gb);
            const acc_t* gm = add ? load(GM + (t0 + v) * S, S, mb) : nullptr;
            acc_t* d = DX + (t0 + v) * S;
            // dX_i = pre_i g_in + c3 X_i (+ sum_j res_ji G_j); below, + sum_k dmp_k phi_k,i
            src[0] = gs;
            if (add)
              for (int64_t j = 0; j < n; ++j) src[2 + j] = gm + j * C;
            for (int64_t i = 0; i < n; ++i) {
              src[1] = xs + i * C;
              w[0] = PRE[(t0 + v) * n + i], w[1] = c3;
              if (add)
                for (int64_t j = 0; j < n; ++j) w[2 + j] = RS[(t0 + v) * n * n + j * n + i];
              combine(d + i * C, src.data(), w.data(), add ? 2 + n : 2, C);
            }
          }
          gemm_accumulate(DX + t0 * S, cnt, dm.data(), V, 1, PHI, K, S);  // dX_v += sum_k dm[k][v] phi_k
        }
        flush(dphi);  // the chunk's last blocks (a short one ends the tokens: a run never has a gap)
        acc_t* ds = dsmall_parts.data_ptr<acc_t>() + chunk * P;
        for (int64_t k = 0; k < P; ++k)
          for (int64_t v = 0; v < V; ++v) ds[k] += lanes[k * V + v];
      }
    });
  });
  auto dphi = dphi_parts.sum(0);
  auto dsmall = dsmall_parts.sum(0);
  auto dalpha = dsmall.narrow(0, 0, 3), dbp = dsmall.narrow(0, 3, n);
  auto dbq = dsmall.narrow(0, 3 + n, n), dbr = dsmall.narrow(0, 3 + 2 * n, n * n);
  return {dx.to(x.scalar_type()), dphi, dalpha, dbp, dbq, dbr};
}

// ---------------------------------------------------------------------------------------------
// mix

at::Tensor mix_forward(at::Tensor x, at::Tensor y, at::Tensor post, at::Tensor res, int64_t n) {
  check_state(x, n);
  const int64_t T = x.size(0), S = x.size(1), C = S / n;
  check_rows(y, T, C, "y");
  check_rows(post, T, n, "post");
  check_rows(res, T, n * n, "res");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mix_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t *X = x.data_ptr<scalar_t>(), *Y = y.data_ptr<scalar_t>();
    const acc_t *PO = post.data_ptr<acc_t>(), *RS = res.data_ptr<acc_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xb(S), yb(C), ob(S), w(1 + n);
      std::vector<const acc_t*> src(1 + n);
      for (int64_t t = begin; t < end; ++t) {
        const acc_t* xs = load(X + t * S, S, xb);
        const acc_t* ys = load(Y + t * C, C, yb);
        const acc_t *po = PO + t * n, *rs = RS + t * n * n;
        src[0] = ys;
        for (int64_t i = 0; i < n; ++i) src[1 + i] = xs + i * C;
        for (int64_t j = 0; j < n; ++j) {  // X'_j = post_j y + sum_i res_ji X_i
          w[0] = po[j];
          for (int64_t i = 0; i < n; ++i) w[1 + i] = rs[j * n + i];
          combine(ob.data() + j * C, src.data(), w.data(), 1 + n, C);
        }
        store(ob.data(), S, O + t * S);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> mix_backward(at::Tensor x, at::Tensor y, at::Tensor post, at::Tensor res,
                                        at::Tensor g, int64_t n, bool want_dx) {
  check_state(x, n);
  const int64_t T = x.size(0), S = x.size(1), C = S / n;
  check_rows(y, T, C, "y");
  check_rows(post, T, n, "post");
  check_rows(res, T, n * n, "res");
  check_rows(g, T, S, "the gradient of the mix");
  auto dx = want_dx ? at::empty_like(x) : at::empty({0}, x.options());
  auto dy = at::empty_like(y);
  auto dpost = at::empty_like(post);
  auto dres = at::empty_like(res);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mix_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t *X = x.data_ptr<scalar_t>(), *Y = y.data_ptr<scalar_t>(), *Gp = g.data_ptr<scalar_t>();
    const acc_t *PO = post.data_ptr<acc_t>(), *RS = res.data_ptr<acc_t>();
    scalar_t *DX = dx.data_ptr<scalar_t>(), *DY = dy.data_ptr<scalar_t>();
    acc_t *DP = dpost.data_ptr<acc_t>(), *DR = dres.data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xb(S), yb(C), gb(S), dxb(S), dyb(C), w(n);
      std::vector<const acc_t*> src(n);
      for (int64_t t = begin; t < end; ++t) {
        const acc_t* xs = load(X + t * S, S, xb);
        const acc_t* ys = load(Y + t * C, C, yb);
        const acc_t* gs = load(Gp + t * S, S, gb);
        const acc_t *po = PO + t * n, *rs = RS + t * n * n;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* gj = src[j] = gs + j * C;
          DP[t * n + j] = dot(gj, ys, C);
          for (int64_t i = 0; i < n; ++i) DR[t * n * n + j * n + i] = dot(gj, xs + i * C, C);
        }
        combine(dyb.data(), src.data(), po, n, C);  // dy = sum_j post_j G_j
        store(dyb.data(), C, DY + t * C);
        if (want_dx) {
          for (int64_t i = 0; i < n; ++i) {  // dX_i = sum_j res_ji G_j
            for (int64_t j = 0; j < n; ++j) w[j] = rs[j * n + i];
            combine(dxb.data() + i * C, src.data(), w.data(), n, C);
          }
          store(dxb.data(), S, DX + t * S);
        }
      }
    });
  });
  return {dx, dy, dpost, dres};
}

}  // namespace

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("mhc_in_forward", &mhc_in_forward);
  m.def("mhc_in_backward", &mhc_in_backward);
  m.def("mix_forward", &mix_forward);
  m.def("mix_backward", &mix_backward);
}
