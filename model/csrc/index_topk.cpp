// The lightning indexer's selection on the CPU (model/indexer.py, select_topk).
//
//   I(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s]),  s < n_visible[t];  the k best s per query.
//
// Eager PyTorch makes this a [T*H, N] batched matmul, a ReLU pass and a second batched matmul
// through memory, then top-k over [T, N]: at T = 8K about 1 GB of traffic for 4 GFLOP. Here each
// query's row of scores is made a tile of entries at a time in registers (each key vector loaded
// once for several index heads) and selected while it is in L1. A score depends only on (t, s), not on the row's length
// or on the other queries, so a decoding cache that scores only the entries made so far gets the
// same values. Ties (entries whose every index head is ReLU-zero score exactly 0) go to the earlier
// entry; the picks come out best first. NaN counts as the largest score, as in torch.topk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // keys come in blocks of 64 entries, each stored [dim][64]

// `group` heads' contribution to a tile of `chains` vectors of entries: for each index dim, the
// tile's key vectors are loaded once and serve every head of the group (one FMA chain per head and
// vector, group * chains of them, which hides the FMA latency); then the ReLU and the head weight.
template <int group, int chains, typename scalar_t, typename vec>
inline void heads_into_tile(const scalar_t* q, const scalar_t* w, const scalar_t* block, int64_t dim, vec* row) {
  constexpr int64_t lanes = sizeof(vec) / sizeof(scalar_t);
  const vec zero = {};
  vec acc[group][chains] = {};
  for (int64_t d = 0; d < dim; ++d)
    for (int c = 0; c < chains; ++c) {  // one key vector live at a time: no spill with 16 registers
      vec kv;
      std::memcpy(&kv, block + d * kBlock + c * lanes, sizeof(vec));
      for (int g = 0; g < group; ++g) acc[g][c] += q[g * dim + d] * kv;
    }
  for (int g = 0; g < group; ++g)
    for (int c = 0; c < chains; ++c) row[c] += w[g] * (acc[g][c] < zero ? zero : acc[g][c]);  // NaN stays NaN, as in torch.relu
  static_assert(kBlock % (lanes * chains) == 0, "a tile never crosses a block");
}

// How a row's tile is scored depends on the vector registers there are. With AVX-512's 32, 8 heads
// at once over 2 vectors of entries: a key vector loaded from L1 feeds 8 FMAs instead of one (the
// indexer's scoring at T = 8K: 44 -> 36 ms). With 16 (AVX2) those 16 accumulators spill to the
// stack (2.5x slower than one head at a time): one head at a time over 8 vectors of entries.
#if defined(__AVX512VL__)
constexpr int kChains = 2, kHeadGroup = 8;
#else
constexpr int kChains = 8, kHeadGroup = 1;
#endif

// One row of scores, a tile of kChains vectors of entries at a time. A block's keys are contiguous
// ([dim][64]): with entries contiguous across a whole row instead, the dim rows of a tile sit a
// power of two apart and evict each other from L1 (4x slower). Either layout sums each head over
// the dim in order and the heads in order: the same scores bit for bit.
template <typename scalar_t>
void score_row(const scalar_t* q, const scalar_t* w, const scalar_t* keys, int64_t heads, int64_t dim,
               int64_t visible, scalar_t* out) {
  typedef scalar_t vec __attribute__((vector_size(32)));
  constexpr int64_t tile = sizeof(vec) / sizeof(scalar_t) * kChains;
  for (int64_t s0 = 0; s0 < visible; s0 += tile) {
    const scalar_t* block = keys + (s0 / kBlock) * dim * kBlock + s0 % kBlock;
    vec row[kChains] = {};
    int64_t h = 0;
    if constexpr (kHeadGroup == 8) {
      for (; h + 8 <= heads; h += 8) heads_into_tile<8, kChains>(q + h * dim, w + h, block, dim, row);
      for (; h + 4 <= heads; h += 4) heads_into_tile<4, kChains>(q + h * dim, w + h, block, dim, row);
    }
    for (; h < heads; ++h) heads_into_tile<1, kChains>(q + h * dim, w + h, block, dim, row);
    scalar_t tile_out[tile];
    std::memcpy(tile_out, row, sizeof(row));
    std::copy(tile_out, tile_out + std::min(tile, visible - s0), out + s0);
  }
}

// The k best of scores[0..n), best first, into buf[0..returned). Entries that beat the k-th best so
// far are appended without a branch; when the buffer fills, nth_element keeps its k best and their
// worst becomes the bar. Entries come in order, so one that only ties the bar is the later one and
// loses: the bar admits strictly greater scores. (A heap or a sort of the whole row mispredicts
// about half its comparisons on such rows: 5x slower.)
template <typename scalar_t>
int64_t top_k(const scalar_t* scores, int64_t n, int64_t k, std::vector<std::pair<scalar_t, int64_t>>& buf) {
  auto better = [](const std::pair<scalar_t, int64_t>& a, const std::pair<scalar_t, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  auto key = [](scalar_t v) { return std::isnan(v) ? std::numeric_limits<scalar_t>::infinity() : v; };
  if (k == 0) return 0;
  const int64_t cap = std::max<int64_t>(4 * k, 256);
  buf.resize(cap + 1);  // + 1: the slot a rejected entry is written to
  int64_t count = std::min(k, n);
  for (int64_t s = 0; s < count; ++s) buf[s] = {key(scores[s]), s};
  scalar_t bar = -std::numeric_limits<scalar_t>::infinity();  // fewer than k seen: anything above -inf
  if (count == k) bar = std::min_element(buf.begin(), buf.begin() + k, [](auto& a, auto& b) {
    return a.first < b.first; })->first;
  for (int64_t s = count; s < n; ++s) {
    const scalar_t v = key(scores[s]);
    buf[count] = {v, s};
    count += v > bar;
    if (count == cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + count, better);
      bar = buf[k - 1].first;
      count = k;
    }
  }
  const int64_t chosen = std::min(k, count);
  if (count > chosen) std::nth_element(buf.begin(), buf.begin() + chosen, buf.begin() + count, better);
  std::sort(buf.begin(), buf.begin() + chosen, better);
  return chosen;
}

template <typename scalar_t>
void index_topk_impl(const at::Tensor& q, const at::Tensor& w, const at::Tensor& keys, const at::Tensor& n_visible,
                     at::Tensor& index, at::Tensor& valid) {
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t n_pad = keys.size(1) * kBlock, picks = index.size(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* kp = keys.data_ptr<scalar_t>();
  const int64_t* nvp = n_visible.data_ptr<int64_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  bool* vp = valid.data_ptr<bool>();
  const int64_t rows = batch * queries;
  // Later queries see more entries: threads take rows from both ends alike (row i of this order is
  // row i/2 from the start or from the end), so a static split of the range splits the work evenly.
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scores(n_pad);
    std::vector<std::pair<scalar_t, int64_t>> best;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bt = i % 2 ? rows - 1 - i / 2 : i / 2;
      const int64_t b = bt / queries, t = bt % queries;
      const int64_t visible = std::min(std::max<int64_t>(0, nvp[t]), n_pad);  // never read past the keys
      score_row(qp + bt * heads * dim, wp + bt * heads, kp + b * n_pad * dim, heads, dim, visible, scores.data());
      const int64_t chosen = top_k(scores.data(), visible, picks, best);
      int64_t* irow = ip + bt * picks;
      bool* vrow = vp + bt * picks;
      for (int64_t j = 0; j < picks; ++j) {
        irow[j] = j < chosen ? best[j].second : 0;
        vrow[j] = j < chosen;
      }
    }
  });
}

}  // namespace

// q [B, T, H, D], w [B, T, H], keys [B, N_pad / 64, D, 64] (each block of 64 entries transposed;
// zero entries past N), n_visible [T] int64 (query t sees entries 0..n_visible[t]-1, at most N),
// k <= N: (index [B, T, k] int64, valid [B, T, k] bool), each row's valid picks first, best first.
std::vector<at::Tensor> index_topk(const at::Tensor& q, const at::Tensor& w, const at::Tensor& keys,
                                   const at::Tensor& n_visible, int64_t k) {
  TORCH_CHECK(q.dim() == 4 && w.dim() == 3 && keys.dim() == 4 && keys.size(3) == kBlock,
              "index_topk: q [B, T, H, D], w [B, T, H], keys [B, N_pad / 64, D, 64]");
  TORCH_CHECK(q.is_contiguous() && w.is_contiguous() && keys.is_contiguous() && n_visible.is_contiguous(),
              "index_topk: contiguous inputs");
  TORCH_CHECK(n_visible.scalar_type() == at::kLong && n_visible.size(0) == q.size(1), "index_topk: n_visible [T] int64");
  TORCH_CHECK(q.scalar_type() == w.scalar_type() && q.scalar_type() == keys.scalar_type(), "index_topk: one dtype");
  TORCH_CHECK(w.size(0) == q.size(0) && w.size(1) == q.size(1) && w.size(2) == q.size(2) &&
              keys.size(0) == q.size(0) && keys.size(2) == q.size(3) && k >= 0,
              "index_topk: q, w and keys disagree on batch, queries, heads or dim");
  auto index = at::empty({q.size(0), q.size(1), k}, q.options().dtype(at::kLong));
  auto valid = at::empty({q.size(0), q.size(1), k}, q.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "index_topk", [&] {
    index_topk_impl<scalar_t>(q, w, keys, n_visible, index, valid);
  });
  return {index, valid};
}

TORCH_LIBRARY(V4LAB_OPS, m) {  // V4LAB_OPS: set by model/cpu_kernels.py
  m.def("index_topk", &index_topk);
}
