// Fused CPU kernels of the sampled-entry sweeps (ttmanifold/kernels builds this file on
// first use with torch.utils.cpp_extension; ttmanifold/sparse.py falls back to its torch
// kernels when the build is not possible).
//
// Layout: the N samples of one block of merged modes are sorted by their merged index g
// (order position i); group g is the rows off[g] .. off[g+1]-1. Per-sample vectors of a
// block are (N, r) row-major arrays in that order. One pass over a block reads every row
// once in order and the group's small matrix once; the layout change to the next block is
// a scatter of the result rows (dst), so no separate gather pass is needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // output columns accumulated in registers at once
constexpr int64_t kGrain = 4;   // groups per parallel task at least

// acc[0..NJ) = x[0..ra) @ m[:, 0..NJ) (m row stride ld). NJ is a compile-time width so
// that the accumulators stay in vector registers.
template <typename T, int NJ>
inline void vecmat(const T* __restrict x, int64_t ra, const T* __restrict m, int64_t ld,
                   T* __restrict acc) {
  T s[NJ] = {};
  for (int64_t f = 0; f < ra; ++f) {
    const T xf = x[f];
    const T* mr = m + f * ld;
#pragma GCC unroll 16
    for (int j = 0; j < NJ; ++j) s[j] += xf * mr[j];
  }
#pragma GCC unroll 16
  for (int j = 0; j < NJ; ++j) acc[j] = s[j];
}

// orow[f, 0..NJ) += x[f] w[0..NJ) for f < ra
template <typename T, int NJ>
inline void rank1(const T* __restrict x, int64_t ra, const T* __restrict w, T* __restrict o,
                  int64_t ld) {
  T wv[NJ];
#pragma GCC unroll 16
  for (int j = 0; j < NJ; ++j) wv[j] = w[j];
  for (int64_t f = 0; f < ra; ++f) {
    const T xf = x[f];
    T* orow = o + f * ld;
#pragma GCC unroll 16
    for (int j = 0; j < NJ; ++j) orow[j] += xf * wv[j];
  }
}

template <typename T>
using VecMat = void (*)(const T*, int64_t, const T*, int64_t, T*);
template <typename T>
using Rank1 = void (*)(const T*, int64_t, const T*, T*, int64_t);

template <typename T, int... J>
constexpr std::array<VecMat<T>, sizeof...(J)> vecmat_table(std::integer_sequence<int, J...>) {
  return {&vecmat<T, J + 1>...};
}
template <typename T, int... J>
constexpr std::array<Rank1<T>, sizeof...(J)> rank1_table(std::integer_sequence<int, J...>) {
  return {&rank1<T, J + 1>...};
}

// x @ m (ra x rb, row stride rb) -> y[0..rb), in chunks of at most kChunk columns
template <typename T>
inline void row_times(const T* x, int64_t ra, const T* m, int64_t rb, T* y) {
  static constexpr auto tab = vecmat_table<T>(std::make_integer_sequence<int, kChunk>{});
  for (int64_t j0 = 0; j0 < rb; j0 += kChunk) {
    const int64_t nj = std::min(kChunk, rb - j0);
    tab[nj - 1](x, ra, m + j0, rb, y + j0);
  }
}

// out[dst[i]] = a[i] @ M[g] for the rows i of every group g (dst null: out[i]).
template <typename T>
void step_impl(const T* a, int64_t ra, const T* M, int64_t rb, const int64_t* off,
               int64_t P, const int32_t* dst, T* out) {
  at::parallel_for(0, P, kGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const T* m = M + g * ra * rb;
      for (int64_t i = off[g]; i < off[g + 1]; ++i) {
        T* o = out + (dst ? static_cast<int64_t>(dst[i]) : i) * rb;
        row_times(a + i * ra, ra, m, rb, o);
      }
    }
  });
}

// t[i] = a[i] @ M[g] . c[i]  (a (N, ra), c (N, rb), M (P, ra, rb)), in the block's order.
template <typename T>
void rowdot_impl(const T* a, int64_t ra, const T* M, int64_t rb, const T* c,
                 const int64_t* off, int64_t P, T* t) {
  at::parallel_for(0, P, kGrain, [&](int64_t g0, int64_t g1) {
    std::vector<T> u(static_cast<size_t>(rb));
    for (int64_t g = g0; g < g1; ++g) {
      const T* m = M + g * ra * rb;
      for (int64_t i = off[g]; i < off[g + 1]; ++i) {
        row_times(a + i * ra, ra, m, rb, u.data());
        const T* y = c + i * rb;
        T s = 0;
        for (int64_t j = 0; j < rb; ++j) s += u[j] * y[j];
        t[i] = s;
      }
    }
  });
}

// out[f0 + fi, j0 + j] = sum_i a[i, f0 + fi] w[i, j0 + j] for fi < FB, j < NJ over the n
// rows of one group (accumulators in registers).
template <typename T, int NJ, int FB>
inline void outer_tile(const T* __restrict a, int64_t ra, int64_t f0,
                       const T* __restrict w, int64_t rb, int64_t j0, int64_t n,
                       T* __restrict out) {
  T acc[FB][NJ] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T* x = a + i * ra + f0;
    const T* wr = w + i * rb + j0;
#pragma GCC unroll 4
    for (int fi = 0; fi < FB; ++fi) {
      const T xf = x[fi];
#pragma GCC unroll 16
      for (int j = 0; j < NJ; ++j) acc[fi][j] += xf * wr[j];
    }
  }
  for (int fi = 0; fi < FB; ++fi)
    for (int j = 0; j < NJ; ++j) out[(f0 + fi) * rb + j0 + j] = acc[fi][j];
}

template <typename T, int NJ>
void outer_cols(const T* a, int64_t ra, const T* w, int64_t rb, int64_t j0, int64_t n, T* out) {
  int64_t f0 = 0;
  for (; f0 + 4 <= ra; f0 += 4) outer_tile<T, NJ, 4>(a, ra, f0, w, rb, j0, n, out);
  switch (ra - f0) {
    case 3: outer_tile<T, NJ, 3>(a, ra, f0, w, rb, j0, n, out); break;
    case 2: outer_tile<T, NJ, 2>(a, ra, f0, w, rb, j0, n, out); break;
    case 1: outer_tile<T, NJ, 1>(a, ra, f0, w, rb, j0, n, out); break;
    default: break;
  }
}

template <typename T>
using OuterCols = void (*)(const T*, int64_t, const T*, int64_t, int64_t, int64_t, T*);
template <typename T, int... J>
constexpr std::array<OuterCols<T>, sizeof...(J)> outer_table(std::integer_sequence<int, J...>) {
  return {&outer_cols<T, J + 1>...};
}

// C[g] = sum_{i in g} z[perm[i]] a[i]^T c[i]  (C (P, ra, rb)).
template <typename T>
void outer_impl(const T* a, int64_t ra, const T* c, int64_t rb, const T* z,
                const int64_t* off, int64_t P, const int32_t* perm, T* C) {
  static constexpr auto tab = outer_table<T>(std::make_integer_sequence<int, kChunk>{});
  at::parallel_for(0, P, kGrain, [&](int64_t g0, int64_t g1) {
    std::vector<T> w;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = off[g + 1] - off[g];
      T* out = C + g * ra * rb;
      if (n == 0) {
        std::fill(out, out + ra * rb, T(0));
        continue;
      }
      w.resize(static_cast<size_t>(n * rb));
      for (int64_t i = 0; i < n; ++i) {  // the weighted rows z_i c_i of the group
        const T zi = z[perm[off[g] + i]];
        const T* y = c + (off[g] + i) * rb;
        for (int64_t j = 0; j < rb; ++j) w[i * rb + j] = zi * y[j];
      }
      for (int64_t j0 = 0; j0 < rb; j0 += kChunk) {
        const int64_t nj = std::min(kChunk, rb - j0);
        tab[nj - 1](a + off[g] * ra, ra, w.data(), rb, j0, n, out);
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

const int32_t* idx_ptr(const c10::optional<torch::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  check(*t, name);
  TORCH_CHECK(t->scalar_type() == torch::kInt32, name, ": expected int32");
  return t->data_ptr<int32_t>();
}

}  // namespace

// out (rows, rb) receives a[i] @ M[g] at row dst[i] (or i).
void step(torch::Tensor a, torch::Tensor M, torch::Tensor off,
          c10::optional<torch::Tensor> dst, torch::Tensor out) {
  check(a, "a"); check(M, "M"); check(off, "off"); check(out, "out");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  TORCH_CHECK(M.dim() == 3 && a.dim() == 2 && M.size(1) == a.size(1) && out.dim() == 2 &&
              out.size(1) == M.size(2) && off.numel() == M.size(0) + 1,
              "step: inconsistent shapes");
  const int32_t* d = idx_ptr(dst, "dst");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_step", [&] {
    step_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), M.data_ptr<scalar_t>(), M.size(2),
                        off.data_ptr<int64_t>(), M.size(0), d, out.data_ptr<scalar_t>());
  });
}

// t[i] = a[i] @ M[g] . c[i] in the block's order
void rowdot(torch::Tensor a, torch::Tensor M, torch::Tensor c, torch::Tensor off,
            torch::Tensor t) {
  check(a, "a"); check(M, "M"); check(c, "c"); check(off, "off"); check(t, "t");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  TORCH_CHECK(M.dim() == 3 && M.size(1) == a.size(1) && M.size(2) == c.size(1) &&
              a.size(0) == c.size(0) && t.numel() == a.size(0) &&
              off.numel() == M.size(0) + 1, "rowdot: inconsistent shapes");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_rowdot", [&] {
    rowdot_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), M.data_ptr<scalar_t>(), M.size(2),
                          c.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), M.size(0),
                          t.data_ptr<scalar_t>());
  });
}

// C (P, ra, rb) = per group sum of z[perm[i]] a[i]^T c[i]
void outer(torch::Tensor a, torch::Tensor c, torch::Tensor z, torch::Tensor off,
           torch::Tensor perm, torch::Tensor C) {
  check(a, "a"); check(c, "c"); check(z, "z"); check(off, "off"); check(C, "C");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  TORCH_CHECK(C.dim() == 3 && C.size(1) == a.size(1) && C.size(2) == c.size(1) &&
              a.size(0) == c.size(0) && off.numel() == C.size(0) + 1,
              "outer: inconsistent shapes");
  const int32_t* p = idx_ptr(perm, "perm");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_outer", [&] {
    outer_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), c.data_ptr<scalar_t>(), c.size(1),
                         z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), C.size(0), p,
                         C.data_ptr<scalar_t>());
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "rows times their group's matrix, scattered to dst");
  m.def("rowdot", &rowdot, "a M c per row");
  m.def("outer", &outer, "per-group weighted sums of outer products");
}
