// Small dense sweeps of the fixed-TT-rank manifold on the CPU, calling LAPACK/BLAS directly
// (the symbols that torch's CPU build exports), without torch's per-call overhead:
// the right-orthogonal cores V of a left-orthogonal point and the tangent projection of a
// TT. ttmanifold/_native.py builds this file on first use; the torch implementations in
// ttmanifold/tangent.py are the reference and the fallback.
//
// Conventions: cores are row-major (r_left, n, r_right) arrays. A row-major (p x q) matrix
// is the column-major (q x p) matrix with leading dimension q, so every product below is
// written for column-major BLAS on the transposes.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

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
  Work<T> cbuf, rbuf, tau, work, next;
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
    int info = 0, lw = -1;
    T q = 0;
    geqrf(m, a, c, m, tau.get(a), &q, lw, &info);
    lw = std::max<int>(static_cast<int>(q), 1);
    T qo = 0;
    int lw2 = -1;
    orgqr(m, a, c, m, tau.get(a), &qo, lw2, &info);
    lw = std::max<int>(lw, static_cast<int>(qo));
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

void check_cores(const std::vector<torch::Tensor>& cs, const char* name, torch::ScalarType t,
                 int64_t from = 0) {
  for (size_t k = static_cast<size_t>(from); k < cs.size(); ++k) {
    TORCH_CHECK(cs[k].device().is_cpu() && cs[k].is_contiguous() && cs[k].dim() == 3 &&
                cs[k].scalar_type() == t, name, ": expected contiguous 3-D CPU cores of one dtype");
  }
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
  int64_t total = 0;
  for (const auto& u : U) total += u.numel();
  auto out = torch::empty({total}, U[0].options());
  AT_DISPATCH_FLOATING_TYPES(t, "ttm_project", [&] {
    project_impl<scalar_t>(U, V, Z, gauge, out.data_ptr<scalar_t>());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("right_cores", &right_cores, "canonical right-orthogonal cores of a left-orthogonal TT");
  m.def("project", &project, "packed projection D_k = U_<k^T Z V_>k^T (optionally gauged)");
}
