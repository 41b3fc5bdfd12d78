// Small dense sweeps of the fixed-TT-rank manifold on the CPU, calling LAPACK/BLAS directly
// (the symbols that torch's CPU build exports), without torch's per-call overhead:
// the right-orthogonal cores V of a left-orthogonal point, the tangent projection of a
// TT, the retraction, and the inner-product sweeps of ttmanifold/tt (inner, one TT against
// several with its reverse sweep). ttmanifold/kernels builds this file on first use; the torch implementations in
// ttmanifold/tangent.py are the reference and the fallback. At the end: batched QR and SVD of
// many small equal-shaped matrices, SIMD across the matrices (no LAPACK).
//
// Conventions: cores are row-major (r_left, n, r_right) arrays. A row-major (p x q) matrix
// is the column-major (q x p) matrix with leading dimension q, so every product below is
// written for column-major BLAS on the transposes.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__AVX__)
#include <immintrin.h>  // pbs::Simd (the batched products' registers), rbs's lane vectors
#endif
#if defined(__linux__)
#include <sys/mman.h>  // advise_huge_pages
#endif

extern "C" {
void dgeqrf_(const int*, const int*, double*, const int*, double*, double*, const int*, int*);
void sgeqrf_(const int*, const int*, float*, const int*, float*, float*, const int*, int*);
void dorgqr_(const int*, const int*, const int*, double*, const int*, const double*, double*,
             const int*, int*);
void sorgqr_(const int*, const int*, const int*, float*, const int*, const float*, float*,
             const int*, int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*);
void dgesdd_(const char*, const int*, const int*, double*, const int*, double*, double*,
             const int*, double*, const int*, double*, const int*, int*, int*);
void sgesdd_(const char*, const int*, const int*, float*, const int*, float*, float*,
             const int*, float*, const int*, float*, const int*, int*, int*);
}

// Every kernel's output: transparent huge pages for a large fresh one (Linux, advice only:
// errors ignored; ttmanifold/kernels/memory.py's empty_for_output on the Python side).
// Above 32 MB glibc maps every allocation afresh, and faulting it in 4 KB pages cost
// 0.05 ms per point of a float64 projection at r = 10 (B = 256), against 0.01 in 2 MB pages.
inline void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  constexpr uintptr_t h = uintptr_t(2) << 20;
  if (bytes < 2 * h || !t.device().is_cpu()) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t s = (a + h - 1) & ~(h - 1), e = (a + bytes) & ~(h - 1);
  if (e > s) madvise(reinterpret_cast<void*>(s), e - s, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// torch::empty(sizes, opts), advised huge pages before the kernel's first write
inline torch::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto out = torch::empty(sizes, opts);
  advise_huge_pages(out);
  return out;
}

namespace {

inline void geqrf(int m, int n, double* a, int lda, double* tau, double* w, int lw, int* info) {
  dgeqrf_(&m, &n, a, &lda, tau, w, &lw, info);
}
inline void geqrf(int m, int n, float* a, int lda, float* tau, float* w, int lw, int* info) {
  sgeqrf_(&m, &n, a, &lda, tau, w, &lw, info);
}
inline void orgqr(int m, int n, double* a, int lda, const double* tau, double* w, int lw,
                  int* info) {
  dorgqr_(&m, &n, &n, a, &lda, tau, w, &lw, info);
}
inline void orgqr(int m, int n, float* a, int lda, const float* tau, float* w, int lw,
                  int* info) {
  sorgqr_(&m, &n, &n, a, &lda, tau, w, &lw, info);
}
// column-major C (m x n) = alpha op(A) op(B) + beta C
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void gesdd(int m, int n, double* a, double* s, double* u, double* vt, double* w, int lw,
                  int* iw, int* info) {
  const char j = 'S';
  const int mn = std::min(m, n);
  dgesdd_(&j, &m, &n, a, &m, s, u, &m, vt, &mn, w, &lw, iw, info);
}
inline void gesdd(int m, int n, float* a, float* s, float* u, float* vt, float* w, int lw,
                  int* iw, int* info) {
  const char j = 'S';
  const int mn = std::min(m, n);
  sgesdd_(&j, &m, &n, a, &m, s, u, &m, vt, &mn, w, &lw, iw, info);
}

// Row-major Z (p x s) = alpha op(X) op(Y) + beta Z, op(X) (p x q), op(Y) (q x s); ld* are
// the row strides of the stored (row-major) matrices. Column-major BLAS on the transposes.
template <typename T>
inline void mm(bool tx, bool ty, int p, int s, int q, T alpha, const T* X, int ldx,
               const T* Y, int ldy, T beta, T* Z, int ldz) {
  gemm(ty ? 'T' : 'N', tx ? 'T' : 'N', s, p, q, alpha, Y, ldy, X, ldx, beta, Z, ldz);
}

template <typename T>
struct Work {
  std::vector<T> w;
  T* get(size_t n) {
    if (w.size() < n) w.resize(n);
    return w.data();
  }
};

// V_1..V_{d-1} (row-major (a, n, b) each, written into V[k]) of the TT with left-orthogonal
// cores U, canonical gauge diag(L_k) >= 0: unsigned Householder LQs right to left, then
// V_k = S_k V'_k (I (x) S_{k+1}) with S_k the signs of diag(L'_k) (see tangent.right_cores).
template <typename T>
void right_cores_impl(const std::vector<torch::Tensor>& U, std::vector<torch::Tensor>& V) {
  const int64_t d = static_cast<int64_t>(U.size());
  std::vector<std::vector<T>> S(d + 1);
  // kept from call to call (a batch calls this once per point): no allocation per call
  thread_local Work<T> cbuf, rbuf, tau, work, next;
  // the current matrix c (a x n b, row-major) starts as U_{d-1}
  {
    const auto& u = U[d - 1];
    const T* p = u.data_ptr<T>();
    std::copy(p, p + u.numel(), cbuf.get(u.numel()));
  }
  for (int64_t k = d - 1; k >= 1; --k) {
    const int a = static_cast<int>(U[k].size(0));
    const int m = static_cast<int>(U[k].size(1) * U[k].size(2));  // n b
    T* c = cbuf.get(static_cast<size_t>(a) * m);  // column-major (m x a), lda m
    int info = 0;
    // a blocked workspace without asking LAPACK (two queries per core cost as much as the
    // factorization of a small core): 64 columns per block is at least what both want
    const int lw = std::max(1, a * 64);
    T* w = work.get(lw);
    geqrf(m, a, c, m, tau.get(a), w, lw, &info);
    TORCH_CHECK(info == 0, "right_cores: geqrf failed (info ", info, ")");
    T* R = rbuf.get(static_cast<size_t>(a) * a);  // column-major upper triangle of R
    S[k].resize(a);
    for (int j = 0; j < a; ++j) {
      for (int i = 0; i < a; ++i) R[i + j * a] = i <= j ? c[i + j * m] : T(0);
      S[k][j] = std::copysign(T(1), c[j + j * m]);
    }
    orgqr(m, a, c, m, tau.get(a), w, lw, &info);
    TORCH_CHECK(info == 0, "right_cores: orgqr failed (info ", info, ")");
    // V'_k (row-major a x m) is the column-major Q (m x a): copy into V[k]
    T* out = V[k].data_ptr<T>();
    std::copy(c, c + static_cast<size_t>(a) * m, out);
    if (k > 1) {  // c_{k-1} = U_{k-1} L'_k, L'_k = R^T: column-major c^T = R U^T
      const int rows = static_cast<int>(U[k - 1].size(0) * U[k - 1].size(1));  // a' n
      T* nx = next.get(static_cast<size_t>(rows) * a);
      gemm('N', 'N', a, rows, a, T(1), R, a, U[k - 1].data_ptr<T>(), a, T(0), nx, a);
      std::swap(cbuf.w, next.w);
    }
  }
  // canonical signs: V_k[al, i, be] *= S_k[al] S_{k+1}[be]
  for (int64_t k = 1; k < d; ++k) {
    const int64_t a = V[k].size(0), n = V[k].size(1), b = V[k].size(2);
    T* v = V[k].data_ptr<T>();
    for (int64_t al = 0; al < a; ++al)
      for (int64_t i = 0; i < n; ++i) {
        T* row = v + (al * n + i) * b;
        if (k + 1 < d)
          for (int64_t be = 0; be < b; ++be) row[be] *= S[k][al] * S[k + 1][be];
        else
          for (int64_t be = 0; be < b; ++be) row[be] *= S[k][al];
      }
  }
}

// Packed D_k = U_<k^T Z V_>k^T (gauge-projected for k < d-1 if gauge) into out.
template <typename T>
void project_impl(const std::vector<torch::Tensor>& U, const std::vector<torch::Tensor>& V,
                  const std::vector<torch::Tensor>& Z, bool gauge, T* out) {
  const int64_t d = static_cast<int64_t>(U.size());
  std::vector<std::vector<T>> Tk(d), Q(d);
  std::vector<T> P, Pn;
  // left sweep: T_k = P_k Z_k (r n x R'), P_{k+1} = U_k^T T_k (r' x R'); gauge in place
  for (int64_t k = 0; k < d; ++k) {
    const int r = static_cast<int>(U[k].size(0)), n = static_cast<int>(U[k].size(1));
    const int r2 = static_cast<int>(U[k].size(2));
    const int R = static_cast<int>(Z[k].size(0)), R2 = static_cast<int>(Z[k].size(2));
    const T* z = Z[k].data_ptr<T>();
    Tk[k].resize(static_cast<size_t>(r) * n * R2);
    if (k == 0) {
      std::copy(z, z + static_cast<size_t>(n) * R2, Tk[k].data());
    } else {  // column-major T^T (nR' x r) = Z^T (nR' x R) P^T (R x r)
      gemm('N', 'N', n * R2, r, R, T(1), z, n * R2, P.data(), R, T(0), Tk[k].data(), n * R2);
    }
    if (k < d - 1) {  // P_{k+1}^T (R' x r') = T^T (R' x rn) U (rn x r')
      Pn.resize(static_cast<size_t>(r2) * R2);
      const T* u = U[k].data_ptr<T>();
      gemm('N', 'T', R2, r2, r * n, T(1), Tk[k].data(), R2, u, r2, T(0), Pn.data(), R2);
      if (gauge)  // T^T -= P^T U^T  (T - U P)
        gemm('N', 'N', R2, r * n, r2, T(-1), Pn.data(), R2, u, r2, T(1), Tk[k].data(), R2);
      std::swap(P, Pn);
    }
  }
  // right sweep: Q_{k-1} = (Z_k x_3 Q_k) V_k^T (R x r_k)
  std::vector<T> s;
  for (int64_t k = d - 1; k >= 1; --k) {
    const int R = static_cast<int>(Z[k].size(0)), n = static_cast<int>(Z[k].size(1));
    const int R2 = static_cast<int>(Z[k].size(2));
    const int a = static_cast<int>(V[k].size(0)), b = static_cast<int>(V[k].size(2));
    const T* z = Z[k].data_ptr<T>();
    const T* sp;
    if (k == d - 1) {
      sp = z;  // (R x n), b = R2 = 1
    } else {  // column-major s^T (b x Rn) = Q_k^T (b x R') Z^T (R' x Rn)
      s.resize(static_cast<size_t>(b) * R * n);
      gemm('N', 'N', b, R * n, R2, T(1), Q[k].data(), b, z, R2, T(0), s.data(), b);
      sp = s.data();
    }
    // column-major Q_{k-1}^T (a x R) = V (a x nb) s^T (nb x R)
    Q[k - 1].resize(static_cast<size_t>(a) * R);
    gemm('T', 'N', a, R, n * b, T(1), V[k].data_ptr<T>(), n * b, sp, n * b, T(0),
         Q[k - 1].data(), a);
  }
  // D_k = T_k Q_k: column-major D^T (r' x rn) = Q^T (r' x R') T^T (R' x rn)
  int64_t off = 0;
  for (int64_t k = 0; k < d; ++k) {
    const int r = static_cast<int>(U[k].size(0)), n = static_cast<int>(U[k].size(1));
    const int r2 = static_cast<int>(U[k].size(2)), R2 = static_cast<int>(Z[k].size(2));
    if (k == d - 1) {
      std::copy(Tk[k].begin(), Tk[k].end(), out + off);
    } else {
      gemm('N', 'N', r2, r * n, R2, T(1), Q[k].data(), r2, Tk[k].data(), R2, T(0), out + off,
           r2);
    }
    off += static_cast<int64_t>(r) * n * r2;
  }
}

// Packed left-orthogonal cores of round_r(X + xi), xi = sum_k U_<k du_k V_>k: the
// algorithm of FixedTTRank._retract (structured right-to-left orthogonalization of the
// rank-2r TT, then truncated SVDs from left to right), with direct LAPACK/BLAS calls.
template <typename T>
void retract_impl(const std::vector<torch::Tensor>& U, const std::vector<torch::Tensor>& V,
                  const std::vector<torch::Tensor>& du, const std::vector<int64_t>& ranks,
                  T* out) {
  const int64_t d = static_cast<int64_t>(U.size());
  std::vector<std::vector<T>> Qs(d);  // column-major q (N_k x a_k) of the QR of W_k^T
  std::vector<int> Nk(d, 0), nbk(d, 0);
  std::vector<T> left, right, C, W, R, nleft, nright, tau, work;
  std::vector<int> iwork;
  int info = 0;
  auto lapack_ws = [&](int m, int n) {  // geqrf + orgqr workspace for an (m x n) matrix
    int lw = -1;
    T q1 = 0, q2 = 0;
    tau.resize(n);
    geqrf(m, n, static_cast<T*>(nullptr), m, tau.data(), &q1, lw, &info);
    orgqr(m, n, static_cast<T*>(nullptr), m, tau.data(), &q2, lw, &info);
    const size_t need = static_cast<size_t>(std::max<T>(std::max(q1, q2), T(1)));
    if (work.size() < need) work.resize(need);
  };
  {  // left = U_{d-1} + du_{d-1} (a x n), no right part
    const T* u = U[d - 1].data_ptr<T>();
    const T* e = du[d - 1].data_ptr<T>();
    left.assign(u, u + U[d - 1].numel());
    for (int64_t i = 0; i < U[d - 1].numel(); ++i) left[i] += e[i];
  }
  int nbr = 0;  // columns of the right part (n b')
  for (int64_t k = d - 1; k >= 1; --k) {
    const int a = static_cast<int>(V[k].size(0));
    const int nb = static_cast<int>(V[k].size(1) * V[k].size(2));
    const T* vm = V[k].data_ptr<T>();
    C.resize(static_cast<size_t>(a) * a);
    mm<T>(false, true, a, a, nb, T(1), left.data(), nb, vm, nb, T(0), C.data(), a);
    mm<T>(false, false, a, nb, a, T(-1), C.data(), a, vm, nb, T(1), left.data(), nb);
    const int N = nb + nbr;
    TORCH_CHECK(N >= a, "retract: infeasible ranks");
    W.resize(static_cast<size_t>(a) * N);  // row-major (a x N) = column-major W^T (N x a)
    for (int al = 0; al < a; ++al) {
      std::copy(left.data() + static_cast<size_t>(al) * nb,
                left.data() + static_cast<size_t>(al + 1) * nb, W.data() + static_cast<size_t>(al) * N);
      if (nbr)
        std::copy(right.data() + static_cast<size_t>(al) * nbr,
                  right.data() + static_cast<size_t>(al + 1) * nbr,
                  W.data() + static_cast<size_t>(al) * N + nb);
    }
    lapack_ws(N, a);
    geqrf(N, a, W.data(), N, tau.data(), work.data(), static_cast<int>(work.size()), &info);
    TORCH_CHECK(info == 0, "retract: geqrf failed (info ", info, ")");
    R.assign(static_cast<size_t>(a) * a, T(0));  // row-major upper triangle
    for (int i = 0; i < a; ++i)
      for (int j = i; j < a; ++j) R[static_cast<size_t>(i) * a + j] = W[i + static_cast<size_t>(j) * N];
    orgqr(N, a, W.data(), N, tau.data(), work.data(), static_cast<int>(work.size()), &info);
    TORCH_CHECK(info == 0, "retract: orgqr failed (info ", info, ")");
    Qs[k].swap(W);  // W is rebuilt at the next step
    Nk[k] = N;
    nbk[k] = nb;
    // core k-1: left = du_{k-1} + U_{k-1} C, right = U_{k-1} R^T  ((a' n) x a each)
    const int rows = static_cast<int>(U[k - 1].size(0) * U[k - 1].size(1));
    const T* ul = U[k - 1].data_ptr<T>();
    const T* e = du[k - 1].data_ptr<T>();
    nleft.assign(e, e + static_cast<size_t>(rows) * a);
    mm<T>(false, false, rows, a, a, T(1), ul, a, C.data(), a, T(1), nleft.data(), a);
    nright.resize(static_cast<size_t>(rows) * a);
    mm<T>(false, true, rows, a, a, T(1), ul, a, R.data(), a, T(0), nright.data(), a);
    std::swap(left, nleft);
    std::swap(right, nright);
    nbr = static_cast<int>(U[k - 1].size(1)) * a;  // next step: right is (a'' x n a)
  }
  // first core: c = [left (n x a1) | right (n x a1)], column-major (m x K)
  int m = static_cast<int>(U[0].size(1));
  int K = 2 * static_cast<int>(U[0].size(2));
  std::vector<T> c(static_cast<size_t>(m) * K), s, Ub, VT, sv, top, W2;
  {
    const int a1 = static_cast<int>(U[0].size(2));
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < a1; ++j) {
        c[i + static_cast<size_t>(j) * m] = left[static_cast<size_t>(i) * a1 + j];
        c[i + static_cast<size_t>(j + a1) * m] = right[static_cast<size_t>(i) * a1 + j];
      }
  }
  int64_t off = 0;
  for (int64_t k = 0; k + 1 < d; ++k) {
    const int mn = std::min(m, K);
    const int r = static_cast<int>(ranks[k + 1]);
    TORCH_CHECK(mn >= r, "retract: rank ", r, " exceeds the unfolding's size");
    s.resize(mn);
    Ub.resize(static_cast<size_t>(m) * mn);
    VT.resize(static_cast<size_t>(mn) * K);
    iwork.resize(static_cast<size_t>(8) * mn);
    int lw = -1;
    T q = 0;
    gesdd(m, K, c.data(), s.data(), Ub.data(), VT.data(), &q, lw, iwork.data(), &info);
    const size_t need = static_cast<size_t>(std::max<T>(q, T(1)));
    if (work.size() < need) work.resize(need);
    gesdd(m, K, c.data(), s.data(), Ub.data(), VT.data(), work.data(),
          static_cast<int>(work.size()), iwork.data(), &info);
    TORCH_CHECK(info == 0, "retr: the SVD of X + u failed (LAPACK gesdd info ", info,
                "): X or u contains NaN or Inf, or the SVD did not converge");
    for (int i = 0; i < m; ++i)  // core k = U[:, :r], row-major (m x r)
      for (int j = 0; j < r; ++j) out[off + static_cast<int64_t>(i) * r + j] = Ub[i + static_cast<size_t>(j) * m];
    off += static_cast<int64_t>(m) * r;
    sv.resize(static_cast<size_t>(r) * K);  // row-major diag(s) VT[:r]
    for (int j = 0; j < r; ++j)
      for (int l = 0; l < K; ++l) sv[static_cast<size_t>(j) * K + l] = s[j] * VT[j + static_cast<size_t>(l) * mn];
    const int a = static_cast<int>(V[k + 1].size(0));
    const int n = static_cast<int>(V[k + 1].size(1)), b = static_cast<int>(V[k + 1].size(2));
    const int nb = n * b, N = Nk[k + 1], ap = K - a;  // ap: columns of the right part
    const T* q1 = Qs[k + 1].data();  // row-major qt (ap x N): QV = [:, :nb], QW = [:, nb:]
    top.resize(static_cast<size_t>(r) * nb);
    mm<T>(false, false, r, nb, ap, T(1), sv.data() + a, K, q1, N, T(0), top.data(), nb);
    mm<T>(false, false, r, nb, a, T(1), sv.data(), K, V[k + 1].data_ptr<T>(), nb, T(1),
          top.data(), nb);
    if (k + 2 == d) {  // the last core (r x n x 1)
      std::copy(top.begin(), top.end(), out + off);
      off += static_cast<int64_t>(r) * nb;
      break;
    }
    const int nbp = N - nb, bp = nbp / n;
    W2.resize(static_cast<size_t>(r) * nbp);
    mm<T>(false, false, r, nbp, ap, T(1), sv.data() + a, K, q1 + nb, N, T(0), W2.data(), nbp);
    // next c: rows (al, i), columns [top (b) | W2 (b')], column-major (r n x (b + b'))
    const int m2 = r * n, K2 = b + bp;
    c.assign(static_cast<size_t>(m2) * K2, T(0));
    for (int al = 0; al < r; ++al)
      for (int i = 0; i < n; ++i) {
        const int row = al * n + i;
        for (int be = 0; be < b; ++be)
          c[row + static_cast<size_t>(be) * m2] = top[static_cast<size_t>(al) * nb + i * b + be];
        for (int be = 0; be < bp; ++be)
          c[row + static_cast<size_t>(b + be) * m2] = W2[static_cast<size_t>(al) * nbp + i * bp + be];
      }
    m = m2;
    K = K2;
  }
}

// The inner-product sweeps of ttmanifold.tt (inner, and the sweep of one TT x against the
// blocks [x, t_1, ..., t_m] with its reverse sweep): the products of the torch versions in
// the same order, without torch's per-product dispatch and allocations. cores holds the
// d cores of each block one block after the other; block 0 is x.

// <x, y>: w_1 = x_1^T y_1, w_k = (w_{k-1}^T x_k)^T y_k (r_x x r_y environments).
template <typename T>
T inner_impl(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ys) {
  std::vector<T> w, t, wn;
  for (size_t k = 0; k < xs.size(); ++k) {
    const int ra = static_cast<int>(xs[k].size(0)), n = static_cast<int>(xs[k].size(1));
    const int rc = static_cast<int>(xs[k].size(2));
    const int rb = static_cast<int>(ys[k].size(0)), rd = static_cast<int>(ys[k].size(2));
    const T* x = xs[k].data_ptr<T>();
    const T* y = ys[k].data_ptr<T>();
    const T* tp = x;  // (rb n x rc); the first core: x itself (ra = rb = 1)
    if (k > 0) {      // t (rb x n rc) = w^T (rb x ra) x (ra x n rc)
      t.resize(static_cast<size_t>(rb) * n * rc);
      mm(true, false, rb, n * rc, ra, T(1), w.data(), rb, x, n * rc, T(0), t.data(), n * rc);
      tp = t.data();
    }
    wn.resize(static_cast<size_t>(rc) * rd);  // w' (rc x rd) = t^T y
    mm(true, false, rc, rd, rb * n, T(1), tp, rc, y, rd, T(0), wn.data(), rd);
    std::swap(w, wn);
  }
  return w[0];
}

// The summed left and right ranks (R, R2) of core m over the k blocks (cores by block).
inline std::pair<int, int> block_ranks(const std::vector<torch::Tensor>& cores, int64_t k,
                                       int64_t d, int64_t m) {
  int R = 0, R2 = 0;
  for (int64_t b = 0; b < k; ++b) {
    R += static_cast<int>(cores[b * d + m].size(0));
    R2 += static_cast<int>(cores[b * d + m].size(2));
  }
  return {R, R2};
}

// Forward of one-against-blocks: w_0 = ones(1, k); per core t = w^T x_m (R x n rc, R the
// sum of the blocks' left ranks, rows by block), then block b's columns of the next w are
// t_b^T y_b (t_b: its rows, seen as (r_b n x rc)). ws[m] receives w before core m (the
// backward's left environments); returns the final w (1 x k) in vals.
template <typename T>
void one_vs_blocks_impl(const std::vector<torch::Tensor>& cores, int64_t k,
                        std::vector<torch::Tensor>& ws, T* vals) {
  const int64_t d = static_cast<int64_t>(cores.size()) / k;
  std::vector<T> t, wn;
  for (int64_t m = 0; m < d; ++m) {
    const auto& xc = cores[m];
    const int ra = static_cast<int>(xc.size(0)), n = static_cast<int>(xc.size(1));
    const int rc = static_cast<int>(xc.size(2));
    const auto [R, R2] = block_ranks(cores, k, d, m);
    const T* w = ws[m].data_ptr<T>();  // (ra x R)
    t.resize(static_cast<size_t>(R) * n * rc);
    mm(true, false, R, n * rc, ra, T(1), w, R, xc.data_ptr<T>(), n * rc, T(0), t.data(),
       n * rc);
    T* out = m + 1 < d ? ws[m + 1].data_ptr<T>() : vals;  // (rc x R2)
    int row = 0, col = 0;
    for (int64_t b = 0; b < k; ++b) {
      const auto& y = cores[b * d + m];
      const int rb = static_cast<int>(y.size(0)), rd = static_cast<int>(y.size(2));
      mm(true, false, rc, rd, rb * n, T(1), t.data() + static_cast<size_t>(row) * n * rc, rc,
         y.data_ptr<T>(), rd, T(0), out + col, R2);
      row += rb;
      col += rd;
    }
  }
}

// Reverse sweep (with packed: only the tangent deltas' blocks of dx, packed there at offs):
// with z (rc x R2) starting at the block weights (block 0's doubled: x is
// both of its arguments), u = [y_b z_b^T] stacked by block (R n x rc, seen as R x n rc),
// dx_m = ws[m] u and z <- x_m u^T (ra x R).
template <typename T>
void one_vs_blocks_backward_impl(const std::vector<torch::Tensor>& cores, int64_t k,
                                 const std::vector<torch::Tensor>& ws, const T* g,
                                 std::vector<torch::Tensor>& dxs, T* packed = nullptr,
                                 const std::vector<int64_t>& offs = {}, bool tangent = false) {
  const int64_t d = static_cast<int64_t>(cores.size()) / k;
  std::vector<T> z(static_cast<size_t>(k)), zn, u, dx, uc, vc;
  for (int64_t b = 0; b < k; ++b) z[b] = b == 0 ? 2 * g[0] : g[b];
  for (int64_t m = d - 1; m >= 0; --m) {
    const auto& xc = cores[m];
    const int ra = static_cast<int>(xc.size(0)), n = static_cast<int>(xc.size(1));
    const int rc = static_cast<int>(xc.size(2));
    const auto [R, R2] = block_ranks(cores, k, d, m);
    u.resize(static_cast<size_t>(R) * n * rc);
    int row = 0, col = 0;
    for (int64_t b = 0; b < k; ++b) {  // u_b (r_b n x rc) = y_b (r_b n x rd) z_b^T (rd x rc)
      const auto& y = cores[b * d + m];
      const int rb = static_cast<int>(y.size(0)), rd = static_cast<int>(y.size(2));
      T* ub = u.data() + static_cast<size_t>(row) * n * rc;
      if (b == 0 && tangent && m > 0 && m + 1 < d) {  // x's zero top-right block skipped
        const int h = rb / 2, hc = rd / 2;
        mm(false, true, h * n, rc, hc, T(1), y.data_ptr<T>(), rd, z.data() + col, R2, T(0),
           ub, rc);
        mm(false, true, (rb - h) * n, rc, rd, T(1),
           y.data_ptr<T>() + static_cast<size_t>(h) * n * rd, rd, z.data() + col, R2, T(0),
           ub + static_cast<size_t>(h) * n * rc, rc);
      } else {
        mm(false, true, rb * n, rc, rd, T(1), y.data_ptr<T>(), rd, z.data() + col, R2, T(0),
           ub, rc);
      }
      row += rb;
      col += rd;
    }
    if (packed == nullptr) {
      mm(false, false, ra, n * rc, R, T(1), ws[m].data_ptr<T>(), R, u.data(), n * rc, T(0),
         dxs[m].data_ptr<T>(), n * rc);
    } else {  // only the delta block of the tangent block core (see tangent_deltas_backward)
      const int a0 = m > 0 ? ra / 2 : 0, c = m + 1 < d ? rc / 2 : rc;
      T* o = packed + offs[m];
      if (c == rc) {  // the last core: its bottom rows, written in place
        mm(false, false, ra - a0, n * rc, R, T(1), ws[m].data_ptr<T>() + a0 * R, R, u.data(),
           n * rc, T(0), o, n * rc);
      } else if (m > 0) {  // middle: u's left columns once, then a quarter of the products
        const size_t rows = static_cast<size_t>(R) * n;
        uc.resize(rows * c);
        for (size_t i = 0; i < rows; ++i)
          std::copy(u.data() + i * rc, u.data() + i * rc + c, uc.data() + i * c);
        mm(false, false, ra - a0, n * c, R, T(1), ws[m].data_ptr<T>() + a0 * R, R, uc.data(),
           n * c, T(0), o, n * c);
      } else {  // the first core (one row): its left columns
        dx.resize(static_cast<size_t>(ra - a0) * n * rc);
        mm(false, false, ra - a0, n * rc, R, T(1), ws[m].data_ptr<T>() + a0 * R, R, u.data(),
           n * rc, T(0), dx.data(), n * rc);
        for (int64_t row = 0; row < static_cast<int64_t>(ra - a0) * n; ++row)
          std::copy(dx.data() + row * rc, dx.data() + row * rc + c, o + row * c);
      }
    }
    if (m > 0 && packed != nullptr && tangent && m + 1 < d) {
      // z = x u^T with x = [[V, 0], [dU, U]]: the top rows from V and u's left columns
      // (uc, compacted above), the bottom rows whole
      const int h = ra / 2, c = rc / 2;
      const T* x = xc.data_ptr<T>();
      vc.resize(static_cast<size_t>(h) * n * c);
      for (int64_t i = 0; i < static_cast<int64_t>(h) * n; ++i)
        std::copy(x + i * rc, x + i * rc + c, vc.data() + i * c);
      zn.resize(static_cast<size_t>(ra) * R);
      mm(false, true, h, R, n * c, T(1), vc.data(), n * c, uc.data(), n * c, T(0), zn.data(), R);
      mm(false, true, ra - h, R, n * rc, T(1), x + static_cast<size_t>(h) * n * rc, n * rc,
         u.data(), n * rc, T(0), zn.data() + static_cast<size_t>(h) * R, R);
      std::swap(z, zn);
    } else if (m > 0) {  // z (ra x R) = x (ra x n rc) u^T
      zn.resize(static_cast<size_t>(ra) * R);
      mm(false, true, ra, R, n * rc, T(1), xc.data_ptr<T>(), n * rc, u.data(), n * rc, T(0),
         zn.data(), R);
      std::swap(z, zn);
    }
  }
}

void check_cores(const std::vector<torch::Tensor>& cs, const char* name, torch::ScalarType t,
                 int64_t from = 0) {
  for (size_t k = static_cast<size_t>(from); k < cs.size(); ++k) {
    TORCH_CHECK(cs[k].device().is_cpu() && cs[k].is_contiguous() && cs[k].dim() == 3 &&
                cs[k].scalar_type() == t, name, ": expected contiguous 3-D CPU cores of one dtype");
  }
}

// k blocks of d cores each: one mode size per core, ranks chained, r_0 = r_d = 1
void check_blocks(const std::vector<torch::Tensor>& cs, int64_t k, torch::ScalarType t) {
  check_cores(cs, "cores", t);
  const int64_t d = static_cast<int64_t>(cs.size()) / k;
  for (int64_t b = 0; b < k; ++b)
    for (int64_t m = 0; m < d; ++m) {
      const auto& c = cs[b * d + m];
      TORCH_CHECK(c.size(1) == cs[m].size(1) &&
                      c.size(0) == (m == 0 ? 1 : cs[b * d + m - 1].size(2)) &&
                      (m + 1 < d || c.size(2) == 1),
                  "cores: block ", b, " core ", m, " does not fit the blocks' shape and ranks");
    }
}

// Whether the n values at p are finite: x - x is 0 for a finite x and NaN for NaN or
// +-Inf, so the sum cannot overflow (one vectorizable pass, no allocation).
template <typename T>
bool finite(const T* p, int64_t n) {
  constexpr int L = 32;  // independent lanes: several vector accumulators in flight
  T acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) acc[j] += p[i + j] - p[i + j];
  for (; i < n; ++i) acc[0] += p[i] - p[i];
  T s = 0;
  for (int j = 0; j < L; ++j) s += acc[j];
  return s == 0;
}

// a flat tensor the size of the packed cores U
torch::Tensor packed_like(const std::vector<torch::Tensor>& U) {
  int64_t total = 0;
  for (const auto& u : U) total += u.numel();
  return empty_for_output({total}, U[0].options());
}

}  // namespace

std::vector<torch::Tensor> right_cores(std::vector<torch::Tensor> U) {
  TORCH_CHECK(!U.empty(), "right_cores: no cores");
  check_cores(U, "U", U[0].scalar_type());
  std::vector<torch::Tensor> V(U.size());
  V[0] = torch::empty({0}, U[0].options());
  for (size_t k = 1; k < U.size(); ++k) V[k] = torch::empty_like(U[k]);
  AT_DISPATCH_FLOATING_TYPES(U[0].scalar_type(), "ttm_right_cores", [&] {
    right_cores_impl<scalar_t>(U, V);
  });
  return V;
}

torch::Tensor project(std::vector<torch::Tensor> U, std::vector<torch::Tensor> V,
                      std::vector<torch::Tensor> Z, bool gauge) {
  TORCH_CHECK(!U.empty() && U.size() == V.size() && U.size() == Z.size(),
              "project: U, V, Z of different lengths");
  const auto t = U[0].scalar_type();
  check_cores(U, "U", t);
  check_cores(V, "V", t, 1);
  check_cores(Z, "Z", t);
  auto out = packed_like(U);
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_project", [&] {
    project_impl<scalar_t>(U, V, Z, gauge, out.data_ptr<scalar_t>());
  });
  return out;
}

torch::Tensor retract(std::vector<torch::Tensor> U, std::vector<torch::Tensor> V,
                      std::vector<torch::Tensor> du, std::vector<int64_t> ranks) {
  TORCH_CHECK(U.size() >= 2 && U.size() == V.size() && U.size() == du.size() &&
              ranks.size() == U.size() + 1, "retract: inconsistent lengths");
  const auto t = U[0].scalar_type();
  check_cores(U, "U", t);
  check_cores(V, "V", t, 1);
  check_cores(du, "du", t);
  auto out = packed_like(U);
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_retract", [&] {
    retract_impl<scalar_t>(U, V, du, ranks, out.data_ptr<scalar_t>());
  });
  return out;
}

// retract with the right-orthogonal cores of the point computed here (one call per retr)
torch::Tensor retract_point(std::vector<torch::Tensor> U, std::vector<torch::Tensor> du,
                            std::vector<int64_t> ranks) {
  return retract(U, right_cores(U), du, ranks);
}

// Whether every entry of every tensor is finite (finite() on each)
bool all_finite(std::vector<torch::Tensor> xs) {
  bool ok = true;
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "all_finite: contiguous CPU tensors");
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttm_all_finite", [&] {
      ok = finite<scalar_t>(x.data_ptr<scalar_t>(), x.numel());
    });
    if (!ok) break;
  }
  return ok;
}

// The rank-2r block cores [dU_1, U_1], [[V_k, 0], [dU_k, U_k]], [[V_d], [dU_d]] of the
// tangent TT sum_k U_<k dU_k V_>k from the point's cores U, V (V[0] a placeholder) and the
// packed deltas flat (one call instead of a few concatenations per run of cores)
std::vector<torch::Tensor> tangent_block_cores(std::vector<torch::Tensor> U,
                                               std::vector<torch::Tensor> V,
                                               torch::Tensor flat) {
  const int64_t d = static_cast<int64_t>(U.size());
  TORCH_CHECK(d >= 2 && static_cast<int64_t>(V.size()) == d, "tangent_block_cores: d >= 2 "
              "cores in U and V");
  const auto t = U[0].scalar_type();
  check_cores(U, "U", t);
  check_cores(V, "V", t, 1);
  int64_t total = 0;
  for (int64_t k = 0; k < d; ++k) {
    TORCH_CHECK(k == 0 || V[k].sizes() == U[k].sizes(), "V: expected U's core shapes");
    total += U[k].numel();
  }
  TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous() && flat.dim() == 1 &&
              flat.numel() == total && flat.scalar_type() == t,
              "flat: expected the packed deltas (contiguous, U's size and dtype)");
  std::vector<torch::Tensor> out(d);
  for (int64_t k = 0; k < d; ++k) {
    const int64_t a = U[k].size(0), n = U[k].size(1), c = U[k].size(2);
    out[k] = torch::empty({k > 0 ? 2 * a : a, n, k + 1 < d ? 2 * c : c}, U[0].options());
  }
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_tangent_block_cores", [&] {
    const scalar_t* du = flat.data_ptr<scalar_t>();
    for (int64_t k = 0; k < d; ++k) {
      const int64_t a = U[k].size(0), n = U[k].size(1), c = U[k].size(2);
      const int64_t w = k + 1 < d ? 2 * c : c;  // the block core's row length
      const scalar_t* u = U[k].data_ptr<scalar_t>();
      scalar_t* o = out[k].data_ptr<scalar_t>();
      if (k > 0) {  // top rows: [V_k, 0]
        const scalar_t* v = V[k].data_ptr<scalar_t>();
        for (int64_t row = 0; row < a * n; ++row) {
          std::copy(v + row * c, v + (row + 1) * c, o + row * w);
          std::fill(o + row * w + c, o + (row + 1) * w, scalar_t(0));
        }
        o += a * n * w;
      }
      for (int64_t row = 0; row < a * n; ++row) {  // bottom rows: [dU_k, U_k] ([dU_d])
        std::copy(du + row * c, du + (row + 1) * c, o + row * w);
        if (k + 1 < d) std::copy(u + row * c, u + (row + 1) * c, o + row * w + c);
      }
      du += a * n * c;
    }
  });
  return out;
}

// The packed gradient of the deltas from the gradients gs of the block cores above (each
// delta's block: bottom rows, left columns)
torch::Tensor tangent_block_cores_backward(std::vector<torch::Tensor> gs) {
  const int64_t d = static_cast<int64_t>(gs.size());
  TORCH_CHECK(d >= 2, "tangent_block_cores_backward: d >= 2 cores");
  const auto t = gs[0].scalar_type();
  check_cores(gs, "gs", t);
  int64_t total = 0;
  for (int64_t k = 0; k < d; ++k) {
    TORCH_CHECK((k == 0 || gs[k].size(0) % 2 == 0) && (k + 1 == d || gs[k].size(2) % 2 == 0),
                "gs: expected the shapes of tangent block cores");
    total += gs[k].numel() / (k > 0 ? 2 : 1) / (k + 1 < d ? 2 : 1);
  }
  auto out = torch::empty({total}, gs[0].options());
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_tangent_block_cores_backward", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t k = 0; k < d; ++k) {
      const int64_t w = gs[k].size(2), c = k + 1 < d ? w / 2 : w;
      const int64_t a = k > 0 ? gs[k].size(0) / 2 : 1, n = gs[k].size(1);
      const scalar_t* g = gs[k].data_ptr<scalar_t>() + (k > 0 ? a * n * w : 0);
      for (int64_t row = 0; row < a * n; ++row)
        std::copy(g + row * w, g + row * w + c, o + row * c);
      o += a * n * c;
    }
  });
  return out;
}

// The gauge projection of the packed g at the packed left-orthogonal point p:
// g_k - U_k (U_k^T g_k) on the left unfoldings (k < d-1), the rest copied; runs holds
// (offset, count, rows, cols) per run of equal core shapes among those cores (the
// manifold's gauge_runs). Also whether g is finite (the same pass's test, for the caller)
namespace {

void check_runs(const std::vector<int64_t>& runs, int64_t size) {
  TORCH_CHECK(runs.size() % 4 == 0, "runs: expected (offset, count, rows, cols) per run");
  for (size_t i = 0; i < runs.size(); i += 4)
    TORCH_CHECK(runs[i] >= 0 && runs[i + 1] >= 0 && runs[i + 2] > 0 && runs[i + 3] > 0 &&
                runs[i] + runs[i + 1] * runs[i + 2] * runs[i + 3] <= size,
                "runs: a run outside the packed point");
}

// o = the gauge projection of the packed g (n numbers) at the packed point pp; whether o
// is finite (a non-finite g or point reaches o: callers need one check, of the result)
template <typename T>
bool gauge_impl(const T* pp, const T* gp, T* o, int64_t n, const std::vector<int64_t>& runs,
                std::vector<T>& P) {
  std::copy(gp, gp + n, o);
  for (size_t i = 0; i < runs.size(); i += 4) {
    const int rn = static_cast<int>(runs[i + 2]), c = static_cast<int>(runs[i + 3]);
    P.resize(static_cast<size_t>(c) * c);
    for (int64_t j = 0; j < runs[i + 1]; ++j) {
      const int64_t off = runs[i] + j * rn * c;
      const T* u = pp + off;
      T* G = o + off;
      // row-major P (c x c) = U^T (c x rn) G (rn x c); G -= U (rn x c) P
      mm<T>(true, false, c, c, rn, T(1), u, c, G, c, T(0), P.data(), c);
      mm<T>(false, false, rn, c, c, T(-1), u, c, P.data(), c, T(1), G, c);
    }
  }
  return finite<T>(o, n);
}

}  // namespace

// The inputs of both batched gauge projections: packed CPU points p (1 or B, size) and
// tensors g (B, size) of p's size and dtype, and runs that tile the size.
static void check_gauge_batch_inputs(const torch::Tensor& p, const torch::Tensor& g,
                                     const std::vector<int64_t>& runs) {
  const auto t = p.scalar_type();
  TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.dim() == 2 &&
              (t == torch::kFloat || t == torch::kDouble), "p: expected packed CPU points (B, size)");
  TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() && g.dim() == 2 &&
              g.size(1) == p.size(1) && g.scalar_type() == t &&
              (p.size(0) == 1 || p.size(0) == g.size(0)),
              "g: expected packed tensors (B, size) of p's size and dtype");
  check_runs(runs, g.size(1));
}

// gauge_project for a batch: p (1 or B, size), g (B, size) -> (B, size), all finite
std::tuple<torch::Tensor, bool> gauge_project_batch(torch::Tensor p, torch::Tensor g,
                                                    std::vector<int64_t> runs) {
  check_gauge_batch_inputs(p, g, runs);
  const auto t = p.scalar_type();
  const int64_t n = g.size(1), B = g.size(0), step = p.size(0) == 1 ? 0 : n;
  auto out = empty_for_output(g.sizes(), g.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_gauge_project_batch", [&] {
    std::vector<scalar_t> P;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      ok = gauge_impl<scalar_t>(pp + b * step, gp + b * n, o + b * n, n, runs, P) && ok;
  });
  return {out, ok};
}

// gauge_project of one point: the batch of one
std::tuple<torch::Tensor, bool> gauge_project(torch::Tensor p, torch::Tensor g,
                                              std::vector<int64_t> runs) {
  TORCH_CHECK(p.dim() == 1 && g.dim() == 1, "p, g: expected one packed point and tensor");
  auto res = gauge_project_batch(p.reshape({1, p.numel()}), g.reshape({1, g.numel()}), runs);
  return {std::get<0>(res).view({-1}), std::get<1>(res)};
}

// <x, y> of two TTs of one shape (0-d tensor)
torch::Tensor inner(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> ys) {
  TORCH_CHECK(!xs.empty() && xs.size() == ys.size(), "inner: xs, ys of different lengths");
  const auto t = xs[0].scalar_type();
  std::vector<torch::Tensor> both(xs);
  both.insert(both.end(), ys.begin(), ys.end());
  check_blocks(both, 2, t);
  auto out = torch::empty({}, xs[0].options());
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_inner", [&] {
    *out.data_ptr<scalar_t>() = inner_impl<scalar_t>(xs, ys);
  });
  return out;
}

// (<x, x>, <x, t_1>, ..., <x, t_{k-1}>), then with pairs the constant pairs <t_i, t_j>,
// 1 <= i <= j < k (row by row), and the left environments ws (ws[m]: before core m)
std::tuple<torch::Tensor, std::vector<torch::Tensor>> one_vs_blocks(
    std::vector<torch::Tensor> cores, int64_t k, bool pairs) {
  TORCH_CHECK(k >= 1 && !cores.empty() && cores.size() % k == 0,
              "one_vs_blocks: expected k blocks of d cores");
  const auto t = cores[0].scalar_type();
  check_blocks(cores, k, t);
  const int64_t d = static_cast<int64_t>(cores.size()) / k;
  std::vector<torch::Tensor> ws(d);
  for (int64_t m = 0; m < d; ++m) {
    int64_t R = 0;
    for (int64_t b = 0; b < k; ++b) R += cores[b * d + m].size(0);
    ws[m] = torch::empty({cores[m].size(0), R}, cores[0].options());
  }
  ws[0].fill_(1);
  const int64_t np = pairs ? (k - 1) * k / 2 : 0;
  auto vals = torch::empty({k + np}, cores[0].options());
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_one_vs_blocks", [&] {
    scalar_t* v = vals.data_ptr<scalar_t>();
    one_vs_blocks_impl<scalar_t>(cores, k, ws, v);
    int64_t at = k;
    for (int64_t i = 1; pairs && i < k; ++i) {
      const std::vector<torch::Tensor> ti(cores.begin() + i * d, cores.begin() + (i + 1) * d);
      for (int64_t j = i; j < k; ++j) {
        const std::vector<torch::Tensor> tj(cores.begin() + j * d, cores.begin() + (j + 1) * d);
        v[at++] = inner_impl<scalar_t>(ti, tj);
      }
    }
  });
  return {vals, ws};
}

// the environments ws and the k weights g of a sum-norm backward, checked against the
// cores' dtype; returns g contiguous
static torch::Tensor checked_backward_weights(const std::vector<torch::Tensor>& ws,
                                              const torch::Tensor& g, at::ScalarType t,
                                              int64_t k) {
  for (const auto& w : ws)
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.scalar_type() == t,
                "ws: expected contiguous 2-D CPU matrices of the cores' dtype");
  auto gc = g.contiguous();
  TORCH_CHECK(gc.device().is_cpu() && gc.numel() == k && gc.scalar_type() == t,
              "g: expected k values of the cores' dtype");
  return gc;
}

// d/dx sum_b g_b <x, block_b> (block 0 is x itself): the cores of the gradient
std::vector<torch::Tensor> one_vs_blocks_backward(std::vector<torch::Tensor> cores, int64_t k,
                                                  std::vector<torch::Tensor> ws,
                                                  torch::Tensor g) {
  TORCH_CHECK(k >= 1 && !cores.empty() && cores.size() % k == 0,
              "one_vs_blocks_backward: expected k blocks of d cores");
  const auto t = cores[0].scalar_type();
  check_blocks(cores, k, t);
  const int64_t d = static_cast<int64_t>(cores.size()) / k;
  TORCH_CHECK(static_cast<int64_t>(ws.size()) == d, "one_vs_blocks_backward: d environments");
  auto gc = checked_backward_weights(ws, g, t, k);
  std::vector<torch::Tensor> dxs(d);
  for (int64_t m = 0; m < d; ++m) dxs[m] = torch::empty_like(cores[m]);
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_one_vs_blocks_backward", [&] {
    one_vs_blocks_backward_impl<scalar_t>(cores, k, ws, gc.data_ptr<scalar_t>(), dxs);
  });
  return dxs;
}

// one_vs_blocks_backward for an x whose cores are tangent block cores [dU_1, U_1],
// [[V_k, 0], [dU_k, U_k]], [[V_d], [dU_d]]: only the gradient of the deltas, packed (the
// bottom rows' products, half of the dx products; the dropped blocks are never computed;
// the zero top-right blocks of x's middle cores skipped in u = x z^T; skipping them in the
// forward's t^T x as well measured slower: narrower products)
torch::Tensor one_vs_blocks_backward_deltas(std::vector<torch::Tensor> cores, int64_t k,
                                            std::vector<torch::Tensor> ws, torch::Tensor g) {
  TORCH_CHECK(k >= 1 && !cores.empty() && cores.size() % k == 0,
              "one_vs_blocks_backward_deltas: expected k blocks of d cores");
  const auto t = cores[0].scalar_type();
  check_blocks(cores, k, t);
  const int64_t d = static_cast<int64_t>(cores.size()) / k;
  TORCH_CHECK(d >= 2 && static_cast<int64_t>(ws.size()) == d,
              "one_vs_blocks_backward_deltas: d >= 2 cores and d environments");
  auto gc = checked_backward_weights(ws, g, t, k);
  std::vector<int64_t> offs(d + 1, 0);
  for (int64_t m = 0; m < d; ++m) {
    const auto& c = cores[m];
    TORCH_CHECK((m == 0 || c.size(0) % 2 == 0) && (m + 1 == d || c.size(2) % 2 == 0),
                "cores: expected the shapes of tangent block cores");
    offs[m + 1] = offs[m] + c.numel() / (m > 0 ? 2 : 1) / (m + 1 < d ? 2 : 1);
  }
  auto out = torch::empty({offs[d]}, cores[0].options());
  std::vector<torch::Tensor> none;
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_one_vs_blocks_backward_deltas", [&] {
    one_vs_blocks_backward_impl<scalar_t>(cores, k, ws, gc.data_ptr<scalar_t>(), none,
                                          out.data_ptr<scalar_t>(), offs, true);
  });
  return out;
}

// ---- batches: one call for B points (a loop over the points in C++) -----------------
// Each list holds cores with one leading batch dimension, B or 1 (1: the same core for
// every point, as broadcasting). The per-point work is the single-point code on views.
namespace {

int64_t check_batch(const std::vector<torch::Tensor>& cs, const char* name, torch::ScalarType t,
                    int64_t B, int64_t from = 0) {
  int64_t nb = -1;
  for (size_t k = static_cast<size_t>(from); k < cs.size(); ++k) {
    const auto& c = cs[k];
    TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() && c.dim() == 4 && c.scalar_type() == t,
                name, ": expected contiguous 4-D CPU cores (batch, r, n, r') of one dtype");
    TORCH_CHECK(nb < 0 || c.size(0) == nb, name, ": cores of different batch sizes");
    nb = c.size(0);
  }
  TORCH_CHECK(nb == 1 || nb == B || nb < 0, name, ": batch size ", nb, " is neither 1 nor ", B);
  return nb;
}

// the cores of point b: views (a core of batch size 1 serves every point)
std::vector<torch::Tensor> point_of(const std::vector<torch::Tensor>& cs, int64_t b,
                                    int64_t from = 0) {
  std::vector<torch::Tensor> out(cs.size());
  for (size_t k = 0; k < cs.size(); ++k)
    out[k] = static_cast<int64_t>(k) < from ? cs[k] : cs[k].select(0, cs[k].size(0) == 1 ? 0 : b);
  return out;
}

// per-point buffers of the right-orthogonal cores of U's points (V[0] a placeholder)
std::vector<torch::Tensor> right_buffers(const std::vector<torch::Tensor>& U) {
  std::vector<torch::Tensor> V(U.size());
  V[0] = torch::empty({0}, U[0].options());
  for (size_t k = 1; k < U.size(); ++k)
    V[k] = torch::empty({U[k].size(1), U[k].size(2), U[k].size(3)}, U[k].options());
  return V;
}

}  // namespace

// right_cores of each of the B points of U: cores (B, a, n, b), index 0 a placeholder
std::vector<torch::Tensor> right_cores_batch(std::vector<torch::Tensor> U) {
  TORCH_CHECK(U.size() >= 2, "right_cores_batch: at least two cores");
  const auto t = U[0].scalar_type();
  const int64_t B = U[0].size(0);
  check_batch(U, "U", t, B);
  std::vector<torch::Tensor> V(U.size());
  V[0] = torch::empty({0}, U[0].options());
  for (size_t k = 1; k < U.size(); ++k) V[k] = torch::empty_like(U[k]);
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_right_cores_batch", [&] {
    for (int64_t b = 0; b < B; ++b) {
      auto Vb = point_of(V, b, 1);
      right_cores_impl<scalar_t>(point_of(U, b), Vb);
    }
  });
  return V;
}

namespace {

// The loop of a batched call: for every point b, fn(Ub, Vb, b, out_b) with the point's
// cores, its right cores (V's, or computed here when V is empty: once for a single point
// U) and its row of the (B, size) output. `others` are the batched arguments besides U, V.
template <typename F>
torch::Tensor for_points(const char* what, const std::vector<torch::Tensor>& U,
                         const std::vector<torch::Tensor>& V,
                         const std::vector<torch::Tensor>& others, int64_t B, const F& fn) {
  TORCH_CHECK(U.size() >= 2 && U.size() == others.size() && (V.empty() || V.size() == U.size()),
              what, ": inconsistent lengths");
  const auto t = U[0].scalar_type();
  const int64_t bu = check_batch(U, "U", t, B);
  check_batch(others, what, t, B);
  if (!V.empty()) check_batch(V, "V", t, B, 1);
  int64_t size = 0;
  for (const auto& u : U) size += u.numel() / u.size(0);
  auto out = empty_for_output({B, size}, U[0].options());
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_for_points", [&] {
    std::vector<torch::Tensor> Vb = V.empty() ? right_buffers(U) : V;
    for (int64_t b = 0; b < B; ++b) {
      auto Ub = point_of(U, b);
      if (V.empty() && (b == 0 || bu != 1)) right_cores_impl<scalar_t>(Ub, Vb);
      fn(Ub, V.empty() ? Vb : point_of(V, b, 1), b, out.data_ptr<scalar_t>() + b * size);
    }
  });
  return out;
}

}  // namespace

// project for B points and/or B TTs Z: (B, size of U's point); V empty: computed per point
torch::Tensor project_batch(std::vector<torch::Tensor> U, std::vector<torch::Tensor> V,
                            std::vector<torch::Tensor> Z, bool gauge, int64_t B) {
  return for_points("Z", U, V, Z, B, [&](const auto& Ub, const auto& Vb, int64_t b, auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    project_impl<T>(Ub, Vb, point_of(Z, b), gauge, o);
  });
}

// retract for B points and/or B steps: (B, size); V empty: computed per point
torch::Tensor retract_batch(std::vector<torch::Tensor> U, std::vector<torch::Tensor> V,
                            std::vector<torch::Tensor> du, std::vector<int64_t> ranks,
                            int64_t B) {
  TORCH_CHECK(ranks.size() == U.size() + 1, "retract_batch: inconsistent lengths");
  return for_points("du", U, V, du, B, [&](const auto& Ub, const auto& Vb, int64_t b, auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    retract_impl<T>(Ub, Vb, point_of(du, b), ranks, o);
  });
}

// ---------------------------------------------------------------------------------------
// Batched QR and SVD of many small equal-shaped matrices (B, m, n), m >= n, n <= 8, without
// LAPACK's per-matrix overhead: blocks of L matrices are copied into an interleaved layout
// (the matrix index innermost, X[(i n + j) L + l]) in which every arithmetic statement runs
// over the L lanes (SIMD across matrices), factorized there, and copied out. Householder QR
// (LAPACK's sign convention, R_jj = -sign(a_jj) |column|) and, for the SVD, that QR followed
// by a one-sided Jacobi SVD of R^T. Each matrix is first scaled by a power of two to a
// largest entry in [1, 2) (exact), so huge and tiny inputs neither overflow nor underflow.
namespace bf {

// lanes per block: 128 bytes of each type (16 doubles, 32 floats: two AVX-512 or four AVX2
// registers, independent chains; measured faster than 64 bytes on the retraction's shapes)
template <typename T> constexpr int lanes() { return 128 / static_cast<int>(sizeof(T)); }
constexpr int kMaxCols = 8;
// Jacobi sweeps: 5-8 reach the tolerance on the shapes measured; a cap all the same
constexpr int kMaxSweeps = 40;

// x := sqrt(x) over the L lanes, vectorized: GCC keeps std::sqrt scalar in a loop under its
// default -fmath-errno (errno on a negative argument), which made Jacobi's rotations scalar
template <typename T, int L>
inline void sqrt_lanes(T* __restrict x) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, double> && L % 8 == 0) {
    for (int l = 0; l < L; l += 8) _mm512_storeu_pd(x + l, _mm512_sqrt_pd(_mm512_loadu_pd(x + l)));
    return;
  } else if constexpr (std::is_same_v<T, float> && L % 16 == 0) {
    for (int l = 0; l < L; l += 16) _mm512_storeu_ps(x + l, _mm512_sqrt_ps(_mm512_loadu_ps(x + l)));
    return;
  }
#elif defined(__AVX__)
  if constexpr (std::is_same_v<T, double> && L % 4 == 0) {
    for (int l = 0; l < L; l += 4) _mm256_storeu_pd(x + l, _mm256_sqrt_pd(_mm256_loadu_pd(x + l)));
    return;
  } else if constexpr (std::is_same_v<T, float> && L % 8 == 0) {
    for (int l = 0; l < L; l += 8) _mm256_storeu_ps(x + l, _mm256_sqrt_ps(_mm256_loadu_ps(x + l)));
    return;
  }
#endif
  for (int l = 0; l < L; ++l) x[l] = std::sqrt(x[l]);
}

// per-lane power-of-two scaling to a largest |entry| in [1, 2) (exact; keeps the squares of
// huge and tiny entries in range); sc receives the factor that scales the results back
template <typename T, int L>
void scale_down(T* a, int cnt, T* sc) {
  T mx[L];
  for (int l = 0; l < L; ++l) mx[l] = T(0);
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < L; ++l) {
      const T v = std::abs(a[e * L + l]);
      mx[l] = v > mx[l] ? v : mx[l];
    }
  T f1[L], f2[L];
  for (int l = 0; l < L; ++l) {
    int e = 0;
    if (mx[l] > T(0) && std::isfinite(mx[l])) e = std::ilogb(mx[l]);
    sc[l] = std::ldexp(T(1), e);  // e within the exponent range: exact
    f1[l] = std::ldexp(T(1), -e / 2);  // two factors: 2^-e alone may overflow (denormal max)
    f2[l] = std::ldexp(T(1), -e - (-e / 2));
  }
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < L; ++l) a[e * L + l] = a[e * L + l] * f1[l] * f2[l];
}

// Householder QR of the interleaved m x n (m >= n) block A (row-major, A[(i n + j) L + l]):
// afterwards A holds R above the diagonal (R's diagonal in beta, n x L), the reflectors'
// tails below it, their heads in vd and their 2 / v^T v in cf (n x L each). Rows are
// contiguous (n L numbers): every pass runs over whole rows; the column index j is a
// template argument so that the accumulators of a pass are registers.
template <typename T, int L, int n, int j>
void house_step(int m, T* __restrict A, T* __restrict vd, T* __restrict cf, T* __restrict beta) {
  T nrm2[L];
  for (int l = 0; l < L; ++l) nrm2[l] = T(0);
  for (int i = j; i < m; ++i)
    for (int l = 0; l < L; ++l) { const T v = A[(i * n + j) * L + l]; nrm2[l] += v * v; }
  sqrt_lanes<T, L>(nrm2);
  for (int l = 0; l < L; ++l) {
    const T alpha = A[(j * n + j) * L + l];
    const T nr = nrm2[l];
    const T b = alpha >= T(0) ? -nr : nr;
    beta[j * L + l] = b;
    const T vtv = T(2) * nr * (nr + std::abs(alpha));
    cf[j * L + l] = vtv > T(0) ? T(2) / vtv : T(0);
    vd[j * L + l] = alpha - b;
  }
  constexpr int w = n - j - 1;
  if constexpr (w > 0) {
    T dot[w * L];
    for (int e = 0; e < w * L; ++e) dot[e] = T(0);
    for (int i = j; i < m; ++i) {
      const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
      const T* row = A + (i * n + j + 1) * L;
      for (int c = 0; c < w; ++c)
        for (int l = 0; l < L; ++l) dot[c * L + l] += v[l] * row[c * L + l];
    }
    for (int c = 0; c < w; ++c)
      for (int l = 0; l < L; ++l) dot[c * L + l] *= cf[j * L + l];
    for (int i = j; i < m; ++i) {
      const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
      T* row = A + (i * n + j + 1) * L;
      for (int c = 0; c < w; ++c)
        for (int l = 0; l < L; ++l) row[c * L + l] -= dot[c * L + l] * v[l];
    }
    house_step<T, L, n, j + 1>(m, A, vd, cf, beta);
  }
}

template <typename T, int L, int n>
void house_qr(int m, T* A, T* vd, T* cf, T* beta) {
  house_step<T, L, n, 0>(m, A, vd, cf, beta);
}

// X (m x n, interleaved) := H_j ... H_{n-1} X for the reflectors of house_qr (A, vd, cf),
// for j counting down to 0. lower: X's rows >= j of its columns < j are zero (X starts as
// [I; 0]): skipped.
template <typename T, int L, int n, int j, bool lower>
void apply_step(int m, const T* __restrict A, const T* __restrict vd, const T* __restrict cf,
                T* __restrict X) {
  constexpr int c0 = lower ? j : 0, w = n - c0;
  T dot[w * L];
  for (int e = 0; e < w * L; ++e) dot[e] = T(0);
  for (int i = j; i < m; ++i) {
    const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
    const T* row = X + (i * n + c0) * L;
    for (int c = 0; c < w; ++c)
      for (int l = 0; l < L; ++l) dot[c * L + l] += v[l] * row[c * L + l];
  }
  for (int c = 0; c < w; ++c)
    for (int l = 0; l < L; ++l) dot[c * L + l] *= cf[j * L + l];
  for (int i = j; i < m; ++i) {
    const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
    T* row = X + (i * n + c0) * L;
    for (int c = 0; c < w; ++c)
      for (int l = 0; l < L; ++l) row[c * L + l] -= dot[c * L + l] * v[l];
  }
  if constexpr (j > 0) apply_step<T, L, n, j - 1, lower>(m, A, vd, cf, X);
}

template <typename T, int L, int n>
void apply_q(int m, const T* A, const T* vd, const T* cf, T* X, bool lower) {
  if (lower) apply_step<T, L, n, n - 1, true>(m, A, vd, cf, X);
  else apply_step<T, L, n, n - 1, false>(m, A, vd, cf, X);
}

// R (n x n, interleaved) from house_qr's A and beta
template <typename T, int L>
void upper(int n, const T* A, const T* beta, T* R) {
  for (int j = 0; j < n; ++j)
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l)
        R[(j * n + c) * L + l] = c < j ? T(0) : (c == j ? beta[j * L + l] : A[(j * n + c) * L + l]);
}

template <typename T, int L>
void eye(int m, int n, T* X) {
  for (int i = 0; i < m; ++i)
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l) X[(i * n + c) * L + l] = i == c ? T(1) : T(0);
}

// The round-robin order of the one-sided Jacobi sweeps over N columns (N even, at most
// 2 K): round r < N - 1 rotates the N / 2 disjoint pairs (P[r][k], Q[r][k]), P < Q, whose
// computations are independent; every pair comes once in the N - 1 rounds. Forced inline
// (GCC/clang): the fixed-width sweeps then compile to the same code as with the table
// computed in place (a call, or a static constexpr table, changed their Jacobi's code)
#if defined(__GNUC__)
#define TTM_FORCE_INLINE inline __attribute__((always_inline))
#else
#define TTM_FORCE_INLINE inline
#endif
template <int K>
TTM_FORCE_INLINE void round_robin(int N, int (*P)[K], int (*Q)[K]) {
  int idx[2 * K] = {};
  for (int i = 0; i < N; ++i) idx[i] = i;
  for (int r = 0; r < N - 1; ++r) {
    for (int k = 0; k < N / 2; ++k) {
      const int x = idx[k], y = idx[N - 1 - k];
      P[r][k] = std::min(x, y);
      Q[r][k] = std::max(x, y);
    }
    const int last = idx[N - 1];
    for (int i = N - 1; i > 1; --i) idx[i] = idx[i - 1];
    idx[1] = last;
  }
}

// One-sided Jacobi on the columns of the interleaved n x n block W, accumulating the
// rotations in V (from I): afterwards W = W_0 V has orthogonal columns. Each sweep rotates
// every pair whose |<w_p, w_q>| exceeds tol |w_p| |w_q| in some lane; sweeps run until none
// does, at most max_sweeps (NaN compares false: a NaN lane stops rotating). Column norms are
// recomputed at the start of each sweep and updated by the rotations within it
// (a' = a - t g, b' = b + t g).
template <typename T, int L, int n>
int jacobi(T* __restrict W, T* __restrict V, T tol, int max_sweeps) {
  eye<T, L>(n, n, V);
  // round-robin order: each round rotates N / 2 disjoint pairs, whose computations are
  // independent (their long latency chains overlap); an odd n has a dummy column n
  constexpr int N = n + (n & 1), K = N / 2;
  int P[N > 1 ? N - 1 : 1][K], Qc[N > 1 ? N - 1 : 1][K];
  round_robin<K>(N, P, Qc);
  T nrm[n * L];
  int sweep = 0;
  while (sweep < max_sweeps && n > 1) {
    ++sweep;
    for (int e = 0; e < n * L; ++e) nrm[e] = T(0);
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < n; ++c)
        for (int l = 0; l < L; ++l) { const T w = W[(i * n + c) * L + l]; nrm[c * L + l] += w * w; }
    // pairs of two columns both below eps |W|_F are noise: not rotated (no relative
    // orthogonality is reachable there; the factorization stays backward stable)
    T floor[L], off[L];
    for (int l = 0; l < L; ++l) floor[l] = off[l] = T(0);
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l) floor[l] += nrm[c * L + l];
    for (int l = 0; l < L; ++l) floor[l] *= std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
    for (int r = 0; r < N - 1; ++r) {
      T g[K * L], cs[K * L], sn[K * L];
      for (int e = 0; e < K * L; ++e) g[e] = T(0);
      for (int k = 0; k < K; ++k) {
        const int p = P[r][k], q = Qc[r][k];
        if (q >= n) continue;
        for (int i = 0; i < n; ++i)
          for (int l = 0; l < L; ++l) g[k * L + l] += W[(i * n + p) * L + l] * W[(i * n + q) * L + l];
      }
      bool live[K];
      for (int k = 0; k < K; ++k) {
        const int p = P[r][k], q = Qc[r][k];
        live[k] = false;
        if (q >= n) continue;
        // rotate where |g| > tol |w_p| |w_q| and |w_p| |w_q| > floor, squared (no square
        // root; a b underflows only far below floor^2 >= eps^4: max |entry| >= 1 after
        // scaling); false for NaN. t = tan of the angle, Rutishauser's formula
        // t = sign(b - a) 2 g / (|b - a| + sqrt((b - a)^2 + 4 g^2)); every statement over the
        // lanes (t = 0 where no rotation), vectorized: this was a third of the SVD's time
        T* __restrict na = nrm + p * L;
        T* __restrict nb = nrm + q * L;
        const T* __restrict gk = g + k * L;
        T* __restrict ck = cs + k * L;
        T* __restrict sk = sn + k * L;
        T h[L];
        for (int l = 0; l < L; ++l) {
          const T dd = nb[l] - na[l], g2 = T(2) * gk[l];
          h[l] = dd * dd + g2 * g2;
        }
        sqrt_lanes<T, L>(h);
        T cnt = T(0);
        for (int l = 0; l < L; ++l) {
          const T ab2 = na[l] * nb[l], gg = gk[l], dd = nb[l] - na[l];
          const bool rot = (gg * gg > tol * tol * ab2) & (ab2 > floor[l] * floor[l]);
          const T t0 = (dd >= T(0) ? T(2) * gg : T(-2) * gg) / (std::abs(dd) + h[l]);
          const T t = rot ? t0 : T(0);  // (t0 is NaN for g = b - a = 0: not rotated)
          off[l] = rot ? T(1) : off[l];
          cnt += rot ? T(1) : T(0);
          ck[l] = T(1) + t * t;
          sk[l] = t;
          na[l] -= t * gg;
          nb[l] += t * gg;
        }
        live[k] = cnt > T(0);  // else converged in every lane: no rotation work
        if (!live[k]) continue;
        sqrt_lanes<T, L>(ck);
        for (int l = 0; l < L; ++l) {
          ck[l] = T(1) / ck[l];
          sk[l] *= ck[l];
        }
      }
      for (int k = 0; k < K; ++k) {
        if (!live[k]) continue;
        const int p = P[r][k], q = Qc[r][k];
        const T* c = cs + k * L;
        const T* sg = sn + k * L;
        for (int i = 0; i < n; ++i)
          for (int l = 0; l < L; ++l) {
            const T wp = W[(i * n + p) * L + l], wq = W[(i * n + q) * L + l];
            W[(i * n + p) * L + l] = c[l] * wp - sg[l] * wq;
            W[(i * n + q) * L + l] = sg[l] * wp + c[l] * wq;
            const T vp = V[(i * n + p) * L + l], vq = V[(i * n + q) * L + l];
            V[(i * n + p) * L + l] = c[l] * vp - sg[l] * vq;
            V[(i * n + q) * L + l] = sg[l] * vp + c[l] * vq;
          }
      }
    }
    bool done = true;
    for (int l = 0; l < L; ++l) done = done && off[l] == T(0);  // no rotation this sweep
    if (done) break;
  }
  return sweep;
}

// The interleaved block (rows x cols) of the matrices b0.. of t (strides read from t: any
// view, e.g. a transpose, is read in place); lanes past the batch are zero. The loop runs
// over the block's entries with the lanes innermost: contiguous writes, L read streams.
template <typename T, int L>
void gather(const torch::Tensor& t, int64_t b0, int rows, int cols, T* dst) {
  const int64_t B = t.size(0), sb = t.stride(0), si = t.stride(1), sj = t.stride(2);
  const int nl = static_cast<int>(std::min<int64_t>(L, B - b0));
  const T* src[L];
  for (int l = 0; l < nl; ++l) src[l] = t.data_ptr<T>() + (b0 + l) * sb;
  if (nl < L)
    for (int e = 0; e < rows * cols * L; ++e) dst[e] = T(0);
  if (si <= sj) {  // column-major matrices (e.g. a transpose): down the columns
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < rows; ++i) {
        const int64_t o = i * si + j * sj;
        T* d = dst + (i * cols + j) * L;
        for (int l = 0; l < nl; ++l) d[l] = src[l][o];
      }
    return;
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const int64_t o = i * si + j * sj;
      T* d = dst + (i * cols + j) * L;
      for (int l = 0; l < nl; ++l) d[l] = src[l][o];
    }
}

// The block back into the matrices b0.. of t (its strides), times sc[l] if given.
template <typename T, int L>
void scatter(const T* src, int64_t b0, int rows, int cols, const T* sc, torch::Tensor& t) {
  const int64_t B = t.size(0), sb = t.stride(0), si = t.stride(1), sj = t.dim() > 2 ? t.stride(2) : 0;
  const int nl = static_cast<int>(std::min<int64_t>(L, B - b0));
  T* dst[L];
  T f[L];
  for (int l = 0; l < nl; ++l) {
    dst[l] = t.data_ptr<T>() + (b0 + l) * sb;
    f[l] = sc ? sc[l] : T(1);
  }
  if (si <= sj) {  // column-major results (torch.linalg's layout): down the columns
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < rows; ++i) {
        const int64_t o = i * si + j * sj;
        const T* x = src + (i * cols + j) * L;
        for (int l = 0; l < nl; ++l) dst[l][o] = x[l] * f[l];
      }
    return;
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const int64_t o = i * si + j * sj;
      const T* x = src + (i * cols + j) * L;
      for (int l = 0; l < nl; ++l) dst[l][o] = x[l] * f[l];
    }
}

template <typename T, int n>
void qr_impl(const torch::Tensor& a, torch::Tensor& q, torch::Tensor& r) {  // (see batched_qr)
  constexpr int L = lanes<T>();
  const int64_t B = a.size(0);
  const int m = static_cast<int>(a.size(1));
  std::vector<T> A(static_cast<size_t>(m) * n * L), Q(A.size()),
      R(static_cast<size_t>(n) * n * L), vd(n * L), cf(n * L), beta(n * L);
  T sc[L];
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    gather<T, L>(a, b0, m, n, A.data());
    scale_down<T, L>(A.data(), m * n, sc);
    house_qr<T, L, n>(m, A.data(), vd.data(), cf.data(), beta.data());
    upper<T, L>(n, A.data(), beta.data(), R.data());
    eye<T, L>(m, n, Q.data());
    apply_q<T, L, n>(m, A.data(), vd.data(), cf.data(), Q.data(), true);
    scatter<T, L>(Q.data(), b0, m, n, nullptr, q);
    scatter<T, L>(R.data(), b0, n, n, sc, r);
  }
}

// One compare-exchange of an SVD's descending sort: where S[j] > S[j - 1] (per lane,
// branch-free), exchange those entries of S and the columns j - 1 and j of the n x n blocks
// W and V
template <typename T, int L>
void exchange_down(int n, int j, T* __restrict S, T* __restrict W, T* __restrict V) {
  bool sw[L];
  for (int l = 0; l < L; ++l) {
    const T x = S[j * L + l], y = S[(j - 1) * L + l];
    sw[l] = x > y;
    S[j * L + l] = sw[l] ? y : x; S[(j - 1) * L + l] = sw[l] ? x : y;
  }
  for (int r = 0; r < n; ++r)
    for (int l = 0; l < L; ++l) {
      T* wj = &W[(r * n + j) * L + l]; T* wk = &W[(r * n + j - 1) * L + l];
      const T x = *wj, y = *wk; *wj = sw[l] ? y : x; *wk = sw[l] ? x : y;
      T* vj = &V[(r * n + j) * L + l]; T* vk = &V[(r * n + j - 1) * L + l];
      const T x2 = *vj, y2 = *vk; *vj = sw[l] ? y2 : x2; *vk = sw[l] ? x2 : y2;
    }
}

// Thin SVD of the interleaved blocks: A = Q R (house_qr), one-sided Jacobi on X = R^T
// (X V_x = W_x, columns of norms S), so R = V_x S Ux^T with Ux = W_x / S: U = Q V_x (the
// rotations: orthonormal whatever the rank), Vh = Ux^T, whose zero columns (rank
// deficiency) are completed by a QR of Ux (its Q has orthonormal columns).
template <typename T, int n>
void svd_impl(const torch::Tensor& a, torch::Tensor& u, torch::Tensor& s, torch::Tensor& vh) {
  constexpr int L = lanes<T>();
  const int64_t B = a.size(0);
  const int m = static_cast<int>(a.size(1));
  std::vector<T> A(static_cast<size_t>(m) * n * L), U(A.size()),
      W(static_cast<size_t>(n) * n * L), V(W.size()), Q2(W.size()), Vt(W.size()),
      S(n * L), vd(n * L), cf(n * L), beta(n * L), vd2(n * L), cf2(n * L), beta2(n * L);
  T sc[L];
  const T tol = std::numeric_limits<T>::epsilon() * n;
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    gather<T, L>(a, b0, m, n, A.data());
    scale_down<T, L>(A.data(), m * n, sc);
    house_qr<T, L, n>(m, A.data(), vd.data(), cf.data(), beta.data());
    for (int i = 0; i < n; ++i)  // W = R^T
      for (int c = 0; c < n; ++c)
        for (int l = 0; l < L; ++l)
          W[(i * n + c) * L + l] = i < c ? T(0) : (i == c ? beta[i * L + l] : A[(c * n + i) * L + l]);
    jacobi<T, L, n>(W.data(), V.data(), tol, kMaxSweeps);
    for (int e = 0; e < n * L; ++e) S[e] = T(0);
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < n; ++c)
        for (int l = 0; l < L; ++l) { const T w = W[(i * n + c) * L + l]; S[c * L + l] += w * w; }
    for (int e = 0; e < n * L; ++e) S[e] = std::sqrt(S[e]);
    // descending order: compare-exchange of adjacent columns (per lane, branch-free)
    for (int i = 0; i < n - 1; ++i)
      for (int j = n - 1; j > i; --j) exchange_down<T, L>(n, j, S.data(), W.data(), V.data());
    // Ux: normalized columns of W (zero ones stay zero), then Q2 sign(diag R2) of its QR:
    // the normalized columns themselves where S > 0, an orthonormal completion elsewhere
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l) {
        const T sv = S[c * L + l];
        const T inv = sv > T(0) ? T(1) / sv : T(0);
        for (int i = 0; i < n; ++i) W[(i * n + c) * L + l] *= inv;
      }
    house_qr<T, L, n>(n, W.data(), vd2.data(), cf2.data(), beta2.data());
    eye<T, L>(n, n, Q2.data());
    apply_q<T, L, n>(n, W.data(), vd2.data(), cf2.data(), Q2.data(), true);
    for (int i = 0; i < n; ++i)  // Vh = (Q2 sign(beta2))^T
      for (int c = 0; c < n; ++c)
        for (int l = 0; l < L; ++l)
          Vt[(c * n + i) * L + l] = beta2[c * L + l] < T(0) ? -Q2[(i * n + c) * L + l] : Q2[(i * n + c) * L + l];
    // U = Q [V_x; 0]
    for (int i = 0; i < m; ++i)
      for (int c = 0; c < n; ++c)
        for (int l = 0; l < L; ++l) U[(i * n + c) * L + l] = i < n ? V[(i * n + c) * L + l] : T(0);
    apply_q<T, L, n>(m, A.data(), vd.data(), cf.data(), U.data(), false);
    scatter<T, L>(U.data(), b0, m, n, nullptr, u);
    scatter<T, L>(S.data(), b0, n, 1, sc, s);
    scatter<T, L>(Vt.data(), b0, n, n, nullptr, vh);
  }
}

// f<T, n>(args...) for the runtime column count n in 1..hi (the QR/SVD: kMaxCols)
template <typename T, template <typename, int> class F, int hi = kMaxCols, int n = 1,
          typename... A>
void for_cols(int cols, A&... args) {
  if constexpr (n <= hi) {
    if (cols == n) return F<T, n>::run(args...);
    for_cols<T, F, hi, n + 1>(cols, args...);
  }
}
template <typename T, int n>
struct Qr {
  static void run(const torch::Tensor& a, torch::Tensor& q, torch::Tensor& r) { qr_impl<T, n>(a, q, r); }
};
template <typename T, int n>
struct Svd {
  static void run(const torch::Tensor& a, torch::Tensor& u, torch::Tensor& s, torch::Tensor& vh) {
    svd_impl<T, n>(a, u, s, vh);
  }
};

void check_small(const char* who, const torch::Tensor& a) {
  TORCH_CHECK(a.dim() == 3, who, ": a must be (B, m, n), got ", a.dim(), " dimensions");
  TORCH_CHECK(a.size(2) >= 1 && a.size(2) <= kMaxCols && a.size(1) >= a.size(2), who,
              ": needs 1 <= n <= ", kMaxCols, " and m >= n, got (m, n) = (", a.size(1), ", ",
              a.size(2), ")");
  TORCH_CHECK(a.scalar_type() == torch::kDouble || a.scalar_type() == torch::kFloat, who,
              ": float32 or float64 only");
  TORCH_CHECK(a.device().is_cpu(), who, ": CPU tensors only");
}

}  // namespace bf

// thin QR of every matrix of a (B, m, n), m >= n, n <= 8: (Q (B, m, n), R (B, n, n))
std::vector<torch::Tensor> batched_qr(torch::Tensor a) {
  bf::check_small("batched_qr", a);
  // read in place (any strides); results column-major, the layout of torch.linalg.qr's
  auto q = torch::empty({a.size(0), a.size(2), a.size(1)}, a.options()).transpose(1, 2);
  auto r = torch::empty({a.size(0), a.size(2), a.size(2)}, a.options()).transpose(1, 2);
  const int n = static_cast<int>(a.size(2));
  if (a.scalar_type() == torch::kDouble) bf::for_cols<double, bf::Qr>(n, a, q, r);
  else bf::for_cols<float, bf::Qr>(n, a, q, r);
  return {q, r};
}

// thin SVD of every matrix of a (B, m, n), m >= n, n <= 8: (U (B, m, n), S (B, n)
// descending, Vh (B, n, n))
std::vector<torch::Tensor> batched_svd(torch::Tensor a) {
  bf::check_small("batched_svd", a);
  // read in place (any strides); results column-major, the layout of torch.linalg.svd's
  auto u = torch::empty({a.size(0), a.size(2), a.size(1)}, a.options()).transpose(1, 2);
  auto s = torch::empty({a.size(0), a.size(2)}, a.options());
  auto vh = torch::empty({a.size(0), a.size(2), a.size(2)}, a.options()).transpose(1, 2);
  const int n = static_cast<int>(a.size(2));
  if (a.scalar_type() == torch::kDouble) bf::for_cols<double, bf::Svd>(n, a, u, s, vh);
  else bf::for_cols<float, bf::Svd>(n, a, u, s, vh);
  return {u, s, vh};
}



// ---------------------------------------------------------------------------------------
// The batched projection for small ranks in the interleaved layout of bf (blocks of L points,
// the point index innermost): for each block, the LQ sweep of the points' cores (the
// canonical right-orthogonal cores of right_cores_impl, V_k = S_k V'_k (I (x) S_{k+1})),
// interleaved with the right interfaces Q_{k-1} = (Z_k x_3 Q_k) V_k^T, then the left
// sweep T_k = P_k Z_k, P_{k+1} = U_k^T T_k (gauge: T_k -= U_k P_{k+1}) and D_k = T_k Q_k,
// written out core by core (project_impl's formulas, every statement over the L lanes).
namespace pbs {

// the largest TT-rank (of the points and of Z): the LQ of a core is instantiated per rank
// (its own bound, not bf::kMaxCols: the batched QR/SVD stop at 8)
constexpr int kMaxRank = 16;
// Z's ranks only size products and the interface matrices: the transport of a tangent
// vector projects its rank-2r block cores
constexpr int kMaxZRank = 2 * kMaxRank;

// SIMD registers for the products: Simd<T>::W lanes of T per register (0: no intrinsics,
// the portable loops below). AVX-512 or AVX2 + FMA when the build targets them
// (-march=native); lanes per block (L) are a multiple of W in every instantiation.
template <typename T> struct Simd { static constexpr int W = 0, kRegs = 0; };
#if defined(__AVX512F__)
template <> struct Simd<double> {
  using V = __m512d;
  static constexpr int W = 8, kRegs = 32;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V set1(double x) { return _mm512_set1_pd(x); }
};
template <> struct Simd<float> {
  using V = __m512;
  static constexpr int W = 16, kRegs = 32;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V set1(float x) { return _mm512_set1_ps(x); }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <> struct Simd<double> {
  using V = __m256d;
  static constexpr int W = 4, kRegs = 16;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V set1(double x) { return _mm256_set1_pd(x); }
};
template <> struct Simd<float> {
  using V = __m256;
  static constexpr int W = 8, kRegs = 16;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V set1(float x) { return _mm256_set1_ps(x); }
};
#endif

// C[m, n] = alpha sum_k A[m, k] B[k, n] (+ C[m, n] if acc) for interleaved matrices with
// element strides (sam, sak), (sbk, sbn), (scm, scn); the portable form (no intrinsics):
// one accumulator of L lanes per output, the lane loop innermost (vectorized).
template <typename T, int L>
inline void mm_il_loops(int M, int N, int K, const T* __restrict A, int sam, int sak,
                        const T* __restrict Bm, int sbk, int sbn, T* __restrict C, int scm,
                        int scn, T alpha, bool acc) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      T s[L];
      for (int l = 0; l < L; ++l) s[l] = T(0);
      for (int k = 0; k < K; ++k) {
        const T* a = A + static_cast<size_t>(m * sam + k * sak) * L;
        const T* b = Bm + static_cast<size_t>(k * sbk + n * sbn) * L;
        for (int l = 0; l < L; ++l) s[l] += a[l] * b[l];
      }
      T* c = C + static_cast<size_t>(m * scm + n * scn) * L;
      if (acc)
        for (int l = 0; l < L; ++l) c[l] += alpha * s[l];
      else
        for (int l = 0; l < L; ++l) c[l] = alpha * s[l];
    }
}

// The register tile of mm_il: MR x NR outputs of L lanes (NV registers each) accumulated
// in registers over kc steps of k; per step MR + NR lane vectors are loaded for MR NR
// multiply-adds (GCC's own code of the loops reloads the shared operand per row; so does
// this one unless told otherwise: the asm below). Strides here are in numbers (times L).
template <typename T, int L, int MR, int NR>
inline void mm_tile(int kc, const T* __restrict A, size_t sam, size_t sak,
                    const T* __restrict Bm, size_t sbk, size_t sbn, T* __restrict C, size_t scm,
                    size_t scn, T alpha, bool acc) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int NV = L / S::W;
  V c[MR][NR][NV];
#pragma GCC unroll 64
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 64
      for (int v = 0; v < NV; ++v) c[i][j][v] = S::zero();
  for (int k = 0; k < kc; ++k) {
    V a[MR][NV];
#pragma GCC unroll 64
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 64
      for (int v = 0; v < NV; ++v) a[i][v] = S::load(A + i * sam + v * S::W);
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 64
      for (int v = 0; v < NV; ++v) {
        V b = S::load(Bm + j * sbn + v * S::W);
#if defined(__GNUC__)
        asm("" : "+v"(b));  // b in a register: GCC would fold its load into each of the MR FMAs
#endif
#pragma GCC unroll 64
        for (int i = 0; i < MR; ++i) c[i][j][v] = S::fma(a[i][v], b, c[i][j][v]);
      }
    A += sak;
    Bm += sbk;
  }
  const V al = S::set1(alpha);
#pragma GCC unroll 64
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 64
      for (int v = 0; v < NV; ++v) {
        T* p = C + i * scm + j * scn + v * S::W;
        S::store(p, acc ? S::fma(al, c[i][j][v], S::load(p)) : S::mul(al, c[i][j][v]));
      }
}

// mm_tile for an mr x nr edge tile (mr <= MR, nr <= NR)
template <typename T, int L, int MR, int NR, typename... A>
inline void mm_tile_at(int mr, int nr, A... args) {
  if constexpr (MR > 1)
    if (mr < MR) return mm_tile_at<T, L, MR - 1, NR>(mr, nr, args...);
  if constexpr (NR > 1)
    if (nr < NR) return mm_tile_at<T, L, MR, NR - 1>(mr, nr, args...);
  mm_tile<T, L, MR, NR>(args...);
}

// The tile shape: about two thirds of the registers accumulate (MR NR NV), MR NV hold the
// A column and one the B entry; NR = 5 splits a width of 10 (r = 10) evenly (the blocks of
// mm_il are balanced: 12 = 4 + 4 + 4).
template <typename T, int L>
struct TileShape {
  static constexpr int NV = Simd<T>::W > 0 ? L / Simd<T>::W : 1;
  static constexpr int NR = Simd<T>::kRegs >= 32 ? 5 : (NV >= 4 ? 2 : 4);
  static constexpr int MR = std::max(1, (Simd<T>::kRegs >= 32 ? 20 : 8) / (NR * NV));
};

// total split into nblk blocks of near-equal sizes: the start of block i
inline int block_start(int i, int nblk, int total) {
  return static_cast<int>(static_cast<int64_t>(total) * i / nblk);
}

// C[m, n] = alpha sum_k A[m, k] B[k, n] (+ C[m, n] if acc) for interleaved matrices (L
// lanes per entry, the lane index innermost) with element strides (sam, sak), (sbk, sbn),
// (scm, scn): register tiles of TileShape; k in chunks whose slice of the operand read
// again by every tile of the inner loop (A's M x kc when n is the outer loop, B's kc x N
// otherwise) stays in L1 (a 10 x 200 x 10 core is 256 KB in 16 float64 lanes);
// the outer loop runs over the larger of M and N, so the larger operand is read once per
// chunk. Without intrinsics (or L not a multiple of the register) the plain loops.
template <typename T, int L>
inline void mm_il(int M, int N, int K, const T* __restrict A, int sam, int sak,
                  const T* __restrict Bm, int sbk, int sbn, T* __restrict C, int scm, int scn,
                  T alpha, bool acc) {
  if constexpr (Simd<T>::W == 0 || L % std::max(1, Simd<T>::W) != 0) {
    mm_il_loops<T, L>(M, N, K, A, sam, sak, Bm, sbk, sbn, C, scm, scn, alpha, acc);
  } else {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // alpha * 0 (+ C)
      if (!acc)
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n)
            std::fill_n(C + static_cast<size_t>(m * scm + n * scn) * L, L, T(0));
      return;
    }
    using TS = TileShape<T, L>;
    constexpr int MR = TS::MR, NR = TS::NR;
    const int mb = (M + MR - 1) / MR, nb = (N + NR - 1) / NR;
    const bool n_outer = N >= M;
    // the operand re-read by the inner loop's tiles: kc rows/columns of 16 KB in L1
    constexpr int kL1 = 16384 / static_cast<int>(L * sizeof(T));
    const int inner = n_outer ? M : N;
    const int kc = std::max(4, kL1 / std::max(1, inner));
    const size_t Ls = L;
    for (int k0 = 0; k0 < K; k0 += kc) {
      const int kk = std::min(kc, K - k0);
      const bool ac = acc || k0 > 0;
      const T* Ak = A + static_cast<size_t>(k0) * sak * Ls;
      const T* Bk = Bm + static_cast<size_t>(k0) * sbk * Ls;
      const int o_n = n_outer ? nb : mb, i_n = n_outer ? mb : nb;
      for (int o = 0; o < o_n; ++o)
        for (int i = 0; i < i_n; ++i) {
          const int bi = n_outer ? i : o, bj = n_outer ? o : i;
          const int m0 = block_start(bi, mb, M), m1 = block_start(bi + 1, mb, M);
          const int n0 = block_start(bj, nb, N), n1 = block_start(bj + 1, nb, N);
          mm_tile_at<T, L, MR, NR>(m1 - m0, n1 - n0, kk, Ak + static_cast<size_t>(m0) * sam * Ls,
                                   sam * Ls, sak * Ls, Bk + static_cast<size_t>(n0) * sbn * Ls,
                                   sbk * Ls, sbn * Ls, C + static_cast<size_t>(m0 * scm + n0 * scn) * Ls,
                                   scm * Ls, scn * Ls, alpha, ac);
        }
    }
  }
}

// The interleaved block of the cores b0.. of c (B or 1, r, n, r'; each (r, n, r') block
// contiguous): dst[e L + l] = core b0 + l's entry e, lanes past the batch repeating its
// last core (their results are never written out). One strided load per lane (a gather
// across the points), the entries' loop outside.
template <typename T, int L>
void gather_core(const torch::Tensor& c, int64_t b0, int64_t B, T* __restrict dst) {
  const T* base = c.data_ptr<T>();
  const int64_t E = c.numel() / c.size(0), sb = c.size(0) == 1 ? 0 : c.stride(0);
  int64_t idx[L];
  for (int l = 0; l < L; ++l) idx[l] = std::min<int64_t>(b0 + l, B - 1) * sb;
  for (int64_t e = 0; e < E; ++e)
    for (int l = 0; l < L; ++l) dst[e * L + l] = base[e + idx[l]];
}

// v = a q b and d = x over the L lanes (restrict: vectorized without alias checks)
template <typename T, int L>
inline void mul3(T* __restrict v, const T* __restrict a, const T* __restrict q,
                 const T* __restrict b) {
  for (int l = 0; l < L; ++l) v[l] = a[l] * q[l] * b[l];
}
template <typename T, int L>
inline void copy_lanes(T* __restrict d, const T* __restrict x) {
  for (int l = 0; l < L; ++l) d[l] = x[l];
}

// The LQ c = R^T Q'^T of one interleaved core c (a x m row-major, m = n b) as the QR of
// CT = c^T (m x a, overwritten by house_qr): Q' (m x a) into Qt, R (a x a) into R, the
// signs of diag R into sg (a x L). LqAt<L>::F for blocks of L points, Lq for bf::lanes.
template <int L>
struct LqAt {
  template <typename T, int a>
  struct F {
    static void run(int& m, T*& CT, T*& vd, T*& cf, T*& beta, T*& Qt, T*& R, T*& sg) {
      bf::house_qr<T, L, a>(m, CT, vd, cf, beta);
      bf::upper<T, L>(a, CT, beta, R);
      for (int j = 0; j < a; ++j)
        for (int l = 0; l < L; ++l) sg[j * L + l] = std::copysign(T(1), beta[j * L + l]);
      bf::eye<T, L>(m, a, Qt);
      bf::apply_q<T, L, a>(m, CT, vd, cf, Qt, true);
    }
  };
};
template <typename T, int a>
struct Lq : LqAt<bf::lanes<T>()>::template F<T, a> {};

// The TT Z to project, as project_small_impl reads it: dense cores Z (1 or B, R, n, R').
// A source gives Z's ranks (rank(k): R_k), prepares its interleaved buffer once per call
// (init) and writes the block of points b0.. of core k into it (gather; layout of
// gather_core). The transport's source (the tangent block cores assembled in cache from
// the point's cores and the deltas) is tbs::TangentZ.
template <typename T, int L>
struct DenseZ {
  const std::vector<torch::Tensor>& Z;
  int64_t B;
  int rank(int k) const { return static_cast<int>(Z[k].size(1)); }
  void init(T*, const std::vector<size_t>&) const {}
  void gather(int k, int64_t b0, T* dst) const { gather_core<T, L>(Z[k], b0, B, dst); }
};

// returns whether every delta is finite (tested when check, in cache as they are written;
// a non-finite entry of a point or of Z reaches the deltas)
// L: points per block (bf::lanes, or half of it: see project_batch_small); Src: the source
// of Z's cores (DenseZ, tbs::TangentZ); V: the points' canonical right cores V_1..V_{d-1}
// (1 or B, r, n, r'), or null: computed by the LQ sweep (given, the right sweep is
// Q_{k-1} = (Z_k Q_k) V_k^T alone: no QR)
template <typename T, int L, typename Src>
bool project_small_impl(const std::vector<torch::Tensor>& U, const Src& Z,
                        bool gauge, int64_t B, torch::Tensor& out, bool check,
                        const std::vector<torch::Tensor>* V = nullptr) {
  bool finite_all = true;
  const int d = static_cast<int>(U.size());
  std::vector<int> r(d + 1), R(d + 1), n(d);
  for (int k = 0; k < d; ++k) {
    r[k] = static_cast<int>(U[k].size(1)); n[k] = static_cast<int>(U[k].size(2));
    R[k] = Z.rank(k);
  }
  r[d] = 1; R[d] = 1;
  // interleaved copies of the block's cores, and per-core workspaces at their largest
  std::vector<size_t> uo(d + 1, 0), zo(d + 1, 0);
  size_t mx = 0, qo = 0;
  std::vector<size_t> qoff(d);
  for (int k = 0; k < d; ++k) {
    const size_t un = static_cast<size_t>(r[k]) * n[k] * r[k + 1], zn = static_cast<size_t>(R[k]) * n[k] * R[k + 1];
    uo[k + 1] = uo[k] + un * L; zo[k + 1] = zo[k] + zn * L;
    mx = std::max({mx, un, zn, static_cast<size_t>(R[k]) * n[k] * r[k + 1],
                   static_cast<size_t>(r[k]) * n[k] * R[k + 1]});
    qoff[k] = qo; qo += static_cast<size_t>(R[k + 1]) * r[k + 1] * L;
  }
  // one grow-only arena per thread (no allocation and no page faults per call; a block of
  // 16 float64 points at d = 10, n = 20, r = 10 needs about 6 MB), every buffer 64-byte
  // aligned; a larger need (high n, d or rank) is allocated for the call and not kept
  const size_t rr = static_cast<size_t>(kMaxRank) * kMaxRank * L, rl = static_cast<size_t>(kMaxRank) * L;
  // P, P' (r x R) and Q_k S_{k+1} (R x r): Z's ranks may exceed the point's bound
  const size_t rR = static_cast<size_t>(kMaxRank) * std::max(kMaxRank, *std::max_element(R.begin(), R.end())) * L;
  const size_t sizes[] = {uo[d], zo[d], qo, mx * L, mx * L, mx * L, mx * L, mx * L, rr, rR, rR,
                          rl, rl, rl, static_cast<size_t>(d + 1) * rl};
  constexpr size_t kAl = 64 / sizeof(T);
  size_t total = 0;
  for (size_t z : sizes) total += (z + kAl - 1) / kAl * kAl + kAl;
  constexpr size_t kKeep = (size_t(16) << 20) / sizeof(T);
  thread_local std::vector<T> arena;
  std::vector<T> once;
  std::vector<T>& ws = total <= kKeep ? arena : once;
  if (ws.size() < total) ws.resize(total);
  T* bufs[sizeof(sizes) / sizeof(sizes[0])];
  {
    T* q = ws.data();
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(q);
      q += ((64 - a % 64) % 64) / sizeof(T);
      bufs[i] = q;
      q += (sizes[i] + kAl - 1) / kAl * kAl;
    }
  }
  T *Ug = bufs[0], *Zg = bufs[1], *Qs = bufs[2], *CT = bufs[3], *Qt = bufs[4], *s = bufs[5],
    *Tb = bufs[6], *Db = bufs[7], *Rb = bufs[8], *P = bufs[9], *Pn = bufs[10], *vd = bufs[11],
    *cf = bufs[12], *beta = bufs[13], *sg = bufs[14];
  Z.init(Zg, zo);
  std::vector<torch::Tensor> Ov(d);
  int64_t off = 0;
  for (int k = 0; k < d; ++k) {  // the deltas' (B, rows, cols) views of out
    const int64_t sz = static_cast<int64_t>(r[k]) * n[k] * r[k + 1];
    Ov[k] = out.narrow(1, off, sz).view({B, r[k] * n[k], r[k + 1]});
    off += sz;
  }
  T sc[L];
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    T acc[L];  // sum of 0 * delta per lane: 0, or NaN once a delta is NaN or infinite
    for (int l = 0; l < L; ++l) acc[l] = T(0);
    for (int k = 0; k < d; ++k) {
      gather_core<T, L>(U[k], b0, B, Ug + uo[k]);
      Z.gather(k, b0, Zg + zo[k]);
    }
    // right to left: CT = c_k^T (n r_{k+1} x r_k), c_k starting as U_{d-1} (scaled: the
    // Q factors, all that is used, do not change; keeps squares of huge entries in range)
    T* sgn = sg;
    for (int l = 0; l < L; ++l) sgn[d * kMaxRank * L + l] = T(1);  // S_d = 1
    for (int l = 0; l < L; ++l) Qs[qoff[d - 1] + l] = T(1);  // Q_{d-1} = 1 (1 x 1)
    if (V) {  // the right cores given: Q_{k-1} (R_k x a) = s V_k^T, s = Z_k Q_k (R_k n x b)
      for (int k = d - 1; k >= 1; --k) {
        const int a = r[k], nb = n[k] * r[k + 1], b = r[k + 1], Rk = R[k], R2 = R[k + 1];
        gather_core<T, L>((*V)[k - 1], b0, B, Qt);  // V_k (a x n b; Qt is free here)
        mm_il<T, L>(Rk * n[k], b, R2, Zg + zo[k], R2, 1, Qs + qoff[k], b, 1, s, b, 1, T(1), false);
        mm_il<T, L>(Rk, a, nb, s, nb, 1, Qt, 1, nb, Qs + qoff[k - 1], a, 1, T(1), false);
      }
    }
    if (!V) {
      const int a = r[d - 1], nb = n[d - 1];
      for (int i = 0; i < a; ++i)
        for (int j = 0; j < nb; ++j)
          copy_lanes<T, L>(CT + (static_cast<size_t>(j) * a + i) * L,
                           Ug + uo[d - 1] + (static_cast<size_t>(i) * nb + j) * L);
      bf::scale_down<T, L>(CT, a * nb, sc);
    }
    for (int k = d - 1; k >= 1 && !V; --k) {
      const int a = r[k], nb = n[k] * r[k + 1], b = r[k + 1];
      int m = nb;
      T *ct = CT, *pvd = vd, *pcf = cf, *pb = beta, *pq = Qt,
        *pr = Rb, *ps = sgn + static_cast<size_t>(k) * kMaxRank * L;
      bf::for_cols<T, LqAt<L>::template F, kMaxRank>(a, m, ct, pvd, pcf, pb, pq, pr, ps);
      // V_k[al, (i, be)] = S_k[al] Q'[(i, be), al] S_{k+1}[be], so with s = Z_k Q_k S_{k+1}
      // (R_k n x b), Q_{k-1} (R_k x a) = s V^T = (s Q') S_k: V is never formed
      const T* s1 = sgn + static_cast<size_t>(k + 1) * kMaxRank * L;
      const int Rk = R[k], R2 = R[k + 1];
      T* qk = Qs + qoff[k];
      T* qsg = Pn;  // Q_k S_{k+1} (R2 x b; Pn is free until the left sweep)
      for (int i = 0; i < R2; ++i)
        for (int be = 0; be < b; ++be) {
          const T* x = qk + (static_cast<size_t>(i) * b + be) * L;
          T* y = qsg + (static_cast<size_t>(i) * b + be) * L;
          for (int l = 0; l < L; ++l) y[l] = x[l] * s1[be * L + l];  // S_d = 1: b = 1 there
        }
      mm_il<T, L>(Rk * n[k], b, R2, Zg + zo[k], R2, 1, qsg, b, 1, s, b, 1, T(1), false);
      T* qm = Qs + qoff[k - 1];
      mm_il<T, L>(Rk, a, nb, s, nb, 1, Qt, a, 1, qm, a, 1, T(1), false);
      for (int i = 0; i < Rk; ++i)
        for (int al = 0; al < a; ++al) {
          T* x = qm + (static_cast<size_t>(i) * a + al) * L;
          const T* sa = ps + al * L;
          for (int l = 0; l < L; ++l) x[l] *= sa[l];
        }
      // c_{k-1} (r_{k-1} x n a) = U_{k-1} (r_{k-1} n x a) R^T (unsigned L'_k), written
      // transposed into CT (n a x r_{k-1}) for the next LQ: one product per row al'
      const int ap = r[k - 1], nn = n[k - 1];
      for (int al = 0; al < ap; ++al)
        mm_il<T, L>(nn, a, a, Ug + uo[k - 1] + static_cast<size_t>(al) * nn * a * L, a, 1, Rb, 1,
                    a, CT + static_cast<size_t>(al) * L, a * ap, ap, T(1), false);
    }
    // left to right: T_k = P_k Z_k, P_{k+1} = U_k^T T_k, gauge, D_k = T_k Q_k
    for (int l = 0; l < L; ++l) P[l] = T(1);  // P_0 = 1 (1 x 1)
    for (int k = 0; k < d; ++k) {
      const int a = r[k], b = r[k + 1], Rk = R[k], R2 = R[k + 1], nR2 = n[k] * R2;
      mm_il<T, L>(a, nR2, Rk, P, Rk, 1, Zg + zo[k], nR2, 1, Tb, nR2, 1,
                  T(1), false);
      const T* u = Ug + uo[k];
      if (k < d - 1) {  // P_{k+1} (b x R2) = U^T (b x a n) T (a n x R2)
        mm_il<T, L>(b, R2, a * n[k], u, 1, b, Tb, R2, 1, Pn, R2, 1, T(1), false);
        if (gauge)  // T -= U P_{k+1}
          mm_il<T, L>(a * n[k], R2, b, u, b, 1, Pn, R2, 1, Tb, R2, 1, T(-1), true);
        std::swap(P, Pn);
      }
      // D (a n x b) = T (a n x R2) Q_k (R2 x b)
      mm_il<T, L>(a * n[k], b, R2, Tb, R2, 1, Qs + qoff[k], b, 1, Db, b, 1,
                  T(1), false);
      if (check)
        for (int e = 0; e < a * n[k] * b; ++e)
          for (int l = 0; l < L; ++l) acc[l] += Db[static_cast<size_t>(e) * L + l] * T(0);
      bf::scatter<T, L>(Db, b0, a * n[k], b, nullptr, Ov[k]);
    }
    const int64_t valid = std::min<int64_t>(L, B - b0);  // lanes past B are padding
    for (int l = 0; l < valid; ++l) finite_all = finite_all && acc[l] == T(0);
  }
  return finite_all;
}

// project_small_impl with the source Src<T, L>{args...} at the lanes of dtype t: float64
// 16 (blocks of 8: 23 % slower at r = 10, the Householder QR's one chain per register);
// float32 above rank 8 (mr: the largest rank of the points and of Z) half the lanes (the
// interleaved cores and workspaces, r n r' L numbers each, half as large: 7-14 % faster at
// r = 10-16, n = 20; 32 lanes are still 20 % slower with the register tiles)
// (V: the points' right cores V_1..V_{d-1}, or null: computed)
template <template <typename, int> class Src, typename... A>
bool project_small_lanes(torch::ScalarType t, int64_t mr, const std::vector<torch::Tensor>& U,
                         const std::vector<torch::Tensor>* V, bool gauge, int64_t B,
                         torch::Tensor& out, bool check, const A&... args) {
  constexpr int Ld = bf::lanes<double>(), Lf = bf::lanes<float>();
  if (t == torch::kDouble)
    return project_small_impl<double, Ld>(U, Src<double, Ld>{args...}, gauge, B, out, check, V);
  if (mr > 8)
    return project_small_impl<float, Lf / 2>(U, Src<float, Lf / 2>{args...}, gauge, B, out, check, V);
  return project_small_impl<float, Lf>(U, Src<float, Lf>{args...}, gauge, B, out, check, V);
}

}  // namespace pbs

// The cores of a SIMD batch kernel, checked: 4-D CPU cores (B or 1, r, n, r') of dtype t
// with any batch stride (slices of packed points are read in place); a core whose
// (r, n, r') block is not contiguous is copied
void batch_cores(std::vector<torch::Tensor>& cs, const char* name, torch::ScalarType t,
                 int64_t B) {
  for (auto& c : cs) {
    TORCH_CHECK(c.device().is_cpu() && c.dim() == 4 && c.scalar_type() == t, name,
                ": expected 4-D CPU cores (batch, r, n, r') of one dtype");
    TORCH_CHECK(c.size(0) == 1 || c.size(0) == B, name, ": batch size ", c.size(0),
                " is neither 1 nor ", B);
    if (c.size(0) > 0 && !c.select(0, 0).is_contiguous()) c = c.contiguous();
  }
}

// project (canonical gauge) for B points and/or B TTs with TT-ranks <= 16, SIMD across
// the points: U, Z cores (1 or B, r, n, r'); (B, size of U's point). V: the points'
// canonical right cores V_1..V_{d-1} (the LQ sweep skipped), or empty: computed
torch::Tensor project_batch_small(std::vector<torch::Tensor> U, std::vector<torch::Tensor> Z,
                                  bool gauge, int64_t B, std::string check,
                                  std::vector<torch::Tensor> V) {
  TORCH_CHECK(U.size() >= 2 && U.size() == Z.size(), "project_batch_small: inconsistent lengths");
  TORCH_CHECK(V.empty() || V.size() + 1 == U.size(),
              "V: the d - 1 right cores V_1..V_{d-1} of the points, or none");
  const auto t = U[0].scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kDouble, "U: float32 or float64 only");
  batch_cores(U, "U", t, B);
  batch_cores(Z, "Z", t, B);
  batch_cores(V, "V", t, B);
  for (size_t k = 1; k < U.size() && !V.empty(); ++k)
    TORCH_CHECK(V[k - 1].sizes().slice(1) == U[k].sizes().slice(1), "V: core ", k,
                " differs in shape from U's");
  const size_t d = U.size();
  int64_t size = 0;
  for (size_t k = 0; k < d; ++k) {
    TORCH_CHECK(Z[k].size(2) == U[k].size(2), "Z: mode sizes differ from U's");
    TORCH_CHECK(U[k].size(1) <= pbs::kMaxRank && U[k].size(3) <= pbs::kMaxRank &&
                Z[k].size(1) <= pbs::kMaxZRank && Z[k].size(3) <= pbs::kMaxZRank,
                "project_batch_small: TT-ranks above ", pbs::kMaxRank, " (points) or ",
                pbs::kMaxZRank, " (Z)");
    TORCH_CHECK(k == 0 || U[k].size(2) * U[k].size(3) >= U[k].size(1),
                "U: core ", k, " has fewer columns n r' than rows r (no LQ)");
    TORCH_CHECK(k + 1 == d || (U[k].size(3) == U[k + 1].size(1) && Z[k].size(3) == Z[k + 1].size(1)),
                "U, Z: ranks of consecutive cores differ");
    size += U[k].size(1) * U[k].size(2) * U[k].size(3);
  }
  TORCH_CHECK(U[0].size(1) == 1 && U[d - 1].size(3) == 1 && Z[0].size(1) == 1 && Z[d - 1].size(3) == 1,
              "U, Z: boundary ranks must be 1");
  auto out = empty_for_output({B, size}, U[0].options());
  if (B == 0) return out;
  int64_t mr = 0;
  for (size_t k = 0; k < d; ++k) mr = std::max({mr, U[k].size(1), Z[k].size(1)});
  const bool ok = pbs::project_small_lanes<pbs::DenseZ>(t, mr, U, V.empty() ? nullptr : &V, gauge,
                                                        B, out, !check.empty(), Z, B);
  TORCH_CHECK(ok, check);  // check: the message for a non-finite result ("": not tested)
  return out;
}


// ---------------------------------------------------------------------------------------
// The batched vector transport by projection for small ranks: P_Y(xi) at B new points Y of
// the tangent vectors xi = sum_k U_<k dU_k V_>k given at the points X by their left cores
// U, right cores V and deltas dU. project_small_impl's sweeps with Z = xi's rank-2r block
// cores [U_0, dU_0], [[U_k, dU_k], [0, V_k]], [[dU_{d-1}], [V_{d-1}]] assembled per block
// of points in the interleaved buffer (in cache) from U, V and dU: the block cores are
// never written to memory (building them there and reading them back cost about a quarter
// of the projection at r = 4).
namespace tbs {

// rows x cols row-major entries of each point b0.. of c (B or 1, r, n, r'; each point's
// block contiguous) into the interleaved dst with row stride ldd (in entries); lanes past
// the batch repeat its last point (as gather_core)
template <typename T, int L>
void gather_rows(const torch::Tensor& c, int64_t b0, int64_t B, int rows, int cols, T* __restrict dst,
                 int ldd) {
  const T* base = c.data_ptr<T>();
  const int64_t sb = c.size(0) == 1 ? 0 : c.stride(0);
  int64_t idx[L];
  for (int l = 0; l < L; ++l) idx[l] = std::min<int64_t>(b0 + l, B - 1) * sb;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const int64_t e = static_cast<int64_t>(i) * cols + j;
      T* o = dst + (static_cast<size_t>(i) * ldd + j) * L;
      for (int l = 0; l < L; ++l) o[l] = base[e + idx[l]];
    }
}

// The source of project_small_impl for xi: U, dU (d cores), V (d - 1 cores: V_1..V_{d-1})
template <typename T, int L>
struct TangentZ {
  const std::vector<torch::Tensor>& U;
  const std::vector<torch::Tensor>& V;
  const std::vector<torch::Tensor>& D;
  int64_t B;
  int d() const { return static_cast<int>(U.size()); }
  int rank(int k) const { return k == 0 ? 1 : 2 * static_cast<int>(U[k].size(1)); }
  int cols(int k) const { return k + 1 == d() ? 1 : 2 * static_cast<int>(U[k].size(3)); }
  // the zero blocks (bottom left of the middle cores) once: gather never writes them
  void init(T* Zg, const std::vector<size_t>& zo) const {
    for (int k = 1; k + 1 < d(); ++k) {
      const int r = static_cast<int>(U[k].size(1)), n = static_cast<int>(U[k].size(2)),
                rp = static_cast<int>(U[k].size(3));
      for (int i = r; i < 2 * r; ++i)
        for (int j = 0; j < n; ++j)
          std::fill_n(Zg + zo[k] + (static_cast<size_t>(i * n + j) * 2 * rp) * L,
                      static_cast<size_t>(rp) * L, T(0));
    }
  }
  void gather(int k, int64_t b0, T* dst) const {
    const int r = static_cast<int>(U[k].size(1)), n = static_cast<int>(U[k].size(2)),
              rp = static_cast<int>(U[k].size(3)), w = cols(k);
    const int co = k + 1 == d() ? 0 : rp;  // dU's column offset
    if (k + 1 < d()) gather_rows<T, L>(U[k], b0, B, r * n, rp, dst, w);
    gather_rows<T, L>(D[k], b0, B, r * n, rp, dst + static_cast<size_t>(co) * L, w);
    if (k > 0)
      gather_rows<T, L>(V[k - 1], b0, B, r * n, rp,
                        dst + (static_cast<size_t>(r) * n * w + co) * L, w);
  }
};

}  // namespace tbs

// P_Y of the tangent vectors of U (points X), V (their right cores V_1..V_{d-1}) and dU at
// the points Uy, canonical gauge at Y, for B points of TT-ranks <= 16 (2 r <= kMaxZRank),
// SIMD across the points: cores (1 or B, r, n, r'); (B, size) packed deltas at Y. check:
// the message of the error raised when a delta is NaN or infinite ("": not tested).
torch::Tensor transport_batch_small(std::vector<torch::Tensor> Uy, std::vector<torch::Tensor> U,
                                    std::vector<torch::Tensor> V, std::vector<torch::Tensor> dU,
                                    int64_t B, std::string check) {
  const size_t d = Uy.size();
  TORCH_CHECK(d >= 2 && U.size() == d && dU.size() == d && V.size() + 1 == d,
              "transport_batch_small: inconsistent lengths (V: the d - 1 cores V_1..V_{d-1})");
  const auto t = Uy[0].scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kDouble, "Uy: float32 or float64 only");
  batch_cores(Uy, "Uy", t, B);
  batch_cores(U, "U", t, B);
  batch_cores(V, "V", t, B);
  batch_cores(dU, "dU", t, B);
  int64_t size = 0, mr = 0;
  for (size_t k = 0; k < d; ++k) {
    const auto s = U[k].sizes().slice(1);
    TORCH_CHECK(Uy[k].sizes().slice(1) == s && dU[k].sizes().slice(1) == s &&
                (k == 0 || V[k - 1].sizes().slice(1) == s),
                "Uy, V, dU: core ", k, " differs in shape from U's");
    TORCH_CHECK(U[k].size(1) <= pbs::kMaxRank && U[k].size(3) <= pbs::kMaxRank,
                "transport_batch_small: TT-ranks above ", pbs::kMaxRank);
    TORCH_CHECK(k == 0 || U[k].size(2) * U[k].size(3) >= U[k].size(1),
                "Uy: core ", k, " has fewer columns n r' than rows r (no LQ)");
    TORCH_CHECK(k + 1 == d || U[k].size(3) == U[k + 1].size(1),
                "U: ranks of consecutive cores differ");
    size += U[k].size(1) * U[k].size(2) * U[k].size(3);
    mr = std::max<int64_t>(mr, k == 0 ? 1 : 2 * U[k].size(1));
  }
  TORCH_CHECK(U[0].size(1) == 1 && U[d - 1].size(3) == 1, "U: boundary ranks must be 1");
  auto out = torch::empty({B, size}, Uy[0].options());
  if (B == 0) return out;
  advise_huge_pages(out);
  const bool ok =
      pbs::project_small_lanes<tbs::TangentZ>(t, mr, Uy, nullptr, true, B, out, !check.empty(), U, V, dU, B);
  TORCH_CHECK(ok, check);
  return out;
}

// ---------------------------------------------------------------------------------------
// The gauge projection of a batch (gauge_project_batch's result) SIMD across the points:
// per block of L points and per core of a run, the interleaved U and g (gathered from the
// packed rows), P = U^T g and g - U P by the register-tiled products of pbs, in cache.
// gauge_project_batch's per-point BLAS calls on 80 x 4 matrices (r = 4) cost several
// times the arithmetic.
namespace gbs {

// cnt entries from offset off of the packed rows b0.. of base (row stride sb; 0: one row
// for all) into the interleaved dst; lanes past the batch repeat its last row
template <typename T, int L>
inline void gather_packed(const T* base, int64_t sb, int64_t b0, int64_t B, int64_t off, int cnt,
                          T* __restrict dst) {
  const T* src[L];
  for (int l = 0; l < L; ++l) src[l] = base + std::min<int64_t>(b0 + l, B - 1) * sb + off;
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < L; ++l) dst[static_cast<size_t>(e) * L + l] = src[l][e];
}

// the first nl lanes of the interleaved src back into the packed rows b0.. (stride sb)
template <typename T, int L>
inline void scatter_packed(const T* __restrict src, T* base, int64_t sb, int64_t b0, int nl,
                           int64_t off, int cnt) {
  T* dst[L];
  for (int l = 0; l < nl; ++l) dst[l] = base + (b0 + l) * sb + off;
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < nl; ++l) dst[l][e] = src[static_cast<size_t>(e) * L + l];
}

// o (B, n) = the gauge projection of g (B, n) at the points pp (row stride sp: n, or 0 for
// one point); whether o is finite (as gauge_impl)
template <typename T, int L>
bool gauge_small_impl(const T* pp, int64_t sp, const T* gp, T* o, int64_t n, int64_t B,
                      const std::vector<int64_t>& runs) {
  // the entries no run covers (the last core): copied row by row
  std::vector<std::pair<int64_t, int64_t>> cov, gaps;
  size_t mx = 0, cm = 0;
  for (size_t i = 0; i < runs.size(); i += 4) {
    cov.emplace_back(runs[i], runs[i] + runs[i + 1] * runs[i + 2] * runs[i + 3]);
    mx = std::max(mx, static_cast<size_t>(runs[i + 2] * runs[i + 3]));
    cm = std::max(cm, static_cast<size_t>(runs[i + 3]));
  }
  std::sort(cov.begin(), cov.end());
  int64_t at = 0;
  for (const auto& c : cov) {
    if (c.first > at) gaps.emplace_back(at, c.first);
    at = std::max(at, c.second);
  }
  if (at < n) gaps.emplace_back(at, n);
  constexpr size_t kAl = 64 / sizeof(T);
  const size_t sizes[] = {mx * L, mx * L, cm * cm * L};
  thread_local std::vector<T> arena;  // grow-only (r = 16, n = 20: 0.9 MB in float64)
  size_t total = 0;
  for (size_t z : sizes) total += (z + kAl - 1) / kAl * kAl + kAl;
  if (arena.size() < total) arena.resize(total);
  T* bufs[3];
  {
    T* q = arena.data();
    for (int i = 0; i < 3; ++i) {
      q += ((64 - reinterpret_cast<uintptr_t>(q) % 64) % 64) / sizeof(T);
      bufs[i] = q;
      q += (sizes[i] + kAl - 1) / kAl * kAl;
    }
  }
  T *Ub = bufs[0], *Gb = bufs[1], *P = bufs[2];
  bool ok = true;
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    const int nl = static_cast<int>(std::min<int64_t>(L, B - b0));
    T acc[L];  // sum of 0 * result per lane: 0, or NaN once an entry is NaN or infinite
    for (int l = 0; l < L; ++l) acc[l] = T(0);
    for (size_t i = 0; i < runs.size(); i += 4) {
      const int rn = static_cast<int>(runs[i + 2]), c = static_cast<int>(runs[i + 3]);
      for (int64_t j = 0; j < runs[i + 1]; ++j) {
        const int64_t off = runs[i] + j * rn * c;
        gather_packed<T, L>(pp, sp, b0, B, off, rn * c, Ub);
        gather_packed<T, L>(gp, n, b0, B, off, rn * c, Gb);
        // P (c x c) = U^T G; G -= U P
        pbs::mm_il<T, L>(c, c, rn, Ub, 1, c, Gb, c, 1, P, c, 1, T(1), false);
        pbs::mm_il<T, L>(rn, c, c, Ub, c, 1, P, c, 1, Gb, c, 1, T(-1), true);
        for (int e = 0; e < rn * c; ++e)
          for (int l = 0; l < L; ++l) acc[l] += Gb[static_cast<size_t>(e) * L + l] * T(0);
        scatter_packed<T, L>(Gb, o, n, b0, nl, off, rn * c);
      }
    }
    for (int l = 0; l < nl; ++l) ok = ok && acc[l] == T(0);
  }
  for (int64_t b = 0; b < B; ++b)
    for (const auto& gp2 : gaps) {
      std::copy(gp + b * n + gp2.first, gp + b * n + gp2.second, o + b * n + gp2.first);
      ok = finite<T>(o + b * n + gp2.first, gp2.second - gp2.first) && ok;
    }
  return ok;
}

}  // namespace gbs

// gauge_project_batch SIMD across blocks of points (for batches; any ranks): p (1 or B,
// size), g (B, size) -> ((B, size), all finite)
std::tuple<torch::Tensor, bool> gauge_project_batch_small(torch::Tensor p, torch::Tensor g,
                                                          std::vector<int64_t> runs) {
  check_gauge_batch_inputs(p, g, runs);
  const auto t = p.scalar_type();
  const int64_t n = g.size(1), B = g.size(0), sp = p.size(0) == 1 ? 0 : n;
  auto out = empty_for_output(g.sizes(), g.options());
  if (B == 0) return {out, true};
  int64_t cm = 0;
  for (size_t i = 0; i < runs.size(); i += 4) cm = std::max(cm, runs[i + 3]);
  constexpr int Ld = bf::lanes<double>(), Lf = bf::lanes<float>();
  bool ok;
  if (t == torch::kDouble)
    ok = gbs::gauge_small_impl<double, Ld>(p.data_ptr<double>(), sp, g.data_ptr<double>(),
                                           out.data_ptr<double>(), n, B, runs);
  else if (cm > 8)  // (half the lanes above rank 8, as the projection)
    ok = gbs::gauge_small_impl<float, Lf / 2>(p.data_ptr<float>(), sp, g.data_ptr<float>(),
                                              out.data_ptr<float>(), n, B, runs);
  else
    ok = gbs::gauge_small_impl<float, Lf>(p.data_ptr<float>(), sp, g.data_ptr<float>(),
                                          out.data_ptr<float>(), n, B, runs);
  return {out, ok};
}

// ---------------------------------------------------------------------------------------
// The batched retraction for small ranks in the interleaved layout of bf (blocks of L
// points, the point index innermost): per block, the LQ sweep of the points' cores (the
// canonical right cores V, as project_small_impl), the structured right-to-left
// orthogonalization of the rank-2r TT of X + xi (retract_impl's formulas: remove the V
// part, QR of the rest) and the left-to-right truncated SVDs (Householder QR and one-sided
// Jacobi of bf), every statement over the L lanes. The SVDs have 2 r' columns: r' <= 4.
namespace rbs {

// The factorization steps below run on lane vectors, Vec<T, L>: L numbers (the same entry
// of L points) as one GCC/clang vector-extension value, which the compiler splits into the
// machine's registers (two AVX-512 or four AVX2 registers for 16 doubles; SSE2 without
// AVX). Written this way every loop is vector code with its accumulators in registers:
// bf's lane loops left GCC scalar code and alias checks in the Householder updates and
// kept the dot products in memory (QR of the 80 x 8 unfoldings 2.8x faster measured).
// Other compilers: bf's lane loops (same arithmetic).
#if defined(__GNUC__)
#define TTM_RBS_VEC 1
template <typename T, int L>
struct VecOf {
  typedef T type __attribute__((vector_size(L * sizeof(T)), aligned(alignof(T)), may_alias));
};
template <typename T, int L>
using Vec = typename VecOf<T, L>::type;
template <typename T, int L>
inline Vec<T, L> ld(const T* p) { return *reinterpret_cast<const Vec<T, L>*>(p); }
template <typename T, int L>
inline void st(T* p, const Vec<T, L>& v) { *reinterpret_cast<Vec<T, L>*>(p) = v; }
template <typename T, int L>
inline Vec<T, L> vsqrt(const Vec<T, L>& x) {
  alignas(64) T a[L];
  st<T, L>(a, x);
  bf::sqrt_lanes<T, L>(a);
  return ld<T, L>(a);
}

// bf::house_qr's factorization (the same reflectors, R, vd, cf, beta), one pass per column:
// the update pass of column j accumulates column j + 1's squared norm and Gram row
// G[c] = sum_{i > j} A[i, j+1] A[i, c] (G[0]: the norm), so column j + 1's dot products are
// G[c] - b A[j+1, c] (b = beta_{j+1}; the reflector's head is A[j+1, j+1] - b), no second
// pass over the rows
template <typename T, int L, int n, int j>
void house_step(int m, T* __restrict A, T* __restrict vd, T* __restrict cf, T* __restrict beta,
                const Vec<T, L>* G) {
  using V = Vec<T, L>;
  const V zero = V{}, nr = vsqrt<T, L>(G[0]), alpha = ld<T, L>(A + (j * n + j) * L);
  const V b = alpha >= zero ? -nr : nr;
  const V vtv = T(2) * nr * (nr + (alpha >= zero ? alpha : -alpha));
  const V c2 = vtv > zero ? T(2) / vtv : zero;
  st<T, L>(beta + j * L, b);
  st<T, L>(cf + j * L, c2);
  st<T, L>(vd + j * L, alpha - b);
  constexpr int w = n - j - 1;
  if constexpr (w > 0) {
    V dot[w], Gn[w];
    T* row = A + (j * n + j + 1) * L;
    for (int c = 0; c < w; ++c) {
      const V x = ld<T, L>(row + c * L);
      dot[c] = (G[c + 1] - b * x) * c2;
      st<T, L>(row + c * L, x - dot[c] * (alpha - b));
      Gn[c] = zero;
    }
    for (int i = j + 1; i < m; ++i) {
      const V v = ld<T, L>(A + (i * n + j) * L);
      T* r = A + (i * n + j + 1) * L;
      V x[w];
      for (int c = 0; c < w; ++c) {
        x[c] = ld<T, L>(r + c * L) - dot[c] * v;
        st<T, L>(r + c * L, x[c]);
      }
      for (int c = 0; c < w; ++c) Gn[c] += x[0] * x[c];
    }
    house_step<T, L, n, j + 1>(m, A, vd, cf, beta, Gn);
  }
}

template <typename T, int L, int n>
void house_qr(int m, T* __restrict A, T* vd, T* cf, T* beta) {
  using V = Vec<T, L>;
  V G[n];
  for (int c = 0; c < n; ++c) G[c] = V{};
  for (int i = 0; i < m; ++i) {
    const V x0 = ld<T, L>(A + i * n * L);
    for (int c = 0; c < n; ++c) G[c] += x0 * ld<T, L>(A + (i * n + c) * L);
  }
  house_step<T, L, n, 0>(m, A, vd, cf, beta, G);
}

// X (m x w) := H_j X, then the reflectors below j, for the reflectors of house_qr (A, vd,
// cf); dot: reflector j's v^T X (columns c0..). The update pass of reflector j accumulates
// reflector j - 1's dot products (its rows >= j; row j - 1, untouched by H_j, is added
// after). lower: X starts as [I; 0], so H_j leaves the columns < j (zero in rows >= j) alone.
template <typename T, int L, int n, int w, int j, bool lower>
void apply_step(int m, const T* __restrict A, const T* __restrict vd, const T* __restrict cf,
                T* __restrict X, Vec<T, L>* dot) {
  using V = Vec<T, L>;
  constexpr int c0 = lower ? (j < w ? j : w) : 0, c1 = lower && j > 0 ? (j - 1 < w ? j - 1 : w) : 0;
  const V c2 = ld<T, L>(cf + j * L);
  for (int c = c0; c < w; ++c) dot[c] *= c2;
  V dn[w];
  for (int c = 0; c < w; ++c) dn[c] = V{};
  for (int i = j; i < m; ++i) {
    const V v = ld<T, L>(i == j ? vd + j * L : A + (i * n + j) * L);
    T* row = X + i * w * L;
    V x[w];
    for (int c = c0; c < w; ++c) {
      x[c] = ld<T, L>(row + c * L) - dot[c] * v;
      st<T, L>(row + c * L, x[c]);
    }
    if constexpr (j > 0) {
      const V u = ld<T, L>(A + (i * n + j - 1) * L);
      for (int c = c0; c < w; ++c) dn[c] += u * x[c];
    }
  }
  if constexpr (j > 0) {
    const V u = ld<T, L>(vd + (j - 1) * L);
    const T* row = X + (j - 1) * w * L;
    for (int c = c1; c < w; ++c) dn[c] += u * ld<T, L>(row + c * L);
    apply_step<T, L, n, w, j - 1, lower>(m, A, vd, cf, X, dn);
  }
}

// X (m x w, interleaved) := H_0 ... H_{n-1} X (lower: X = [I; 0] on entry, w <= n)
template <typename T, int L, int n, int w, bool lower>
void apply_q(int m, const T* A, const T* vd, const T* cf, T* X) {
  using V = Vec<T, L>;
  constexpr int c0 = lower ? (n - 1 < w ? n - 1 : w) : 0;
  V dot[w];
  for (int c = 0; c < w; ++c) dot[c] = V{};
  for (int i = n - 1; i < m; ++i) {
    const V v = ld<T, L>(i == n - 1 ? vd + (n - 1) * L : A + (i * n + n - 1) * L);
    for (int c = c0; c < w; ++c) dot[c] += v * ld<T, L>(X + (i * w + c) * L);
  }
  apply_step<T, L, n, w, n - 1, lower>(m, A, vd, cf, X, dot);
}

// bf::jacobi on lane vectors (the same rotations, order and stopping rule)
template <typename T, int L, int n>
int jacobi(T* __restrict W, T* __restrict Vr, T tol, int max_sweeps) {
  using V = Vec<T, L>;
  bf::eye<T, L>(n, n, Vr);
  constexpr int N = n + (n & 1), K = N / 2;
  int P[N > 1 ? N - 1 : 1][K], Qc[N > 1 ? N - 1 : 1][K];
  bf::round_robin<K>(N, P, Qc);
  const V zero = V{}, one = zero + T(1);
  const T tol2 = tol * tol, e2 = std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
  V nrm[n];
  int sweep = 0;
  while (sweep < max_sweeps && n > 1) {
    ++sweep;
    for (int c = 0; c < n; ++c) nrm[c] = zero;
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < n; ++c) {
        const V x = ld<T, L>(W + (i * n + c) * L);
        nrm[c] += x * x;
      }
    V fl = zero, off = zero;
    for (int c = 0; c < n; ++c) fl += nrm[c];
    fl *= e2;
    const V fl2 = fl * fl;
    for (int r = 0; r < N - 1; ++r) {
      // the round's K disjoint pairs: their dot products, then their rotations'
      // parameters (independent chains, no branch between them), then the rotations
      V g[K], cs[K], sn[K];
      for (int k = 0; k < K; ++k) {
        const int p = P[r][k], q = Qc[r][k];
        g[k] = zero;
        if (q >= n) continue;
        for (int i = 0; i < n; ++i) g[k] += ld<T, L>(W + (i * n + p) * L) * ld<T, L>(W + (i * n + q) * L);
      }
      bool live[K];
      for (int k = 0; k < K; ++k) {
        const int p = P[r][k], q = Qc[r][k];
        live[k] = false;
        if (q >= n) continue;
        // as bf::jacobi: rotate where |g| > tol |w_p| |w_q| and |w_p| |w_q| > floor
        // (squared; false for NaN), Rutishauser's t, t = 0 elsewhere
        const V a = nrm[p], b = nrm[q], ab2 = a * b, dd = b - a, g2 = T(2) * g[k];
        const auto rot = (g[k] * g[k] > tol2 * ab2) & (ab2 > fl2);
        const V h = vsqrt<T, L>(dd * dd + g2 * g2);
        const V t0 = (dd >= zero ? g2 : -g2) / ((dd >= zero ? dd : -dd) + h);
        const V t = rot ? t0 : zero;  // (t0 is NaN for g = b - a = 0: not rotated)
        off = rot ? one : off;
        nrm[p] = a - t * g[k];
        nrm[q] = b + t * g[k];
        const V c = one / vsqrt<T, L>(one + t * t);
        cs[k] = c;
        sn[k] = c * t;
        alignas(64) T any[L];
        st<T, L>(any, rot ? one : zero);
        T cnt = T(0);
        for (int l = 0; l < L; ++l) cnt += any[l];
        live[k] = cnt > T(0);  // else converged in every lane: no rotation work
      }
      for (int k = 0; k < K; ++k) {
        if (!live[k]) continue;
        const int p = P[r][k], q = Qc[r][k];
        const V c = cs[k], s = sn[k];
        for (int i = 0; i < n; ++i) {
          const V wp = ld<T, L>(W + (i * n + p) * L), wq = ld<T, L>(W + (i * n + q) * L);
          st<T, L>(W + (i * n + p) * L, c * wp - s * wq);
          st<T, L>(W + (i * n + q) * L, s * wp + c * wq);
          const V vp = ld<T, L>(Vr + (i * n + p) * L), vq = ld<T, L>(Vr + (i * n + q) * L);
          st<T, L>(Vr + (i * n + p) * L, c * vp - s * vq);
          st<T, L>(Vr + (i * n + q) * L, s * vp + c * vq);
        }
      }
    }
    alignas(64) T o[L];
    st<T, L>(o, off);
    bool done = true;
    for (int l = 0; l < L; ++l) done = done && o[l] == T(0);  // no rotation this sweep
    if (done) break;
  }
  return sweep;
}

// pbs::mm_il's product on lane vectors: C[m, n] = alpha sum_k A[m, k] B[k, n] (+ C[m, n] if
// acc), element strides as mm_il's. 4 x 4 tiles of outputs (16 accumulators, 8 loads for 16
// multiply-adds: loads bound these short products), then rows of 4, then single outputs.
template <typename T, int L>
void mm(int M, int N, int K, const T* __restrict A, int sam, int sak, const T* __restrict Bm,
        int sbk, int sbn, T* __restrict C, int scm, int scn, T alpha, bool acc) {
  using V = Vec<T, L>;
  auto a_at = [&](int m, int k) { return ld<T, L>(A + static_cast<size_t>(m * sam + k * sak) * L); };
  auto b_at = [&](int k, int n) { return ld<T, L>(Bm + static_cast<size_t>(k * sbk + n * sbn) * L); };
  auto put = [&](int m, int n, const V& x) {
    T* c = C + static_cast<size_t>(m * scm + n * scn) * L;
    st<T, L>(c, acc ? ld<T, L>(c) + alpha * x : alpha * x);
  };
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    int n = 0;
    for (; n + 4 <= N; n += 4) {
      V s[16];
      for (int e = 0; e < 16; ++e) s[e] = V{};
      for (int k = 0; k < K; ++k) {
        V av[4], bv[4];
        for (int i = 0; i < 4; ++i) { av[i] = a_at(m + i, k); bv[i] = b_at(k, n + i); }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) s[i * 4 + j] += av[i] * bv[j];
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) put(m + i, n + j, s[i * 4 + j]);
    }
    for (; n < N; ++n) {
      V s[4];
      for (int i = 0; i < 4; ++i) s[i] = V{};
      for (int k = 0; k < K; ++k) {
        const V bv = b_at(k, n);
        for (int i = 0; i < 4; ++i) s[i] += a_at(m + i, k) * bv;
      }
      for (int i = 0; i < 4; ++i) put(m + i, n, s[i]);
    }
  }
  for (; m < M; ++m) {
    int n = 0;
    for (; n + 4 <= N; n += 4) {
      V s[4];
      for (int j = 0; j < 4; ++j) s[j] = V{};
      for (int k = 0; k < K; ++k) {
        const V av = a_at(m, k);
        for (int j = 0; j < 4; ++j) s[j] += av * b_at(k, n + j);
      }
      for (int j = 0; j < 4; ++j) put(m, n + j, s[j]);
    }
    for (; n < N; ++n) {
      V s = V{};
      for (int k = 0; k < K; ++k) s += a_at(m, k) * b_at(k, n);
      put(m, n, s);
    }
  }
}

// bf::scale_down on lane vectors (the same factors and products: equal results): the
// lane loops' max and product passes ran scalar, ~9 % of the r = 4 float64 retraction
template <typename T, int L>
void scale_down(T* __restrict a, int cnt, T* __restrict sc) {
  using V = Vec<T, L>;
  const V zero = V{};
  // two running maxima in registers (NaN never taken: compares false)
  auto absmax = [&](int e, const V& m) {
    const V x = ld<T, L>(a + static_cast<size_t>(e) * L), ax = x >= zero ? x : -x;
    return ax > m ? ax : m;
  };
  V m0 = zero, m1 = zero;
  int e = 0;
  for (; e + 2 <= cnt; e += 2) {
    m0 = absmax(e, m0);
    m1 = absmax(e + 1, m1);
  }
  if (e < cnt) m0 = absmax(e, m0);
  alignas(64) T mx[L], f1[L], f2[L];
  st<T, L>(mx, m0 > m1 ? m0 : m1);
  for (int l = 0; l < L; ++l) {
    int x = 0;
    if (mx[l] > T(0) && std::isfinite(mx[l])) x = std::ilogb(mx[l]);
    sc[l] = std::ldexp(T(1), x);
    f1[l] = std::ldexp(T(1), -x / 2);
    f2[l] = std::ldexp(T(1), -x - (-x / 2));
  }
  const V g1 = ld<T, L>(f1), g2 = ld<T, L>(f2);
  for (e = 0; e < cnt; ++e) {
    T* q = a + static_cast<size_t>(e) * L;
    st<T, L>(q, ld<T, L>(q) * g1 * g2);
  }
}

// acc[l] += sum_e 0 * x[e L + l] over cnt entries: stays 0 unless an entry is NaN or
// infinite (four partial sums: no long dependency chain)
template <typename T, int L>
void add_zero_times(const T* x, int cnt, T* acc) {
  using V = Vec<T, L>;
  V s[4];
  for (int i = 0; i < 4; ++i) s[i] = V{};
  int e = 0;
  for (; e + 4 <= cnt; e += 4)
    for (int i = 0; i < 4; ++i) s[i] += ld<T, L>(x + static_cast<size_t>(e + i) * L) * T(0);
  for (; e < cnt; ++e) s[0] += ld<T, L>(x + static_cast<size_t>(e) * L) * T(0);
  st<T, L>(acc, ld<T, L>(acc) + ((s[0] + s[1]) + (s[2] + s[3])));
}
#else
template <typename T, int L>
void scale_down(T* a, int cnt, T* sc) { bf::scale_down<T, L>(a, cnt, sc); }
template <typename T, int L>
void add_zero_times(const T* x, int cnt, T* acc) {
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < L; ++l) acc[l] += x[static_cast<size_t>(e) * L + l] * T(0);
}
template <typename T, int L>
void mm(int M, int N, int K, const T* A, int sam, int sak, const T* Bm, int sbk, int sbn, T* C,
        int scm, int scn, T alpha, bool acc) {
  pbs::mm_il<T, L>(M, N, K, A, sam, sak, Bm, sbk, sbn, C, scm, scn, alpha, acc);
}
template <typename T, int L, int n>
void house_qr(int m, T* A, T* vd, T* cf, T* beta) { bf::house_qr<T, L, n>(m, A, vd, cf, beta); }
template <typename T, int L, int n, int w, int j>
void apply_cols_bf(int m, const T* __restrict A, const T* __restrict vd, const T* __restrict cf,
                   T* __restrict X) {
  T dot[w * L];
  for (int e = 0; e < w * L; ++e) dot[e] = T(0);
  for (int i = j; i < m; ++i) {
    const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
    const T* row = X + i * w * L;
    for (int c = 0; c < w; ++c)
      for (int l = 0; l < L; ++l) dot[c * L + l] += v[l] * row[c * L + l];
  }
  for (int c = 0; c < w; ++c)
    for (int l = 0; l < L; ++l) dot[c * L + l] *= cf[j * L + l];
  for (int i = j; i < m; ++i) {
    const T* v = i == j ? vd + j * L : A + (i * n + j) * L;
    T* row = X + i * w * L;
    for (int c = 0; c < w; ++c)
      for (int l = 0; l < L; ++l) row[c * L + l] -= dot[c * L + l] * v[l];
  }
  if constexpr (j > 0) apply_cols_bf<T, L, n, w, j - 1>(m, A, vd, cf, X);
}
template <typename T, int L, int n, int w, bool lower>
void apply_q(int m, const T* A, const T* vd, const T* cf, T* X) {
  if constexpr (lower && w == n) bf::apply_q<T, L, n>(m, A, vd, cf, X, true);
  else apply_cols_bf<T, L, n, w, n - 1>(m, A, vd, cf, X);
}
template <typename T, int L, int n>
int jacobi(T* W, T* V, T tol, int max_sweeps) { return bf::jacobi<T, L, n>(W, V, tol, max_sweeps); }
#endif

// bf::exchange_down (one step of the SVDs' descending sort) on lane vectors: selects (as
// lane loops GCC swapped one number at a time)
template <typename T, int L>
void exchange_down(int n, int j, T* __restrict S, T* __restrict W, T* __restrict V) {
#if defined(TTM_RBS_VEC)
  using X = Vec<T, L>;
  const X x = ld<T, L>(S + j * L), y = ld<T, L>(S + (j - 1) * L);
  const auto sw = x > y;
  st<T, L>(S + j * L, sw ? y : x);
  st<T, L>(S + (j - 1) * L, sw ? x : y);
  for (int r = 0; r < n; ++r) {
    T* wj = W + (r * n + j) * L;
    T* vj = V + (r * n + j) * L;
    const X w1 = ld<T, L>(wj), w0 = ld<T, L>(wj - L), v1 = ld<T, L>(vj), v0 = ld<T, L>(vj - L);
    st<T, L>(wj, sw ? w0 : w1);
    st<T, L>(wj - L, sw ? w1 : w0);
    st<T, L>(vj, sw ? v0 : v1);
    st<T, L>(vj - L, sw ? v1 : v0);
  }
#else
  bf::exchange_down<T, L>(n, j, S, W, V);
#endif
}

// The steps for blocks of L points (bf::for_cols instantiates them per column count)
template <int L>
struct At {
  // thin QR of the interleaved W^T (m x a): Q (m x a) into Q, R (a x a) into R
  template <typename T, int a>
  struct Qr {
    static void run(int& m, T*& WT, T*& vd, T*& cf, T*& beta, T*& Q, T*& R) {
      house_qr<T, L, a>(m, WT, vd, cf, beta);
      bf::upper<T, L>(a, WT, beta, R);
      bf::eye<T, L>(m, a, Q);
      apply_q<T, L, a, a, true>(m, WT, vd, cf, Q);
    }
  };
  // pbs::Lq's LQ step (the same results): Q' into Qt, R into R, the signs of diag R into sg
  template <typename T, int a>
  struct Lq {
    static void run(int& m, T*& CT, T*& vd, T*& cf, T*& beta, T*& Qt, T*& R, T*& sg) {
      Qr<T, a>::run(m, CT, vd, cf, beta, Qt, R);
      for (int j = 0; j < a; ++j)
        for (int l = 0; l < L; ++l) sg[j * L + l] = std::copysign(T(1), beta[j * L + l]);
    }
  };
  // Truncated SVD of the interleaved c (m x n, m >= n, n = 2 r'; overwritten): the first
  // n / 2 left singular vectors (m x n/2) into Uo and S Vh (n x n, descending) into SV.
  // c = Q R (house_qr), Jacobi on R^T: R^T V_x = W_x, so c = (Q V_x) W_x^T: U = Q V_x,
  // S Vh = W_x^T (no normalization needed).
  template <typename T, int n>
  struct Svd {
    static void run(int& m, T*& A, T*& vd, T*& cf, T*& beta, T*& W, T*& V, T*& S, T*& Uo,
                    T*& SV) {
      alignas(64) T sc[L];
      rbs::scale_down<T, L>(A, m * n, sc);
      house_qr<T, L, n>(m, A, vd, cf, beta);
      for (int i = 0; i < n; ++i)  // W = R^T
        for (int c = 0; c < n; ++c)
          for (int l = 0; l < L; ++l)
            W[(i * n + c) * L + l] = i < c ? T(0) : (i == c ? beta[i * L + l] : A[(c * n + i) * L + l]);
#if defined(TTM_RBS_VEC)
      using X = Vec<T, L>;
      jacobi<T, L, n>(W, V, std::numeric_limits<T>::epsilon() * n, bf::kMaxSweeps);
      X sv[n];  // squared column norms of W, then descending (compare-exchange, per lane)
      for (int c = 0; c < n; ++c) sv[c] = X{};
      for (int i = 0; i < n; ++i)
        for (int c = 0; c < n; ++c) {
          const X x = ld<T, L>(W + (i * n + c) * L);
          sv[c] += x * x;
        }
      for (int i = 0; i < n - 1; ++i)
        for (int j = n - 1; j > i; --j) {
          const auto sw = sv[j] > sv[j - 1];
          const X x = sv[j], y = sv[j - 1];
          sv[j] = sw ? y : x;
          sv[j - 1] = sw ? x : y;
          for (int r = 0; r < n; ++r) {
            T* wj = W + (r * n + j) * L;
            const X a = ld<T, L>(wj), b = ld<T, L>(wj - L);
            st<T, L>(wj, sw ? b : a);
            st<T, L>(wj - L, sw ? a : b);
            T* vj = V + (r * n + j) * L;
            const X a2 = ld<T, L>(vj), b2 = ld<T, L>(vj - L);
            st<T, L>(vj, sw ? b2 : a2);
            st<T, L>(vj - L, sw ? a2 : b2);
          }
        }
      for (int c = 0; c < n; ++c) st<T, L>(S + c * L, sv[c]);
      const X scv = ld<T, L>(sc);
      for (int j = 0; j < n; ++j)  // SV = W^T, scaled back
        for (int c = 0; c < n; ++c) st<T, L>(SV + (j * n + c) * L, ld<T, L>(W + (c * n + j) * L) * scv);
      constexpr int h = (n + 1) / 2;  // U[:, :h] = Q [V_x[:, :h]; 0]
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < h; ++c) st<T, L>(Uo + (i * h + c) * L, i < n ? ld<T, L>(V + (i * n + c) * L) : X{});
      apply_q<T, L, n, h, false>(m, A, vd, cf, Uo);
#else
      jacobi<T, L, n>(W, V, std::numeric_limits<T>::epsilon() * n, bf::kMaxSweeps);
      for (int e = 0; e < n * L; ++e) S[e] = T(0);
      for (int i = 0; i < n; ++i)
        for (int c = 0; c < n; ++c)
          for (int l = 0; l < L; ++l) { const T w = W[(i * n + c) * L + l]; S[c * L + l] += w * w; }
      // descending order (squared norms): compare-exchange of adjacent columns, per lane
      for (int i = 0; i < n - 1; ++i)
        for (int j = n - 1; j > i; --j) exchange_down<T, L>(n, j, S, W, V);
      for (int j = 0; j < n; ++j)  // SV = W^T, scaled back
        for (int c = 0; c < n; ++c)
          for (int l = 0; l < L; ++l) SV[(j * n + c) * L + l] = W[(c * n + j) * L + l] * sc[l];
      constexpr int h = (n + 1) / 2;  // U[:, :h] = Q [V_x[:, :h]; 0]
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < h; ++c)
          for (int l = 0; l < L; ++l) Uo[(i * h + c) * L + l] = i < n ? V[(i * n + c) * L + l] : T(0);
      apply_q<T, L, n, h, false>(m, A, vd, cf, Uo);
#endif
    }
  };
};

// 8 x 8 transposes of float64 lane vectors (rows r[0..7] become columns) for the copies
// between the interleaved blocks and the points' cores: 8 vector loads, 24 shuffles and 8
// vector stores for 64 numbers (the lane loops moved one number per load and store)
#if defined(TTM_RBS_VEC) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define TTM_RBS_T8 1
inline void transpose8(Vec<double, 8>* r) {
  using V = Vec<double, 8>;
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + h + 2] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif
#endif

// pbs::gather_core (core c's entries of the points b0.. into the interleaved block dst;
// past B the last point again), float64 blocks of 8 by 8 x 8 transposes
template <typename T, int L>
void gather_core(const torch::Tensor& c, int64_t b0, int64_t B, T* __restrict dst) {
#if defined(TTM_RBS_T8)
  if constexpr (std::is_same<T, double>::value && L == 8) {
    using V = Vec<double, 8>;
    const double* base = c.data_ptr<double>();
    const int64_t E = c.numel() / c.size(0), sb = c.size(0) == 1 ? 0 : c.stride(0);
    const double* q[8];
    for (int l = 0; l < 8; ++l) q[l] = base + std::min<int64_t>(b0 + l, B - 1) * sb;
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      V r[8];
      for (int l = 0; l < 8; ++l) r[l] = ld<double, 8>(q[l] + e);
      transpose8(r);
      for (int i = 0; i < 8; ++i) st<double, 8>(dst + (e + i) * 8, r[i]);
    }
    for (; e < E; ++e)
      for (int l = 0; l < 8; ++l) dst[e * 8 + l] = q[l][e];
    return;
  }
#endif
  pbs::gather_core<T, L>(c, b0, B, dst);
}

// The block's core (cnt entries, interleaved) into the rows of its nl points in the packed
// output (dst: the first point's core, rows size apart; each core contiguous). A full
// block's lane loop has a constant count (unrolled stores; bf::scatter loops over a
// runtime count and strides per entry); float64 blocks of 8 by 8 x 8 transposes
template <typename T, int L>
void put_core(const T* __restrict src, int cnt, T* __restrict dst, int64_t size, int nl) {
  T* d[L];
  for (int l = 0; l < L; ++l) d[l] = dst + (l < nl ? l : 0) * size;
  if (nl == L) {
    int e = 0;
#if defined(TTM_RBS_T8)
    if constexpr (std::is_same<T, double>::value && L == 8) {
      for (; e + 8 <= cnt; e += 8) {
        Vec<double, 8> r[8];
        for (int i = 0; i < 8; ++i) r[i] = ld<double, 8>(src + static_cast<size_t>(e + i) * 8);
        transpose8(r);
        for (int l = 0; l < 8; ++l) st<double, 8>(d[l] + e, r[l]);
      }
    }
#endif
    for (; e < cnt; ++e)
      for (int l = 0; l < L; ++l) d[l][e] = src[static_cast<size_t>(e) * L + l];
    return;
  }
  for (int e = 0; e < cnt; ++e)
    for (int l = 0; l < nl; ++l) d[l][e] = src[static_cast<size_t>(e) * L + l];
}

// The per-thread workspace of the retraction sweep: grown to the largest need and kept (no
// allocation and no page faults per call), but freed down to the need once kShrinkAfter
// calls in a row used under a quarter of it: one huge call (a large mode size or rank) does
// not hold its memory forever, and a mix of large and small calls reallocates at most once
// per kShrinkAfter calls. take(n): the call's n numbers, on a 64-byte boundary.
template <typename T>
class Workspace {
 public:
  T* take(size_t n) {
    const size_t want = n + 64 / sizeof(T);
    const bool grow = buf_.size() < want;
    small_ = !grow && want < buf_.size() / 4 ? small_ + 1 : 0;
    if (grow || small_ >= kShrinkAfter) {
      std::vector<T>().swap(buf_);  // freed first: the old and new buffers never coexist
      buf_.resize(want);
      small_ = 0;
    }
    return reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(buf_.data()) + 63) &
                                ~static_cast<std::uintptr_t>(63));
  }

 private:
  static constexpr int kShrinkAfter = 4;
  std::vector<T> buf_;
  int small_ = 0;  // consecutive calls that needed under a quarter of buf_
};

// retract_sweep's factorizations for TT-ranks <= bf::kMaxCols / 2 (SVDs of up to 8
// columns): widths fixed at compile time (bf::for_cols instantiates At's steps per column
// count), rbs::mm's products. (sp: the runtime QR's pair products, unused here.)
template <int L>
struct FixedWidth {
  static constexpr int kMaxCols = bf::kMaxCols;
  // thin QR of the interleaved m x a block A: Q (m x a), R (a x a)
  template <typename T>
  static void qr(int m, int a, T* A, T* vd, T* cf, T* beta, T* sp, T* Q, T* R) {
    bf::for_cols<T, At<L>::template Qr>(a, m, A, vd, cf, beta, Q, R);
  }
  // qr, and the signs of R's diagonal into sg
  template <typename T>
  static void lq(int m, int a, T* A, T* vd, T* cf, T* beta, T* sp, T* Q, T* R, T* sg) {
    bf::for_cols<T, At<L>::template Lq>(a, m, A, vd, cf, beta, Q, R, sg);
  }
  // At::Svd on the m x n block A (n = 2 r'): U[:, :n/2] into Uo, S Vh into SV (row stride n)
  template <typename T>
  static void svd_top(int m, int n, T* A, T* vd, T* cf, T* beta, T* sp, T* W, T* V, T* S,
                      T* Uo, T* SV) {
    bf::for_cols<T, At<L>::template Svd>(n, m, A, vd, cf, beta, W, V, S, Uo, SV);
  }
  template <typename T>
  static void mm(int M, int N, int K, const T* A, int sam, int sak, const T* Bm, int sbk,
                 int sbn, T* C, int scm, int scn, T alpha, bool acc) {
    rbs::mm<T, L>(M, N, K, A, sam, sak, Bm, sbk, sbn, C, scm, scn, alpha, acc);
  }
};

// The batched retraction's sweep over blocks of L points (see retract_batch_small and
// retract_batch_wide): F, the factorizations and products for the ranks (FixedWidth above,
// rbw::RuntimeWidth: qr, lq, svd_top, mm, and kMaxCols, the widest SVD). Vin: the points'
// canonical right cores V_1..V_{d-1} (right_cores' gauge: the LQ sweep skipped, each V_k
// gathered), or empty: computed. Returns whether every output is finite.
template <typename T, int L, class F>
bool retract_sweep(const std::vector<torch::Tensor>& U, const std::vector<torch::Tensor>& D,
                   int64_t B, torch::Tensor& out, const std::vector<torch::Tensor>& Vin) {
  const bool have_v = !Vin.empty();
  constexpr int MC = F::kMaxCols;
  const int d = static_cast<int>(U.size());
  std::vector<int> r(d + 1), n(d);
  for (int k = 0; k < d; ++k) {
    r[k] = static_cast<int>(U[k].size(1)); n[k] = static_cast<int>(U[k].size(2));
  }
  r[d] = 1;
  // V_k (r_k x n_k r_{k+1}) and Q_k (N_k x r_k, N_k the columns of [left | right] at step
  // k) of the block's points, kept for the truncation sweep; the cores and deltas are
  // gathered one at a time (a smaller working set)
  std::vector<size_t> vo(d + 1, 0), qo(d + 1, 0);
  size_t mx = 1;
  for (int k = 0; k < d; ++k) {
    const size_t un = static_cast<size_t>(r[k]) * n[k] * r[k + 1];
    const size_t N = static_cast<size_t>(n[k]) * r[k + 1] * (k + 1 < d ? 2 : 1);
    vo[k + 1] = vo[k] + un * L;
    qo[k + 1] = qo[k] + N * r[k] * L;
    mx = std::max({mx, un, N * r[k], static_cast<size_t>(r[k]) * n[k] * 2 * r[k + 1]});
  }
  static thread_local Workspace<T> ws;
  const size_t small = static_cast<size_t>(MC) * MC * L;
  const size_t need = vo[d] + qo[d] + 14 * mx * L + 6 * small + static_cast<size_t>(d + 6) * MC * L;
  // every buffer on a 64-byte boundary (their sizes are multiples of L numbers, 64 bytes):
  // a lane vector of 8 doubles / 16 floats then never straddles two cache lines (the
  // vector's 16-byte alignment made the kernel ~25 % slower in some processes)
  T* wp = ws.take(need);
  auto take = [&](size_t cnt) { T* q = wp; wp += cnt; return q; };
  T *Vs = take(vo[d]), *Qw = take(qo[d]), *Ua = take(mx * L), *Ub = take(mx * L),
    *Dk = take(mx * L), *CT = take(mx * L), *Qt = take(mx * L), *C2 = take(mx * L),
    *left = take(mx * L), *right = take(mx * L), *nleft = take(mx * L), *nright = take(mx * L),
    *c = take(mx * L), *Uo = take(mx * L), *top = take(mx * L), *W2 = take(mx * L),
    *Rb = take(small), *Rl = take(small), *Cm = take(small), *Wj = take(small),
    *Vj = take(small), *SV = take(small), *S = take(MC * L), *vd = take(MC * L),
    *cf = take(MC * L), *beta = take(MC * L), *sg = take(static_cast<size_t>(d + 1) * MC * L),
    *sp = take(MC * L);
  std::vector<int64_t> offk(d + 1, 0);  // core k's entries in a packed row of out
  for (int k = 0; k < d; ++k) offk[k + 1] = offk[k] + static_cast<int64_t>(r[k]) * n[k] * r[k + 1];
  const int64_t size = offk[d];
  T* const outp = out.data_ptr<T>();
  bool finite_all = true;
  T sc[L];
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    const int nl = static_cast<int>(std::min<int64_t>(L, B - b0));
    alignas(64) T acc[L];  // sum of 0 * output per lane: NaN once an output is NaN or infinite
    for (int l = 0; l < L; ++l) acc[l] = T(0);
    T* uk = Ua;  // U_k of the step (gathered), U_{k-1} into un
    T* un = Ub;
    rbs::gather_core<T, L>(U[d - 1], b0, B, uk);
    rbs::gather_core<T, L>(D[d - 1], b0, B, Dk);
    const int last = r[d - 1] * n[d - 1];
    // the LQ sweep starts from U_{d-1} (scaled: its Q factors do not change); the
    // structured sweep from left = U_{d-1} + du_{d-1}, no right part
    if (!have_v) {
      std::copy(uk, uk + static_cast<size_t>(last) * L, C2);
      rbs::scale_down<T, L>(C2, last, sc);
    }
    for (int e = 0; e < last * L; ++e) left[e] = uk[e] + Dk[e];
    T* sgn = sg;
    for (int l = 0; l < L; ++l) sgn[static_cast<size_t>(d) * MC * L + l] = T(1);
    int nbr = 0;
    for (int k = d - 1; k >= 1; --k) {
      const int a = r[k], nb = n[k] * r[k + 1], b = r[k + 1];
      const int rows = r[k - 1] * n[k - 1];
      rbs::gather_core<T, L>(U[k - 1], b0, B, un);
      rbs::gather_core<T, L>(D[k - 1], b0, B, Dk);
      if (have_v) {
        rbs::gather_core<T, L>(Vin[k - 1], b0, B, Vs + vo[k]);
      } else {  // LQ step (project_small_impl's): V_k = S_k V'_k (I (x) S_{k+1}), c_{k-1} = U_{k-1} R^T
        for (int i = 0; i < a; ++i)
          for (int j = 0; j < nb; ++j)
            pbs::copy_lanes<T, L>(CT + (static_cast<size_t>(j) * a + i) * L,
                                  C2 + (static_cast<size_t>(i) * nb + j) * L);
        T* ps = sgn + static_cast<size_t>(k) * MC * L;
        F::lq(nb, a, CT, vd, cf, beta, sp, Qt, Rl, ps);
        const T* s1 = sgn + static_cast<size_t>(k + 1) * MC * L;
        T* V = Vs + vo[k];
        for (int al = 0; al < a; ++al)
          for (int i = 0; i < n[k]; ++i)
            for (int be = 0; be < b; ++be) {
              const size_t row = static_cast<size_t>(i) * b + be;
              pbs::mul3<T, L>(V + (static_cast<size_t>(al) * nb + row) * L, ps + al * L,
                              Qt + (row * a + al) * L, s1 + (k + 1 < d ? be * L : 0));
            }
        F::mm(rows, a, a, un, a, 1, Rl, 1, a, C2, a, 1, T(1), false);
      }
      const T* V = Vs + vo[k];
      // structured step: C = left V^T (a x a); left -= C V; QR of [left | right]^T
      F::mm(a, a, nb, left, nb, 1, V, 1, nb, Cm, a, 1, T(1), false);
      F::mm(a, nb, a, Cm, a, 1, V, nb, 1, left, nb, 1, T(-1), true);
      const int N = nb + nbr;
      for (int al = 0; al < a; ++al) {
        for (int j = 0; j < nb; ++j)
          pbs::copy_lanes<T, L>(CT + (static_cast<size_t>(j) * a + al) * L,
                                left + (static_cast<size_t>(al) * nb + j) * L);
        for (int j = 0; j < nbr; ++j)
          pbs::copy_lanes<T, L>(CT + (static_cast<size_t>(nb + j) * a + al) * L,
                                right + (static_cast<size_t>(al) * nbr + j) * L);
      }
      // scaled to a largest entry in [1, 2) (exact): a huge point or step (a float32 entry
      // above ~1e19) would overflow the reflectors' squared norms; R scaled back
      T scq[L];
      rbs::scale_down<T, L>(CT, N * a, scq);
      F::qr(N, a, CT, vd, cf, beta, sp, Qw + qo[k], Rb);
      for (int e = 0; e < a * a; ++e)
        for (int l = 0; l < L; ++l) Rb[static_cast<size_t>(e) * L + l] *= scq[l];
      // core k-1: left = du_{k-1} + U_{k-1} C, right = U_{k-1} R^T ((r_{k-1} n) x a each)
      std::copy(Dk, Dk + static_cast<size_t>(rows) * a * L, nleft);
      F::mm(rows, a, a, un, a, 1, Cm, a, 1, nleft, a, 1, T(1), true);
      F::mm(rows, a, a, un, a, 1, Rb, 1, a, nright, a, 1, T(1), false);
      std::swap(left, nleft);
      std::swap(right, nright);
      std::swap(uk, un);
      nbr = n[k - 1] * a;
    }
    // first core: c = [left | right] (n_0 x 2 r_1)
    int m = n[0], K = 2 * r[1];
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < r[1]; ++j) {
        pbs::copy_lanes<T, L>(c + (static_cast<size_t>(i) * K + j) * L,
                              left + (static_cast<size_t>(i) * r[1] + j) * L);
        pbs::copy_lanes<T, L>(c + (static_cast<size_t>(i) * K + r[1] + j) * L,
                              right + (static_cast<size_t>(i) * r[1] + j) * L);
      }
    for (int k = 0; k + 1 < d; ++k) {
      const int rk = r[k + 1];
      F::svd_top(m, K, c, vd, cf, beta, sp, Wj, Vj, S, Uo, SV);  // (K = 2 rk)
      add_zero_times<T, L>(Uo, m * rk, acc);  // core k = U[:, :rk]
      put_core<T, L>(Uo, m * rk, outp + b0 * size + offk[k], size, nl);
      // top (rk x nb) = SV[:, a:] Q_V^T + SV[:, :a] V_{k+1}; Q = [Q_V; Q_W] (N x ap)
      const int a = rk, nk = n[k + 1], b = r[k + 2], nb = nk * b, ap = K - a;
      const T* q = Qw + qo[k + 1];
      F::mm(rk, nb, ap, SV + static_cast<size_t>(a) * L, K, 1, q, 1, ap, top, nb, 1, T(1), false);
      F::mm(rk, nb, a, SV, K, 1, Vs + vo[k + 1], nb, 1, top, nb, 1, T(1), true);
      if (k + 2 == d) {  // the last core (rk x n x 1)
        add_zero_times<T, L>(top, rk * nb, acc);
        put_core<T, L>(top, rk * nb, outp + b0 * size + offk[k + 1], size, nl);
        break;
      }
      // W2 (rk x n_{k+1} r_{k+2}) = SV[:, a:] Q_W^T (Q_W: the right part's columns)
      F::mm(rk, nb, ap, SV + static_cast<size_t>(a) * L, K, 1,
            q + static_cast<size_t>(nb) * ap * L, 1, ap, W2, nb, 1, T(1), false);
      const int K2 = 2 * b;  // next c: rows (al, i), columns [top (b) | W2 (b)]
      for (int al = 0; al < rk; ++al)
        for (int i = 0; i < nk; ++i) {
          const size_t row = static_cast<size_t>(al) * nk + i;
          const size_t src = (static_cast<size_t>(al) * nb + static_cast<size_t>(i) * b) * L;
          std::copy(top + src, top + src + static_cast<size_t>(b) * L, c + row * K2 * L);
          std::copy(W2 + src, W2 + src + static_cast<size_t>(b) * L, c + (row * K2 + b) * L);
        }
      m = rk * nk;
      K = K2;
    }
    for (int l = 0; l < nl; ++l) finite_all = finite_all && acc[l] == T(0);
  }
  return finite_all;
}

}  // namespace rbs

// The right cores V_1..V_{d-1} given to a batched retraction: none, or one per core k >= 1
// of U's shape (1 or B points)
void check_right_cores(std::vector<torch::Tensor>& V, const std::vector<torch::Tensor>& U,
                       torch::ScalarType t, int64_t B) {
  TORCH_CHECK(V.empty() || V.size() + 1 == U.size(),
              "V: the d - 1 right cores V_1..V_{d-1} of the points, or none");
  batch_cores(V, "V", t, B);
  for (size_t k = 1; k < U.size() && !V.empty(); ++k)
    TORCH_CHECK(V[k - 1].sizes().slice(1) == U[k].sizes().slice(1), "V: core ", k,
                " differs in shape from U's");
}

// retract_point for B points and/or B steps with TT-ranks <= 4, SIMD across the points:
// U, du cores (1 or B, r, n, r'), every unfolding r n >= 2 r' (n_0 >= 2 r_1); V: the
// points' canonical right cores V_1..V_{d-1} (right_cores_batch_small's: the same result),
// or empty: computed; (B, size of U's point), left-orthogonal cores
torch::Tensor retract_batch_small(std::vector<torch::Tensor> U, std::vector<torch::Tensor> du,
                                  int64_t B, std::vector<torch::Tensor> V) {
  TORCH_CHECK(U.size() >= 2 && U.size() == du.size(), "retract_batch_small: inconsistent lengths");
  const auto t = U[0].scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kDouble, "U: float32 or float64 only");
  batch_cores(U, "U", t, B);
  batch_cores(du, "du", t, B);
  check_right_cores(V, U, t, B);
  const size_t d = U.size();
  int64_t size = 0;
  for (size_t k = 0; k < d; ++k) {
    TORCH_CHECK(du[k].sizes().slice(1) == U[k].sizes().slice(1), "du: core ", k,
                " differs in shape from U's");
    TORCH_CHECK(U[k].size(1) <= bf::kMaxCols / 2 && U[k].size(3) <= bf::kMaxCols / 2,
                "retract_batch_small: TT-ranks above ", bf::kMaxCols / 2);
    TORCH_CHECK(k == 0 || U[k].size(2) * U[k].size(3) >= U[k].size(1),
                "U: core ", k, " has fewer columns n r' than rows r (no LQ)");
    TORCH_CHECK(k + 1 == d || U[k].size(1) * U[k].size(2) >= 2 * U[k].size(3),
                "U: core ", k, " has fewer rows r n than 2 r' (the rank-2r unfolding is wide)");
    TORCH_CHECK(k + 1 == d || U[k].size(3) == U[k + 1].size(1), "U: ranks of consecutive cores differ");
    size += U[k].size(1) * U[k].size(2) * U[k].size(3);
  }
  TORCH_CHECK(U[0].size(1) == 1 && U[d - 1].size(3) == 1, "U: boundary ranks must be 1");
  auto out = empty_for_output({B, size}, U[0].options());
  if (B == 0) return out;
  // blocks of 8 doubles / 16 floats (64 bytes: one AVX-512 register): an 80 x 8 unfolding
  // of a block (40 KB) stays in the L1 cache; with the lane-vector steps of rbs this is
  // faster than bf's 128-byte blocks (QR + Q of 80 x 8: 0.52 vs 0.64 us a matrix, float64)
  const bool ok = t == torch::kDouble
                      ? rbs::retract_sweep<double, 8, rbs::FixedWidth<8>>(U, du, B, out, V)
                      : rbs::retract_sweep<float, 16, rbs::FixedWidth<16>>(U, du, B, out, V);
  TORCH_CHECK(ok, "retr: X + u is not finite (X or u contains NaN or Inf)");
  return out;
}


// ---------------------------------------------------------------------------------------
// The batched retraction for TT-ranks up to 12 (SVDs of up to 24 columns): rbs's sweep
// (rbs::retract_sweep: the LQ sweep, the structured right-to-left orthogonalization, the
// truncated SVDs by Householder QR and one-sided Jacobi of R^T) in the interleaved layout
// of bf, with the factorizations of runtime width below (RuntimeWidth) (bf's are instantiated per column count and
// column, too many functions at 24 columns). A reflector's products run over blocks of up
// to kChunk columns whose accumulators are lane vectors (rbs's Vec: registers). Blocks of
// 8 doubles / 16 floats (64 bytes; with the lane-vector code 16 doubles were ~1.2x slower
// at r = 10, 32 floats ~1.3x: twice the working set, a 200 x 20 unfolding in 8 float64
// lanes is already 256 KB).
namespace rbw {

constexpr int kMaxRank = 12;
constexpr int kMaxCols = 2 * kMaxRank;
constexpr int kChunk = 8;

// Lv: L lanes as one value (rbs's GCC/clang vector-extension type: the loops below become
// vector code with their accumulators in registers; as lane arrays GCC kept the dot
// products in memory). Other compilers: an array with the few operators used here.
#if defined(TTM_RBS_VEC)
template <typename T, int L>
using Lv = rbs::Vec<T, L>;
using rbs::ld;
using rbs::st;
#else
template <typename T, int L>
struct Lv {
  T x[L];
  Lv() : x{} {}
  Lv operator+(const Lv& o) const { Lv r; for (int l = 0; l < L; ++l) r.x[l] = x[l] + o.x[l]; return r; }
  Lv operator-(const Lv& o) const { Lv r; for (int l = 0; l < L; ++l) r.x[l] = x[l] - o.x[l]; return r; }
  Lv operator*(const Lv& o) const { Lv r; for (int l = 0; l < L; ++l) r.x[l] = x[l] * o.x[l]; return r; }
  Lv& operator+=(const Lv& o) { return *this = *this + o; }
  Lv& operator-=(const Lv& o) { return *this = *this - o; }
  Lv& operator*=(const Lv& o) { return *this = *this * o; }
};
template <typename T, int L>
inline Lv<T, L> ld(const T* p) { Lv<T, L> r; std::copy(p, p + L, r.x); return r; }
template <typename T, int L>
inline void st(T* p, const Lv<T, L>& v) { std::copy(v.x, v.x + L, p); }
#endif

// X[i, c] -= cf (sum_{i' >= j} v_i' X[i', c]) v_i for c < CW, rows i >= j; v_i the
// reflector j of a house_qr factor A (row stride lda): its head vdj at i == j, A[i, j]
// below. X: row stride ldx (may be A's later columns: v is read into a local first).
template <typename T, int L, int CW>
void reflect_chunk(int m, int j, const T* A, int lda, const T* vdj, const T* cfj, T* X,
                   int ldx) {
  using V = Lv<T, L>;
  V dot[CW];
  for (int c = 0; c < CW; ++c) dot[c] = V{};
  for (int i = j; i < m; ++i) {
    const V v = ld<T, L>(i == j ? vdj : A + (static_cast<size_t>(i) * lda + j) * L);
    const T* row = X + static_cast<size_t>(i) * ldx * L;
    for (int c = 0; c < CW; ++c) dot[c] += v * ld<T, L>(row + c * L);
  }
  const V cj = ld<T, L>(cfj);
  for (int c = 0; c < CW; ++c) dot[c] *= cj;
  for (int i = j; i < m; ++i) {
    const V v = ld<T, L>(i == j ? vdj : A + (static_cast<size_t>(i) * lda + j) * L);
    T* row = X + static_cast<size_t>(i) * ldx * L;
    for (int c = 0; c < CW; ++c) st<T, L>(row + c * L, ld<T, L>(row + c * L) - dot[c] * v);
  }
}

// reflect_chunk over w columns of X (starting at X), in blocks of kChunk
template <typename T, int L>
void reflect(int m, int j, const T* A, int lda, const T* vdj, const T* cfj, T* X, int ldx,
             int w) {
  int c = 0;
  for (; c + kChunk <= w; c += kChunk)
    reflect_chunk<T, L, kChunk>(m, j, A, lda, vdj, cfj, X + c * L, ldx);
  T* x = X + c * L;
  switch (w - c) {
    case 1: reflect_chunk<T, L, 1>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 2: reflect_chunk<T, L, 2>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 3: reflect_chunk<T, L, 3>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 4: reflect_chunk<T, L, 4>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 5: reflect_chunk<T, L, 5>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 6: reflect_chunk<T, L, 6>(m, j, A, lda, vdj, cfj, x, ldx); break;
    case 7: reflect_chunk<T, L, 7>(m, j, A, lda, vdj, cfj, x, ldx); break;
    default: break;
  }
}

// Two reflectors at once (half the passes over X): X := H_B H_A X for the pair (j, j + 1) of
// a house_qr factor A (row stride lda; heads vd, factors cf at j and j + 1), A = j and
// B = j + 1 when low_first (the QR's order), else A = j + 1, B = j (apply_q's order).
// With d = v^T X and s = v_j^T v_{j+1}: e_A = cf_A d_A, e_B = cf_B (d_B - s e_A),
// X -= v_A e_A^T + v_B e_B^T. Rows from j (where v_{j+1} is zero); CW columns of X.
template <typename T, int L, int CW, bool NRM = false>
void reflect2_chunk(int m, int j, const T* A, int lda, const T* vd, const T* cf, const T* s,
                    bool low_first, T* X, int ldx, T* nrm = nullptr) {
  using V = Lv<T, L>;
  V d0[CW], d1[CW];
  const V h0 = ld<T, L>(vd + j * L);
  {  // row j: v_j's head, v_{j+1} = 0
    const T* row = X + static_cast<size_t>(j) * ldx * L;
    for (int c = 0; c < CW; ++c) { d0[c] = h0 * ld<T, L>(row + c * L); d1[c] = V{}; }
  }
  for (int i = j + 1; i < m; ++i) {
    const T* a0 = A + (static_cast<size_t>(i) * lda + j) * L;
    const V v0 = ld<T, L>(a0), v1 = ld<T, L>(i == j + 1 ? vd + (j + 1) * L : a0 + L);
    const T* row = X + static_cast<size_t>(i) * ldx * L;
    for (int c = 0; c < CW; ++c) {
      const V x = ld<T, L>(row + c * L);
      d0[c] += v0 * x;
      d1[c] += v1 * x;
    }
  }
  const V c0 = ld<T, L>(cf + j * L), c1 = ld<T, L>(cf + (j + 1) * L), sv = ld<T, L>(s);
  for (int c = 0; c < CW; ++c) {
    if (low_first) {
      d0[c] *= c0;
      d1[c] = c1 * (d1[c] - sv * d0[c]);
    } else {
      d1[c] *= c1;
      d0[c] = c0 * (d0[c] - sv * d1[c]);
    }
  }
  {
    T* row = X + static_cast<size_t>(j) * ldx * L;
    for (int c = 0; c < CW; ++c) st<T, L>(row + c * L, ld<T, L>(row + c * L) - h0 * d0[c]);
  }
  V n2{};
  for (int i = j + 1; i < m; ++i) {
    const T* a0 = A + (static_cast<size_t>(i) * lda + j) * L;
    const V v0 = ld<T, L>(a0), v1 = ld<T, L>(i == j + 1 ? vd + (j + 1) * L : a0 + L);
    T* row = X + static_cast<size_t>(i) * ldx * L;
    for (int c = 0; c < CW; ++c)
      st<T, L>(row + c * L, ld<T, L>(row + c * L) - (v0 * d0[c] + v1 * d1[c]));
    if constexpr (NRM) {  // X's column 0 is A's j + 2: its squared norm from row j + 2 on
      const V x0 = ld<T, L>(row);
      if (i > j + 1) n2 += x0 * x0;
    }
  }
  if constexpr (NRM) st<T, L>(nrm, n2);
}

// columns per block of reflect2_chunk: 2 CW L numbers of accumulators, 24 AVX-512 registers
// (fewer blocks per pass: the two reflectors are loaded once per block and row)
template <typename T, int L>
constexpr int chunk2() { return 768 / (L * static_cast<int>(sizeof(T))) > 1 ? 768 / (L * static_cast<int>(sizeof(T))) : 1; }

template <typename T, int L, int C, bool NRM>
void reflect2_rest(int w, int m, int j, const T* A, int lda, const T* vd, const T* cf,
                   const T* s, bool low_first, T* X, int ldx, T* nrm) {
  if constexpr (C >= 1) {
    if (w == C)
      return reflect2_chunk<T, L, C, NRM>(m, j, A, lda, vd, cf, s, low_first, X, ldx, nrm);
    reflect2_rest<T, L, C - 1, NRM>(w, m, j, A, lda, vd, cf, s, low_first, X, ldx, nrm);
  }
}

// reflect2_chunk over w columns of X (starting at X); s[l] = v_j^T v_{j+1} given (sv) or
// computed here; nrm: when given, the squared norm of X's column 0 from row j + 2 on after
// the update (the QR's next reflector, accumulated in the first block's pass)
template <typename T, int L>
void reflect2(int m, int j, const T* A, int lda, const T* vd, const T* cf, bool low_first,
              T* X, int ldx, int w, const T* sv = nullptr, T* nrm = nullptr) {
  alignas(64) T s[L];
  if (sv) {
    std::copy(sv, sv + L, s);
  } else {
    for (int l = 0; l < L; ++l) s[l] = A[(static_cast<size_t>(j + 1) * lda + j) * L + l] * vd[(j + 1) * L + l];
    for (int i = j + 2; i < m; ++i)
      for (int l = 0; l < L; ++l)
        s[l] += A[(static_cast<size_t>(i) * lda + j) * L + l] * A[(static_cast<size_t>(i) * lda + j + 1) * L + l];
  }
  constexpr int CW = chunk2<T, L>();
  int c = 0;
  if (nrm && w > 0) {  // the first block also accumulates the norm
    if (w >= CW) reflect2_chunk<T, L, CW, true>(m, j, A, lda, vd, cf, s, low_first, X, ldx, nrm);
    else reflect2_rest<T, L, CW - 1, true>(w, m, j, A, lda, vd, cf, s, low_first, X, ldx, nrm);
    c = std::min(w, CW);
  }
  for (; c + CW <= w; c += CW)
    reflect2_chunk<T, L, CW>(m, j, A, lda, vd, cf, s, low_first, X + c * L, ldx);
  if (c < w)
    reflect2_rest<T, L, CW - 1, false>(w - c, m, j, A, lda, vd, cf, s, low_first, X + c * L, ldx, nullptr);
}

template <typename T, int L>
void set_reflector(int n, int j, const T* A, T* nrm2, T* vd, T* cf, T* beta);

// the reflector j of house_qr from column j (rows >= j): beta, cf, vd
template <typename T, int L>
void make_reflector(int m, int n, int j, const T* A, T* vd, T* cf, T* beta) {
  Lv<T, L> s2{};
  for (int i = j; i < m; ++i) {
    const Lv<T, L> a = ld<T, L>(A + (static_cast<size_t>(i) * n + j) * L);
    s2 += a * a;
  }
  alignas(64) T nrm2[L];
  st<T, L>(nrm2, s2);
  set_reflector<T, L>(n, j, A, nrm2, vd, cf, beta);
}

// the reflector j of house_qr from nrm2, the squared norm of column j's rows >= j (its norm
// on return): beta, cf, vd
template <typename T, int L>
void set_reflector(int n, int j, const T* A, T* nrm2, T* vd, T* cf, T* beta) {
  bf::sqrt_lanes<T, L>(nrm2);  // now the column's norm
  for (int l = 0; l < L; ++l) {
    const T alpha = A[(static_cast<size_t>(j) * n + j) * L + l];
    const T nr = nrm2[l];
    const T b = alpha >= T(0) ? -nr : nr;
    beta[j * L + l] = b;
    const T vtv = T(2) * nr * (nr + std::abs(alpha));
    cf[j * L + l] = vtv > T(0) ? T(2) / vtv : T(0);
    vd[j * L + l] = alpha - b;
  }
}

// H_j on column j + 1 of the house_qr factor A (m x n) alone, the reflector j + 1 from the
// squared norm accumulated in its update pass, and s = v_j^T v_{j+1} (reflect2's) from the
// same pass: two passes over the column instead of four
template <typename T, int L>
void reflect_next(int m, int n, int j, T* A, T* vd, T* cf, T* beta, T* s) {
  using V = Lv<T, L>;
  const V hj = ld<T, L>(vd + j * L);
  T* aj = A + (static_cast<size_t>(j) * n + j + 1) * L;
  V dot = hj * ld<T, L>(aj);
  for (int i = j + 1; i < m; ++i)
    dot += ld<T, L>(A + (static_cast<size_t>(i) * n + j) * L) * ld<T, L>(A + (static_cast<size_t>(i) * n + j + 1) * L);
  dot *= ld<T, L>(cf + j * L);
  st<T, L>(aj, ld<T, L>(aj) - dot * hj);
  V n2{}, st2{};
  for (int i = j + 1; i < m; ++i) {
    const V v = ld<T, L>(A + (static_cast<size_t>(i) * n + j) * L);
    T* a = A + (static_cast<size_t>(i) * n + j + 1) * L;
    const V x = ld<T, L>(a) - dot * v;
    st<T, L>(a, x);
    n2 += x * x;
    if (i > j + 1) st2 += v * x;
  }
  alignas(64) T nrm2[L];
  st<T, L>(nrm2, n2);
  set_reflector<T, L>(n, j + 1, A, nrm2, vd, cf, beta);
  st<T, L>(s, ld<T, L>(A + (static_cast<size_t>(j + 1) * n + j) * L) * ld<T, L>(vd + (j + 1) * L) + st2);
}

// Householder QR of the interleaved m x n block A (m >= n), bf::house_qr with a runtime n:
// R above the diagonal (its diagonal in beta), the reflectors' tails below, heads in vd,
// 2 / v^T v in cf (LAPACK's sign convention). Reflectors in pairs: H_j updates column
// j + 1 alone, then H_{j+1} H_j the rest in one pass (reflect2); each column's norm is
// accumulated in the pass that last updates it (no pass of its own). sp: v_j^T v_{j+1} of
// the pairs (j even), for apply_q.
template <typename T, int L>
void house_qr(int m, int n, T* A, T* vd, T* cf, T* beta, T* sp) {
  make_reflector<T, L>(m, n, 0, A, vd, cf, beta);
  for (int j = 0; j + 1 < n; j += 2) {  // reflector j made
    T* s = sp + (j / 2) * L;  // kept for apply_q
    reflect_next<T, L>(m, n, j, A, vd, cf, beta, s);
    if (j + 2 < n) {
      alignas(64) T n2[L];
      reflect2<T, L>(m, j, A, n, vd, cf, true, A + (j + 2) * L, n, n - j - 2, s, n2);
      set_reflector<T, L>(n, j + 2, A, n2, vd, cf, beta);
    }
  }
}

// X (m x w, row stride ldx) := H_0 ... H_{n-1} X for house_qr's reflectors (A m x n), in
// pairs H_{j-1} H_j; lower: X starts as [I; 0] (rows >= j of its columns < j stay zero:
// skipped)
template <typename T, int L>
void apply_q(int m, int n, const T* A, const T* vd, const T* cf, const T* sp, T* X, int ldx, int w,
             bool lower) {
  int j = n - 1;
  if (n & 1) {  // the last reflector alone
    const int c0 = lower ? std::min(j, w) : 0;
    if (c0 < w) reflect<T, L>(m, j, A, n, vd + j * L, cf + j * L, X + c0 * L, ldx, w - c0);
    --j;
  }
  for (; j >= 1; j -= 2) {
    const int c0 = lower ? std::min(j - 1, w) : 0;
    if (c0 < w)
      reflect2<T, L>(m, j - 1, A, n, vd, cf, false, X + c0 * L, ldx, w - c0, sp + ((j - 1) / 2) * L);
  }
}

// thin QR of the interleaved m x a block CT: Q (m x a) into Q, R (a x a) into R
template <typename T, int L>
void qr(int m, int a, T* CT, T* vd, T* cf, T* beta, T* sp, T* Q, T* R) {
  house_qr<T, L>(m, a, CT, vd, cf, beta, sp);
  bf::upper<T, L>(a, CT, beta, R);
  bf::eye<T, L>(m, a, Q);
  apply_q<T, L>(m, a, CT, vd, cf, sp, Q, a, a, true);
}

// bf::jacobi with a runtime n <= kMaxCols: one-sided Jacobi on the columns of the
// interleaved n x n block W, rotations accumulated in V (from I), round-robin order
template <typename T, int L>
int jacobi(int n, T* __restrict W, T* __restrict V, T tol, int max_sweeps) {
  bf::eye<T, L>(n, n, V);
  const int N = n + (n & 1), K = N / 2;
  int P[kMaxCols][kMaxCols / 2], Qc[kMaxCols][kMaxCols / 2];
  bf::round_robin<kMaxCols / 2>(N, P, Qc);
  const size_t rs = static_cast<size_t>(n) * L;  // row stride
  const T tol2 = tol * tol;
  alignas(64) T nrm[kMaxCols * L];
  int sweep = 0;
  while (sweep < max_sweeps && n > 1) {
    ++sweep;
    for (int c = 0; c < n; ++c) {
      Lv<T, L> s2{};
      for (int i = 0; i < n; ++i) { const Lv<T, L> x = ld<T, L>(W + i * rs + c * L); s2 += x * x; }
      st<T, L>(nrm + c * L, s2);
    }
    // pairs of two columns both below eps |W|_F are noise: not rotated (as bf::jacobi)
    alignas(64) T floor[L], off[L];
    for (int l = 0; l < L; ++l) floor[l] = off[l] = T(0);
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l) floor[l] += nrm[c * L + l];
    for (int l = 0; l < L; ++l) floor[l] *= std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
    for (int r = 0; r < N - 1; ++r) {
      // the round's K disjoint pairs: every dot product first (independent chains; four
      // partial sums each), then the rotations' parameters, then the rotations
      alignas(64) T cs[kMaxCols / 2 * L], sn[kMaxCols / 2 * L];
      bool live[kMaxCols / 2];
      for (int k = 0; k < K; ++k) {
        const int p = P[r][k], q = Qc[r][k];
        live[k] = false;
        if (q >= n) continue;
        using LV = Lv<T, L>;
        LV g[4] = {};
        const T* wp = W + p * L;
        const T* wq = W + q * L;
        int i = 0;
        for (; i + 4 <= n; i += 4)
          for (int u = 0; u < 4; ++u) g[u] += ld<T, L>(wp + (i + u) * rs) * ld<T, L>(wq + (i + u) * rs);
        for (; i < n; ++i) g[0] += ld<T, L>(wp + i * rs) * ld<T, L>(wq + i * rs);
#if defined(TTM_RBS_VEC)
        // the rotation on lane vectors (as lane loops GCC left the divisions and the
        // compares scalar: a third of the sweeps' time); t = 0 where the pair is converged
        // (or NaN); zeta's sign by a compare (copysign's -0 case: the other 45-degree turn)
        const LV gk = (g[0] + g[1]) + (g[2] + g[3]);
        LV na = ld<T, L>(nrm + p * L), nb = ld<T, L>(nrm + q * L);
        const LV ab2 = na * nb, fl = ld<T, L>(floor), one = LV{} + T(1), zero = LV{};
        const auto rot = (gk * gk > tol2 * ab2) & (ab2 > fl * fl);  // false for NaN
        int any = 0;
        for (int l = 0; l < L; ++l) any |= rot[l] != 0;
        if (!any) continue;  // converged in every lane: no rotation work
        live[k] = true;
        const LV zeta = (nb - na) / (T(2) * gk);
        const LV root = rbs::vsqrt<T, L>(one + zeta * zeta);
        const LV t0 = (zeta >= zero ? one : -one) / ((zeta >= zero ? zeta : -zeta) + root);
        const LV t = rot ? t0 : zero;
        const LV c = one / rbs::vsqrt<T, L>(one + t * t);
        st<T, L>(cs + k * L, c);
        st<T, L>(sn + k * L, c * t);
        na -= t * gk;
        nb += t * gk;
        st<T, L>(nrm + p * L, na);
        st<T, L>(nrm + q * L, nb);
        st<T, L>(off, rot ? one : ld<T, L>(off));
#else
        alignas(64) T gs[L];
        st<T, L>(gs, (g[0] + g[1]) + (g[2] + g[3]));
        // the rotation per lane, in local arrays (no aliasing between the norms of p and q:
        // the lane loops vectorize); t = 0 where the pair is converged (or NaN)
        T na[L], nb[L], gk[L], t[L], rf[L];
        for (int l = 0; l < L; ++l) {
          na[l] = nrm[p * L + l]; nb[l] = nrm[q * L + l];
          gk[l] = gs[l];
        }
        int any = 0;
        T zeta[L], root[L];
        for (int l = 0; l < L; ++l) {
          const T ab2 = na[l] * nb[l], gg = gk[l];
          const bool rot = gg * gg > tol2 * ab2 && ab2 > floor[l] * floor[l];  // false for NaN
          rf[l] = rot ? T(1) : T(0);
          any |= rot ? 1 : 0;
          zeta[l] = (nb[l] - na[l]) / (T(2) * gg);
          root[l] = T(1) + zeta[l] * zeta[l];
        }
        if (!any) continue;  // converged in every lane: no rotation work
        live[k] = true;
        bf::sqrt_lanes<T, L>(root);
        for (int l = 0; l < L; ++l) {
          const T t0 = std::copysign(T(1), zeta[l]) / (std::abs(zeta[l]) + root[l]);
          t[l] = rf[l] != T(0) ? t0 : T(0);
          root[l] = T(1) + t[l] * t[l];
        }
        bf::sqrt_lanes<T, L>(root);
        for (int l = 0; l < L; ++l) {
          const T c = T(1) / root[l];
          cs[k * L + l] = c;
          sn[k * L + l] = c * t[l];
          na[l] -= t[l] * gk[l];
          nb[l] += t[l] * gk[l];
          off[l] = off[l] > rf[l] ? off[l] : rf[l];
        }
        for (int l = 0; l < L; ++l) { nrm[p * L + l] = na[l]; nrm[q * L + l] = nb[l]; }
#endif
      }
      for (int k = 0; k < K; ++k) {
        if (!live[k]) continue;
        const int p = P[r][k], q = Qc[r][k];
        using LV = Lv<T, L>;
        const LV c = ld<T, L>(cs + k * L), sg = ld<T, L>(sn + k * L);
        for (int i = 0; i < n; ++i) {
          T* wr = W + i * rs;
          T* vr = V + i * rs;
          const LV wp = ld<T, L>(wr + p * L), wq = ld<T, L>(wr + q * L);
          st<T, L>(wr + p * L, c * wp - sg * wq);
          st<T, L>(wr + q * L, sg * wp + c * wq);
          const LV vp = ld<T, L>(vr + p * L), vq = ld<T, L>(vr + q * L);
          st<T, L>(vr + p * L, c * vp - sg * vq);
          st<T, L>(vr + q * L, sg * vp + c * vq);
        }
      }
    }
    bool done = true;
    for (int l = 0; l < L; ++l) done = done && off[l] == T(0);
    if (done) break;
  }
  return sweep;
}

// Truncated SVD of the interleaved A (m x n, m >= n = 2 h; overwritten), rbs::Svd with a
// runtime n: the h leading left singular vectors (m x h) into Uo and the first h rows of
// S Vh (row stride n) into SV. A = Q R, Jacobi on R^T: R^T V_x = W_x, A = (Q V_x) W_x^T.
template <typename T, int L>
void svd_top(int m, int n, T* A, T* vd, T* cf, T* beta, T* sp, T* W, T* V, T* S, T* Uo, T* SV) {
  T sc[L];
  rbs::scale_down<T, L>(A, m * n, sc);
  house_qr<T, L>(m, n, A, vd, cf, beta, sp);
  for (int i = 0; i < n; ++i)  // W = R^T (whole lane vectors: no per-lane branch)
    for (int c = 0; c < n; ++c) {
      T* wc = W + (i * n + c) * L;
      if (i < c) st<T, L>(wc, Lv<T, L>{});
      else st<T, L>(wc, ld<T, L>(i == c ? beta + i * L : A + (static_cast<size_t>(c) * n + i) * L));
    }
  jacobi<T, L>(n, W, V, std::numeric_limits<T>::epsilon() * n, bf::kMaxSweeps);
  for (int c = 0; c < n; ++c) {
    Lv<T, L> s2{};
    for (int i = 0; i < n; ++i) { const Lv<T, L> x = ld<T, L>(W + (i * n + c) * L); s2 += x * x; }
    st<T, L>(S + c * L, s2);
  }
  const int h = n / 2;
  // the h largest (squared) norms to the front, descending: passes of compare-exchanges
  // of adjacent columns from the back, per lane (the order of the rest does not matter)
  for (int i = 0; i < h; ++i)
    for (int j = n - 1; j > i; --j) rbs::exchange_down<T, L>(n, j, S, W, V);
  for (int j = 0; j < h; ++j)  // SV[:h] = W[:, :h]^T, scaled back
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < L; ++l) SV[(j * n + c) * L + l] = W[(c * n + j) * L + l] * sc[l];
  for (int i = 0; i < m; ++i)  // Uo = Q [V_x[:, :h]; 0]
    for (int c = 0; c < h; ++c)
      for (int l = 0; l < L; ++l)
        Uo[(static_cast<size_t>(i) * h + c) * L + l] = i < n ? V[(i * n + c) * L + l] : T(0);
  apply_q<T, L>(m, n, A, vd, cf, sp, Uo, h, h, false);
}

// rbs::retract_sweep's factorizations for TT-ranks up to kMaxRank: the runtime-width QR and
// truncated SVD above, pbs::mm_il's products
template <int L>
struct RuntimeWidth {
  static constexpr int kMaxCols = rbw::kMaxCols;
  template <typename T>
  static void qr(int m, int a, T* A, T* vd, T* cf, T* beta, T* sp, T* Q, T* R) {
    rbw::qr<T, L>(m, a, A, vd, cf, beta, sp, Q, R);
  }
  template <typename T>
  static void lq(int m, int a, T* A, T* vd, T* cf, T* beta, T* sp, T* Q, T* R, T* sg) {
    rbw::qr<T, L>(m, a, A, vd, cf, beta, sp, Q, R);
    for (int j = 0; j < a; ++j)
      for (int l = 0; l < L; ++l) sg[j * L + l] = std::copysign(T(1), beta[j * L + l]);
  }
  template <typename T>
  static void svd_top(int m, int n, T* A, T* vd, T* cf, T* beta, T* sp, T* W, T* V, T* S,
                      T* Uo, T* SV) {
    rbw::svd_top<T, L>(m, n, A, vd, cf, beta, sp, W, V, S, Uo, SV);
  }
  template <typename T>
  static void mm(int M, int N, int K, const T* A, int sam, int sak, const T* Bm, int sbk,
                 int sbn, T* C, int scm, int scn, T alpha, bool acc) {
    pbs::mm_il<T, L>(M, N, K, A, sam, sak, Bm, sbk, sbn, C, scm, scn, alpha, acc);
  }
};

}  // namespace rbw

// retract_point (V computed, the canonical right cores) for B points and/or B steps with
// TT-ranks <= 12, SIMD across the points: U, du cores (1 or B, r, n, r'), every unfolding
// r n >= 2 r' (n_0 >= 2 r_1); (B, size of U's point), left-orthogonal cores. lanes: points
// per block (0: the default, 8 float64 / 16 float32; 16 float64 / 32 float32 the alternative)
torch::Tensor retract_batch_wide(std::vector<torch::Tensor> U, std::vector<torch::Tensor> du,
                                 int64_t B, int64_t lanes, std::vector<torch::Tensor> V) {
  TORCH_CHECK(U.size() >= 2 && U.size() == du.size(), "retract_batch_wide: inconsistent lengths");
  const auto t = U[0].scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kDouble, "U: float32 or float64 only");
  batch_cores(U, "U", t, B);
  batch_cores(du, "du", t, B);
  check_right_cores(V, U, t, B);
  const size_t d = U.size();
  int64_t size = 0;
  for (size_t k = 0; k < d; ++k) {
    TORCH_CHECK(du[k].sizes().slice(1) == U[k].sizes().slice(1), "du: core ", k,
                " differs in shape from U's");
    TORCH_CHECK(U[k].size(1) <= rbw::kMaxRank && U[k].size(3) <= rbw::kMaxRank,
                "retract_batch_wide: TT-ranks above ", rbw::kMaxRank);
    TORCH_CHECK(k == 0 || U[k].size(2) * U[k].size(3) >= U[k].size(1),
                "U: core ", k, " has fewer columns n r' than rows r (no LQ)");
    TORCH_CHECK(k + 1 == d || U[k].size(1) * U[k].size(2) >= 2 * U[k].size(3),
                "U: core ", k, " has fewer rows r n than 2 r' (the rank-2r unfolding is wide)");
    TORCH_CHECK(k + 1 == d || U[k].size(3) == U[k + 1].size(1), "U: ranks of consecutive cores differ");
    size += U[k].size(1) * U[k].size(2) * U[k].size(3);
  }
  TORCH_CHECK(U[0].size(1) == 1 && U[d - 1].size(3) == 1, "U: boundary ranks must be 1");
  auto out = empty_for_output({B, size}, U[0].options());
  if (B == 0) return out;
  bool ok = true;
  if (t == torch::kDouble) {
    if (lanes == 16) ok = rbs::retract_sweep<double, 16, rbw::RuntimeWidth<16>>(U, du, B, out, V);
    else ok = rbs::retract_sweep<double, 8, rbw::RuntimeWidth<8>>(U, du, B, out, V);
  } else {
    if (lanes == 32) ok = rbs::retract_sweep<float, 32, rbw::RuntimeWidth<32>>(U, du, B, out, V);
    else ok = rbs::retract_sweep<float, 16, rbw::RuntimeWidth<16>>(U, du, B, out, V);
  }
  TORCH_CHECK(ok, "retr: X + u is not finite (X or u contains NaN or Inf)");
  return out;
}


// ---------------------------------------------------------------------------------------
// right_cores of a batch of points with TT-ranks <= 16, SIMD across the points: the LQ
// sweep of pbs::project_small_impl (pbs::LqAt on interleaved blocks of L points, the point
// index innermost) alone, each V_k = S_k V'_k (I (x) S_{k+1}) (right_cores_impl's canonical
// gauge) signed as it is copied out, one core of U gathered per step. Lq: the LQ step
// (pbs::LqAt<L>::F, or rbs::At<L>::Lq up to bf::kMaxCols: the same results), hi its rank bound.
namespace rcs {

template <typename T, int L, template <typename, int> class Lq, int hi>
void right_cores_small_impl(const std::vector<torch::Tensor>& U, int64_t B,
                            std::vector<torch::Tensor>& V) {
  constexpr int K = pbs::kMaxRank;
  const int d = static_cast<int>(U.size());
  std::vector<int> r(d + 1), n(d);
  for (int k = 0; k < d; ++k) {
    r[k] = static_cast<int>(U[k].size(1)); n[k] = static_cast<int>(U[k].size(2));
  }
  r[d] = 1;
  size_t mx = 1;
  for (int k = 0; k < d; ++k) mx = std::max(mx, static_cast<size_t>(r[k]) * n[k] * r[k + 1]);
  // one grow-only workspace per thread (no allocation per call), buffers 64-byte aligned
  const size_t sizes[] = {mx * L, mx * L, mx * L, mx * L, static_cast<size_t>(K) * K * L,
                          static_cast<size_t>(K) * L, static_cast<size_t>(K) * L,
                          static_cast<size_t>(K) * L, static_cast<size_t>(d + 1) * K * L};
  constexpr size_t kAl = 64 / sizeof(T);
  size_t total = 0;
  for (size_t z : sizes) total += (z + kAl - 1) / kAl * kAl + kAl;
  thread_local std::vector<T> ws;
  if (ws.size() < total) ws.resize(total);
  T* bufs[sizeof(sizes) / sizeof(sizes[0])];
  {
    T* q = ws.data();
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(q);
      q += ((64 - a % 64) % 64) / sizeof(T);
      bufs[i] = q;
      q += (sizes[i] + kAl - 1) / kAl * kAl;
    }
  }
  T *Ug = bufs[0], *CT = bufs[1], *Qt = bufs[2], *Vb = bufs[3], *Rb = bufs[4], *vd = bufs[5],
    *cf = bufs[6], *beta = bufs[7], *sgn = bufs[8];
  T sc[L];
  for (int l = 0; l < L; ++l) sgn[static_cast<size_t>(d) * K * L + l] = T(1);  // S_d = 1
  for (int64_t b0 = 0; b0 < B; b0 += L) {
    const int nl = static_cast<int>(std::min<int64_t>(L, B - b0));
    {  // CT = U_{d-1}^T, scaled (the Q factors, all that is used, do not change)
      const int a = r[d - 1], nb = n[d - 1];
      pbs::gather_core<T, L>(U[d - 1], b0, B, Ug);
      for (int i = 0; i < a; ++i)
        for (int j = 0; j < nb; ++j)
          pbs::copy_lanes<T, L>(CT + (static_cast<size_t>(j) * a + i) * L,
                                Ug + (static_cast<size_t>(i) * nb + j) * L);
      bf::scale_down<T, L>(CT, a * nb, sc);
    }
    for (int k = d - 1; k >= 1; --k) {
      const int a = r[k], b = r[k + 1], nb = n[k] * b;
      int m = nb;
      T *ct = CT, *pvd = vd, *pcf = cf, *pb = beta, *pq = Qt, *pr = Rb,
        *ps = sgn + static_cast<size_t>(k) * K * L;
      bf::for_cols<T, Lq, hi>(a, m, ct, pvd, pcf, pb, pq, pr, ps);
      const T* s1 = sgn + static_cast<size_t>(k + 1) * K * L;
      for (int al = 0; al < a; ++al)
        for (int i = 0; i < n[k]; ++i)
          for (int be = 0; be < b; ++be) {  // V_k[al, i, be] = S_k[al] Q'[(i, be), al] S_{k+1}[be]
            const size_t row = static_cast<size_t>(i) * b + be;
            pbs::mul3<T, L>(Vb + (static_cast<size_t>(al) * nb + row) * L, ps + al * L,
                            Qt + (row * a + al) * L, s1 + be * L);
          }
      const int64_t cnt = static_cast<int64_t>(a) * nb;
      rbs::put_core<T, L>(Vb, static_cast<int>(cnt), V[k].data_ptr<T>() + b0 * cnt, cnt, nl);
      if (k == 1) break;
      // c_{k-1} (r_{k-1} x n a) = U_{k-1} R^T (unsigned L'_k), written transposed into CT
      // (n a x r_{k-1}) for the next LQ: one product per row al' (as project_small_impl)
      const int ap = r[k - 1], nn = n[k - 1];
      pbs::gather_core<T, L>(U[k - 1], b0, B, Ug);
      for (int al = 0; al < ap; ++al)
        pbs::mm_il<T, L>(nn, a, a, Ug + static_cast<size_t>(al) * nn * a * L, a, 1, Rb, 1, a,
                         CT + static_cast<size_t>(al) * L, a * ap, ap, T(1), false);
    }
  }
}

}  // namespace rcs

// right_cores of each of the B points of U (cores (B or 1, r, n, r'), TT-ranks <= 16), SIMD
// across the points: cores (B, a, n, b) in right_cores' canonical gauge, index 0 a placeholder.
// variant: 1 pbs's LQ in bf's blocks, 2 rbs's LQ in 64-byte blocks (ranks <= 8), 0 (the
// default) 2 up to rank 8, else 1: at d = 10, n = 20, 256 points, 2 took 0.8 (float64) and
// 0.6 (float32) of 1's time at r = 4, 0.7 and 0.58 at r = 8
std::vector<torch::Tensor> right_cores_batch_small(std::vector<torch::Tensor> U, int64_t B,
                                                   int64_t variant) {
  TORCH_CHECK(U.size() >= 2, "right_cores_batch_small: at least two cores");
  const auto t = U[0].scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kDouble, "U: float32 or float64 only");
  TORCH_CHECK(B >= 0, "right_cores_batch_small: negative batch size");
  batch_cores(U, "U", t, B);
  const size_t d = U.size();
  int64_t mr = 0;
  for (size_t k = 0; k < d; ++k) {
    TORCH_CHECK(U[k].size(1) <= pbs::kMaxRank && U[k].size(3) <= pbs::kMaxRank,
                "right_cores_batch_small: TT-ranks above ", pbs::kMaxRank);
    TORCH_CHECK(k == 0 || U[k].size(2) * U[k].size(3) >= U[k].size(1),
                "U: core ", k, " has fewer columns n r' than rows r (no LQ)");
    TORCH_CHECK(k + 1 == d || U[k].size(3) == U[k + 1].size(1), "U: ranks of consecutive cores differ");
    mr = std::max(mr, U[k].size(1));
  }
  TORCH_CHECK(U[0].size(1) == 1 && U[d - 1].size(3) == 1, "U: boundary ranks must be 1");
  std::vector<torch::Tensor> V(d);
  V[0] = torch::empty({0}, U[0].options());
  for (size_t k = 1; k < d; ++k) {
    V[k] = empty_for_output({B, U[k].size(1), U[k].size(2), U[k].size(3)}, U[k].options());
  }
  if (B == 0) return V;
  TORCH_CHECK(variant != 2 || mr <= bf::kMaxCols, "right_cores_batch_small: variant 2 needs TT-ranks <= ",
              bf::kMaxCols);
  // the LQ instantiations of project_batch_small (float32 above rank 8 in blocks of 16) or
  // of retract_batch_small (8 float64 / 16 float32 points): no new ones
  constexpr int Lf = bf::lanes<float>(), Ld = bf::lanes<double>(), K = pbs::kMaxRank;
  if (variant == 2 || (variant == 0 && mr <= bf::kMaxCols)) {
    if (t == torch::kDouble) rcs::right_cores_small_impl<double, 8, rbs::At<8>::template Lq, bf::kMaxCols>(U, B, V);
    else rcs::right_cores_small_impl<float, 16, rbs::At<16>::template Lq, bf::kMaxCols>(U, B, V);
  } else if (t == torch::kDouble) {
    rcs::right_cores_small_impl<double, Ld, pbs::LqAt<Ld>::template F, K>(U, B, V);
  } else if (mr > 8) {
    rcs::right_cores_small_impl<float, Lf / 2, pbs::LqAt<Lf / 2>::template F, K>(U, B, V);
  } else {
    rcs::right_cores_small_impl<float, Lf, pbs::LqAt<Lf>::template F, K>(U, B, V);
  }
  return V;
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("retract", &retract, "packed TT-SVD of X + xi (structured rank-2r rounding)");
  m.def("retract_point", &retract_point, "retract, V computed from U");
  m.def("right_cores", &right_cores, "canonical right-orthogonal cores of a left-orthogonal TT");
  m.def("project", &project, "packed projection D_k = U_<k^T Z V_>k^T (optionally gauged)");
  m.def("inner", &inner, "inner product of two TTs");
  m.def("all_finite", &all_finite, "whether every entry of the tensors is finite");
  m.def("tangent_block_cores", &tangent_block_cores, "block cores of a tangent TT");
  m.def("tangent_block_cores_backward", &tangent_block_cores_backward,
        "packed delta gradient from the block cores' gradients");
  m.def("gauge_project", &gauge_project, "gauge projection of a packed tensor, and its finiteness");
  m.def("gauge_project_batch", &gauge_project_batch,
        "gauge projection of a batch of packed tensors, and their finiteness");
  m.def("one_vs_blocks", &one_vs_blocks, "(<x, x>, <x, t_j>...) and the left environments");
  m.def("one_vs_blocks_backward", &one_vs_blocks_backward,
        "gradient in x of sum_b g_b <x, block_b>");
  m.def("right_cores_batch", &right_cores_batch, "right_cores of a batch of points, one call");
  m.def("right_cores_batch_small", &right_cores_batch_small, "right_cores of a batch of points of TT-ranks <= 16, SIMD across the points (interleaved)", pybind11::arg("U"), pybind11::arg("B"), pybind11::arg("variant") = 0);
  m.def("project_batch", &project_batch, "project for a batch of points and/or TTs, one call");
  m.def("retract_batch", &retract_batch, "retract for a batch of points and/or steps, one call");
  m.def("one_vs_blocks_backward_deltas", &one_vs_blocks_backward_deltas,
        "the same for tangent block cores x: the packed gradient of the deltas only");
  m.def("batched_qr", &batched_qr, "thin QR of a batch of small matrices (interleaved)");
  m.def("batched_svd", &batched_svd, "thin SVD of a batch of small matrices (interleaved)");
  m.def("project_batch_small", &project_batch_small,
        "project of a batch of points of TT-ranks <= 16, SIMD across the points (interleaved); "
        "check: the error message for a non-finite result (\"\": not tested)",
        pybind11::arg("U"), pybind11::arg("Z"), pybind11::arg("gauge"), pybind11::arg("B"),
        pybind11::arg("check") = "", pybind11::arg("V") = std::vector<torch::Tensor>());
  m.def("transport_batch_small", &transport_batch_small,
        "P_Y of tangent vectors (U, V_1..V_{d-1}, dU) at points Uy for a batch of TT-ranks <= 16, "
        "SIMD across the points (interleaved); check: the message for a non-finite result",
        pybind11::arg("Uy"), pybind11::arg("U"), pybind11::arg("V"), pybind11::arg("dU"),
        pybind11::arg("B"), pybind11::arg("check") = "");
  m.def("gauge_project_batch_small", &gauge_project_batch_small,
        "gauge_project_batch SIMD across blocks of points (interleaved), and the finiteness");
  m.def("retract_batch_small", &retract_batch_small,
        "retract_point of a batch of points of TT-ranks <= 4, SIMD across the points (interleaved)",
        pybind11::arg("U"), pybind11::arg("du"), pybind11::arg("B"),
        pybind11::arg("V") = std::vector<torch::Tensor>());
  m.def("retract_batch_wide", &retract_batch_wide, "retract_point of a batch of points of TT-ranks <= 12, SIMD across the points (runtime widths)", pybind11::arg("U"), pybind11::arg("du"), pybind11::arg("B"), pybind11::arg("lanes") = 0, pybind11::arg("V") = std::vector<torch::Tensor>());
}
