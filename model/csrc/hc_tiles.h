// Register-tiled vector products of the hyper-connection kernels (hyper_connection.cpp): sums of
// weighted rows, dot products, and the phi projections with their two backward products, on rows
// that the kernels' passes hold in L1/L2.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t V = 16;        // lanes: tokens per block (per-token math runs across them), channels per step of combine()

// V lanes of acc_t as one value; the compiler maps it onto the machine's vector registers.
template <typename acc_t>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(V * sizeof(acc_t))));
};

template <typename acc_t>
inline typename Lanes<acc_t>::type load_lanes(const acc_t* p) {
  typename Lanes<acc_t>::type r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

// out[c] = sum_k w[k] src[k][c] for c < C. Each run of V outputs stays in registers across all the
// sources: a loop over sources around a loop over c loads and stores out[] once per source, which
// made these sums load/store-bound. (Explicit lanes: the auto-vectoriser left this loop scalar.)
template <typename acc_t>
inline void combine(acc_t* __restrict__ out, const acc_t* const* src, const acc_t* w, int64_t m, int64_t C) {
  int64_t c0 = 0;
  for (; c0 + 4 * V <= C; c0 += 4 * V) {  // four independent sums: one would wait on each FMA's latency
    auto s0 = w[0] * load_lanes(src[0] + c0), s1 = w[0] * load_lanes(src[0] + c0 + V);
    auto s2 = w[0] * load_lanes(src[0] + c0 + 2 * V), s3 = w[0] * load_lanes(src[0] + c0 + 3 * V);
    for (int64_t k = 1; k < m; ++k) {
      const acc_t* p = src[k] + c0;
      s0 += w[k] * load_lanes(p), s1 += w[k] * load_lanes(p + V);
      s2 += w[k] * load_lanes(p + 2 * V), s3 += w[k] * load_lanes(p + 3 * V);
    }
    std::memcpy(out + c0, &s0, sizeof s0), std::memcpy(out + c0 + V, &s1, sizeof s1);
    std::memcpy(out + c0 + 2 * V, &s2, sizeof s2), std::memcpy(out + c0 + 3 * V, &s3, sizeof s3);
  }
  for (; c0 + V <= C; c0 += V) {
    auto s = w[0] * load_lanes(src[0] + c0);
    for (int64_t k = 1; k < m; ++k) s += w[k] * load_lanes(src[k] + c0);
    std::memcpy(out + c0, &s, sizeof s);
  }
  for (int64_t c = c0; c < C; ++c) {
    acc_t s = w[0] * src[0][c];
    for (int64_t k = 1; k < m; ++k) s += w[k] * src[k][c];
    out[c] = s;
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  acc_t s = 0;
  _Pragma("omp simd reduction(+ : s)")
  for (int64_t k = 0; k < len; ++k) s += a[k] * b[k];
  return s;
}

// The sum of a vector's lanes, halving the vector: each step is one vector add.
template <typename acc_t, int W>
inline acc_t sum_halves(const acc_t* h) {
  if constexpr (W == 1) {
    return h[0];
  } else {
    typedef acc_t Half __attribute__((vector_size(W / 2 * sizeof(acc_t))));
    Half lo, hi;
    std::memcpy(&lo, h, sizeof lo);
    std::memcpy(&hi, h + W / 2, sizeof hi);
    lo += hi;
    acc_t r[W / 2];
    std::memcpy(r, &lo, sizeof lo);
    return sum_halves<acc_t, W / 2>(r);
  }
}

template <typename acc_t>
inline acc_t sum_lanes(typename Lanes<acc_t>::type a) {
  acc_t h[V];
  std::memcpy(h, &a, sizeof a);
  return sum_halves<acc_t, V>(h);
}

// m[k][v] = phi_k . x_v (lane layout [K][V]) for the block's tokens x_v = X + v*S, v < cnt. These
// projections were GEMM calls over the whole state before the kernel's pass: that read the n-times-wide
// state once more per sublayer, and BLAS is slow on a matrix K = n*n+2n wide; here the rows are in L1
// already. A tile of TT tokens by KT rows of phi shares each load.
template <typename acc_t, int TT, int KT>
inline void project_tile(const acc_t* X, const acc_t* phi, int64_t S, int64_t v0, int64_t k0, acc_t* m) {
  using L = typename Lanes<acc_t>::type;
  L acc[TT][KT];
  for (int a = 0; a < TT; ++a)
    for (int b = 0; b < KT; ++b) acc[a][b] = L{};
  int64_t s = 0;
  for (; s + V <= S; s += V) {
    L xv[TT];
    for (int a = 0; a < TT; ++a) xv[a] = load_lanes(X + (v0 + a) * S + s);
    for (int b = 0; b < KT; ++b) {
      const L p = load_lanes(phi + (k0 + b) * S + s);
      for (int a = 0; a < TT; ++a) acc[a][b] += xv[a] * p;
    }
  }
  for (int a = 0; a < TT; ++a)
    for (int b = 0; b < KT; ++b) {
      acc_t t = sum_lanes<acc_t>(acc[a][b]);
      for (int64_t r = s; r < S; ++r) t += X[(v0 + a) * S + r] * phi[(k0 + b) * S + r];
      m[(k0 + b) * V + v0 + a] = t;
    }
}

template <typename acc_t, int TT>
inline void project_tokens(const acc_t* X, const acc_t* phi, int64_t S, int64_t K, int64_t v0, acc_t* m) {
  int64_t k = 0;
  if (K % 6 == 0)  // mHC's n*n+2n rows at n = 4
    for (; k < K; k += 6) project_tile<acc_t, TT, 6>(X, phi, S, v0, k, m);
  for (; k + 4 <= K; k += 4) project_tile<acc_t, TT, 4>(X, phi, S, v0, k, m);
  for (; k < K; ++k) project_tile<acc_t, TT, 1>(X, phi, S, v0, k, m);
}

template <typename acc_t>
inline void project(const acc_t* X, int64_t cnt, const acc_t* phi, int64_t S, int64_t K, acc_t* m) {
  int64_t v = 0;
  for (; v + 4 <= cnt; v += 4) project_tokens<acc_t, 4>(X, phi, S, K, v, m);
  for (; v < cnt; ++v) project_tokens<acc_t, 1>(X, phi, S, K, v, m);
  for (int64_t k = 0; k < K; ++k)  // padded lanes repeat the last token, as its RMS does
    for (v = cnt; v < V; ++v) m[k * V + v] = m[k * V + cnt - 1];
}

// C_a += sum_{r < R} A(r, a) B_r for rows a < rows, where A(r, a) = A[r*ra + a*aa], B_r = B + r*S and
// C_a = C + a*S, all S long: the backward's two phi products on one block, on rows in L1/L2. As the
// lane matrix dm [K][V] is A either way round, one routine gives X's gradient (a: tokens, r: phi's
// rows) and phi's (a: phi's rows, r: tokens). A tile of TA rows by TS vectors stays in registers
// over the whole sum; each step loads TS vectors and TA scalars for TA*TS products.
template <typename acc_t, int TA, int TS>
inline void gemm_tile(acc_t* C, const acc_t* A, int64_t ra, int64_t aa, const acc_t* B, int64_t R, int64_t S,
                      int64_t a0, int64_t s0) {
  using L = typename Lanes<acc_t>::type;
  L acc[TA][TS];
  for (int a = 0; a < TA; ++a)
    for (int j = 0; j < TS; ++j) acc[a][j] = load_lanes(C + (a0 + a) * S + s0 + j * V);
  for (int64_t r = 0; r < R; ++r) {
    L b[TS];
    for (int j = 0; j < TS; ++j) b[j] = load_lanes(B + r * S + s0 + j * V);
    for (int a = 0; a < TA; ++a) {
      const acc_t w = A[r * ra + (a0 + a) * aa];
      for (int j = 0; j < TS; ++j) acc[a][j] += w * b[j];
    }
  }
  for (int a = 0; a < TA; ++a)
    for (int j = 0; j < TS; ++j) std::memcpy(C + (a0 + a) * S + s0 + j * V, &acc[a][j], sizeof acc[a][j]);
}

template <typename acc_t, int TA>
inline void gemm_rows(acc_t* C, const acc_t* A, int64_t ra, int64_t aa, const acc_t* B, int64_t R, int64_t S,
                      int64_t a0) {
  int64_t s = 0;
  for (; s + 4 * V <= S; s += 4 * V) gemm_tile<acc_t, TA, 4>(C, A, ra, aa, B, R, S, a0, s);
  for (; s + V <= S; s += V) gemm_tile<acc_t, TA, 1>(C, A, ra, aa, B, R, S, a0, s);
  for (; s < S; ++s)
    for (int a = 0; a < TA; ++a)
      for (int64_t r = 0; r < R; ++r) C[(a0 + a) * S + s] += A[r * ra + (a0 + a) * aa] * B[r * S + s];
}

template <typename acc_t>
inline void gemm_accumulate(acc_t* C, int64_t rows, const acc_t* A, int64_t ra, int64_t aa, const acc_t* B,
                            int64_t R, int64_t S) {
  int64_t a = 0;
  for (; a + 4 <= rows; a += 4) gemm_rows<acc_t, 4>(C, A, ra, aa, B, R, S, a);
  for (; a < rows; ++a) gemm_rows<acc_t, 1>(C, A, ra, aa, B, R, S, a);
}

}  // namespace
