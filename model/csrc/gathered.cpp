// Products with rows picked by index, for sparse CSA (model/gathered.py): each query t of batch b
// works with the K rows R[b, idx[b, t, j]] of a small table R [B, N, D] (the compressed entries).
//
//   scores:  S[b, t, h, j] = sum_d A[b, t, h, d] R[b, idx[b, t, j], d]      A [B, T, H, D] -> [B, T, H, K]
//   combine: O[b, t, h, d] = sum_j P[b, t, h, j] R[b, idx[b, t, j], d]      P [B, T, H, K] -> [B, T, H, D]
//   scatter: G[b, n, d]    = sum over (t, j) with idx[b, t, j] = n of sum_h P[b, t, h, j] C[b, t, h, d]
//
// The backward of scores is (combine, scatter) and that of combine (scores, scatter). Gathering
// the rows into a [B, T, K, D] tensor first and multiplying in batches writes and reads K times
// the queries' own size through memory (134 MB per 2K queries at V4-small's shape); here each
// query's rows are read from the table, which stays in cache. scatter sums into a fixed number of
// token chunks, then adds the chunks in order: its result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunks = 16;  // token chunks of scatter's partial sums

// Vectors of 32 bytes (8 floats, 4 doubles).
template <typename scalar_t>
struct Lanes {
  typedef scalar_t vec __attribute__((vector_size(32)));
  static constexpr int64_t L = 32 / sizeof(scalar_t);
};

// One query's scores S[h, j] for picks j0..j0+P-1: the heads sit in the lanes of a_t[g][d] (head
// group g, dim d; A transposed once per query), each pick is one FMA chain over d (P chains hide
// the FMA latency), each row element one broadcast.
template <int P, typename scalar_t>
inline void scores_picks(const typename Lanes<scalar_t>::vec* a_t, int64_t groups, int64_t H, int64_t D, int64_t K,
                         const scalar_t* const* r, int64_t j0, scalar_t* S) {
  using vec = typename Lanes<scalar_t>::vec;
  constexpr int64_t L = Lanes<scalar_t>::L;
  for (int64_t g = 0; g < groups; ++g) {
    vec acc[P] = {};
    for (int64_t d = 0; d < D; ++d) {
      const vec a = a_t[g * D + d];
      for (int c = 0; c < P; ++c) acc[c] += a * r[c][d];
    }
    for (int c = 0; c < P; ++c)
      for (int64_t l = 0; l < std::min(L, H - g * L); ++l) S[(g * L + l) * K + j0 + c] = acc[c][l];
  }
}

// One query's output O[h, d0..d0+C*L) for heads h0..h0+G-1: C vectors of the output per head in
// registers (G*C FMA chains) while the picks' rows stream by; each weight one broadcast.
template <int G, int C, typename scalar_t>
inline void combine_tile(const scalar_t* P, const scalar_t* const* r, int64_t K, int64_t D, int64_t h0, int64_t d0,
                         scalar_t* O) {
  using vec = typename Lanes<scalar_t>::vec;
  constexpr int64_t L = Lanes<scalar_t>::L;
  vec acc[G][C] = {};
  for (int64_t j = 0; j < K; ++j) {
    vec rv[C];
    std::memcpy(rv, r[j] + d0, sizeof(rv));
    for (int g = 0; g < G; ++g) {
      const scalar_t p = P[(h0 + g) * K + j];
      for (int c = 0; c < C; ++c) acc[g][c] += p * rv[c];
    }
  }
  for (int g = 0; g < G; ++g) std::memcpy(O + (h0 + g) * D + d0, acc[g], sizeof(acc[g]));
  static_assert(C * L * sizeof(scalar_t) == sizeof(acc[0]), "packed output");
}

// out[d] += w * x[d]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict__ out, scalar_t w, const scalar_t* __restrict__ x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += w * x[d];
}

void check(const at::Tensor& rows, const at::Tensor& index, const at::Tensor& per_query, int64_t width,
           const char* what) {
  TORCH_CHECK(rows.dim() == 3 && index.dim() == 3 && per_query.dim() == 4, what,
              ": rows [B, N, D], index [B, T, K], per-query operand [B, T, H, *]");
  TORCH_CHECK(rows.is_contiguous() && index.is_contiguous() && per_query.is_contiguous(), what, ": contiguous inputs");
  TORCH_CHECK(index.scalar_type() == at::kLong, what, ": int64 index");
  TORCH_CHECK(rows.scalar_type() == per_query.scalar_type(), what, ": one dtype");
  TORCH_CHECK(index.size(0) == rows.size(0) && per_query.size(0) == rows.size(0) &&
                  per_query.size(1) == index.size(1) && per_query.size(3) == width,
              what, ": operands disagree on batch, queries, picks or width");
  if (index.numel() > 0) {
    auto [lo, hi] = at::aminmax(index);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < rows.size(1), what, ": index outside the rows");
  }
}

}  // namespace

// a [B, T, H, D], rows [B, N, D], index [B, T, K] -> [B, T, H, K]
at::Tensor gathered_scores(const at::Tensor& a, const at::Tensor& rows, const at::Tensor& index) {
  check(rows, index, a, rows.size(2), "gathered_scores");
  const int64_t B = a.size(0), T = a.size(1), H = a.size(2), D = a.size(3), N = rows.size(1), K = index.size(2);
  auto out = at::empty({B, T, H, K}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gathered_scores", [&] {
    const scalar_t *A = a.data_ptr<scalar_t>(), *R = rows.data_ptr<scalar_t>();
    const int64_t* I = index.data_ptr<int64_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    using vec = typename Lanes<scalar_t>::vec;
    constexpr int64_t L = Lanes<scalar_t>::L;
    const int64_t groups = (H + L - 1) / L;
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      std::vector<vec> a_t(groups * D);
      std::vector<const scalar_t*> r(K);
      for (int64_t bt = begin; bt < end; ++bt) {
        const scalar_t* table = R + (bt / T) * N * D;
        for (int64_t j = 0; j < K; ++j) r[j] = table + I[bt * K + j] * D;
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t d = 0; d < D; ++d) {
            vec v = {};
            for (int64_t l = 0; l < std::min(L, H - g * L); ++l) v[l] = A[(bt * H + g * L + l) * D + d];
            a_t[g * D + d] = v;
          }
        scalar_t* S = O + bt * H * K;
        int64_t j = 0;
        for (; j + 8 <= K; j += 8) scores_picks<8>(a_t.data(), groups, H, D, K, r.data() + j, j, S);
        for (; j < K; ++j) scores_picks<1>(a_t.data(), groups, H, D, K, r.data() + j, j, S);
      }
    });
  });
  return out;
}

// p [B, T, H, K], rows [B, N, D], index [B, T, K] -> [B, T, H, D]
at::Tensor gathered_combine(const at::Tensor& p, const at::Tensor& rows, const at::Tensor& index) {
  check(rows, index, p, index.size(2), "gathered_combine");
  const int64_t B = p.size(0), T = p.size(1), H = p.size(2), K = p.size(3), N = rows.size(1), D = rows.size(2);
  auto out = at::zeros({B, T, H, D}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "gathered_combine", [&] {
    const scalar_t *P = p.data_ptr<scalar_t>(), *R = rows.data_ptr<scalar_t>();
    const int64_t* I = index.data_ptr<int64_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    constexpr int64_t L = Lanes<scalar_t>::L;
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> r(K);
      for (int64_t bt = begin; bt < end; ++bt) {
        const scalar_t* table = R + (bt / T) * N * D;
        for (int64_t j = 0; j < K; ++j) r[j] = table + I[bt * K + j] * D;
        const scalar_t* Pq = P + bt * H * K;
        scalar_t* Oq = O + bt * H * D;
        int64_t d0 = 0;
        for (; d0 + 2 * L <= D; d0 += 2 * L) {
          int64_t h = 0;
          for (; h + 8 <= H; h += 8) combine_tile<8, 2>(Pq, r.data(), K, D, h, d0, Oq);
          for (; h + 4 <= H; h += 4) combine_tile<4, 2>(Pq, r.data(), K, D, h, d0, Oq);
          for (; h < H; ++h) combine_tile<1, 2>(Pq, r.data(), K, D, h, d0, Oq);
        }
        for (; d0 + L <= D; d0 += L)
          for (int64_t h = 0; h < H; ++h) combine_tile<1, 1>(Pq, r.data(), K, D, h, d0, Oq);
        for (int64_t j = 0; j < K; ++j)  // the last D % L channels
          for (int64_t h = 0; h < H; ++h) axpy(Oq + h * D + d0, Pq[h * K + j], r[j] + d0, D - d0);
      }
    });
  });
  return out;
}

// p [B, T, H, K], c [B, T, H, D], index [B, T, K] -> [B, N, D] (n_rows = N)
at::Tensor gathered_scatter(const at::Tensor& p, const at::Tensor& c, const at::Tensor& index, int64_t n_rows) {
  TORCH_CHECK(p.dim() == 4 && c.dim() == 4 && index.dim() == 3 && p.is_contiguous() && c.is_contiguous() &&
                  index.is_contiguous() && index.scalar_type() == at::kLong && p.scalar_type() == c.scalar_type(),
              "gathered_scatter: p [B, T, H, K], c [B, T, H, D], int64 index [B, T, K], contiguous, one dtype");
  const int64_t B = p.size(0), T = p.size(1), H = p.size(2), K = p.size(3), D = c.size(3);
  TORCH_CHECK(c.size(0) == B && c.size(1) == T && c.size(2) == H && index.size(0) == B && index.size(1) == T &&
                  index.size(2) == K && n_rows >= 0,
              "gathered_scatter: operands disagree on batch, queries, heads or picks");
  if (index.numel() > 0) {
    auto [lo, hi] = at::aminmax(index);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n_rows, "gathered_scatter: index outside the rows");
  }
  const int64_t rows = B * T, chunks = std::min<int64_t>(kChunks, std::max<int64_t>(rows, 1));
  const int64_t per = (rows + chunks - 1) / chunks;
  auto parts = at::zeros({chunks, B * n_rows, D}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "gathered_scatter", [&] {
    const scalar_t *P = p.data_ptr<scalar_t>(), *C = c.data_ptr<scalar_t>();
    const int64_t* I = index.data_ptr<int64_t>();
    scalar_t* G = parts.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<scalar_t> v(D);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        scalar_t* part = G + chunk * B * n_rows * D;
        for (int64_t bt = chunk * per; bt < std::min(rows, (chunk + 1) * per); ++bt) {
          scalar_t* table = part + (bt / T) * n_rows * D;
          for (int64_t j = 0; j < K; ++j) {
            std::fill(v.begin(), v.end(), scalar_t(0));
            for (int64_t h = 0; h < H; ++h) axpy(v.data(), P[(bt * H + h) * K + j], C + (bt * H + h) * D, D);
            axpy(table + I[bt * K + j] * D, scalar_t(1), v.data(), D);
          }
        }
      }
    });
  });
  return parts.sum(0).view({B, n_rows, D});
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("gathered_scores", &gathered_scores);
  m.def("gathered_combine", &gathered_combine);
  m.def("gathered_scatter", &gathered_scatter);
}
