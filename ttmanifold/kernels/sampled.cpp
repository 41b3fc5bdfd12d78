// Fused CPU kernels of the sampled-entry sweeps (ttmanifold/kernels builds this file on
// first use with torch.utils.cpp_extension; the callers fall back to the torch kernels of
// ttmanifold/tt/blocked.py when the build is not possible).
//
// Layout: the N samples of one block of merged modes are sorted by their merged index g
// (order position i); group g is the rows off[g] .. off[g+1]-1. Per-sample vectors of a
// block are (N, r) row-major arrays in that order. One pass over a block reads every row
// once in order and the group's small matrix once; the layout change to the next block is
// a scatter of the result rows (dst), so no separate gather pass is needed. The right
// step and the scatter of a block share one pass (step_outer).
//
// Where the time goes (d = 20, n = 50, r = 10, N = 1e6, one core): with the matrix in
// cache the arithmetic of a step is about 15 cycles per row; the rest is memory: the rows
// read (prefetched by the hardware) and the scattered destination rows, which are
// prefetched here kAhead rows ahead (a demand miss per destination line otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include <pthread.h>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // output columns accumulated in registers at once
constexpr int64_t kGroups = 16;  // groups per task of for_groups
constexpr int64_t kAhead = 32;  // rows between a destination prefetch and its store

// Helper threads for for_groups, "work first": the calling thread does the work itself and
// wakes helpers that join while there is work left. It never waits for a helper that has
// not started: with an OpenMP region every thread of the team must reach the closing
// barrier, so when another process holds the second core each call waited a scheduler
// time slice for it (measured: 2 threads 3-5x slower than 1 on a loaded 2-core machine).
// The pool is created on first use and never destroyed (detached threads: no join at exit;
// after a fork the child has no helpers and the caller simply does all the work).
class Helpers {
 public:
  static Helpers& get() {
    static const bool created = [] {  // once, thread-safe
      instance() = new Helpers();  // leaked on purpose, see above
      // a child of fork has none of the helper threads (and the mutex may have been
      // held by one of them at the fork): it starts from a fresh pool
      pthread_atfork(nullptr, nullptr, [] { instance() = new Helpers(); });
      return true;
    }();
    (void)created;
    return *instance();
  }

  // Runs work() on the calling thread and on up to `extra` helpers; returns when the
  // calling thread's work() returned and no helper is inside work() any more.
  void run(int64_t extra, const std::function<void()>& work) {
    {
      std::lock_guard<std::mutex> lk(m_);
      while (static_cast<int64_t>(n_started_) < extra) {
        std::thread(&Helpers::loop, this).detach();
        ++n_started_;
      }
      job_ = &work;
      slots_ = extra;
      ++gen_;
    }
    cv_.notify_all();
    // helpers may be running `work` (a reference into the caller's frame): withdraw it and
    // wait for them before returning, also when the caller's own share throws
    try {
      work();
    } catch (...) {
      retire();
      throw;
    }
    retire();
  }

 private:
  void retire() {
    std::unique_lock<std::mutex> lk(m_);
    job_ = nullptr;  // helpers waking from now on find nothing to do
    slots_ = 0;
    done_cv_.wait(lk, [&] { return active_ == 0; });  // helpers inside work() finish
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (job_ == nullptr || slots_ <= 0) continue;
      --slots_;
      ++active_;
      const std::function<void()>* w = job_;
      lk.unlock();
      (*w)();
      lk.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  static Helpers*& instance() {
    static Helpers* h = nullptr;
    return h;
  }

  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void()>* job_ = nullptr;
  int64_t slots_ = 0;
  int64_t active_ = 0;
  uint64_t gen_ = 0;
  size_t n_started_ = 0;
};

// fn(g0, g1) over the items 0 .. P-1 in tasks of `task` items, run by the calling thread
// and by up to at::get_num_threads() - 1 helpers. Each thread starts on its own contiguous
// range of the items (taken in order from the range's counter), then takes the tasks left
// in the other ranges: a thread that loses its core delays at most the task it holds, and
// a helper that never gets a core is not waited for. Contiguous ranges matter for the
// scattered steps: a destination group's rows are ordered by source group, so threads on
// neighbouring source groups would write the same cache lines at the same time.
// fn must not call back into ATen's parallel functions.
template <typename F>
void for_tasks(int64_t P, int64_t task, const F& fn) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || P <= task || at::in_parallel_region()) {
    fn(0, P);
    return;
  }
  const int64_t ntask = (P + task - 1) / task;
  const int64_t nw = std::min(nt, ntask);  // ranges, one per thread that may take part
  std::vector<std::atomic<int64_t>> next(static_cast<size_t>(nw));
  std::vector<int64_t> end(static_cast<size_t>(nw));
  for (int64_t k = 0; k < nw; ++k) {
    next[k].store(ntask * k / nw * task);
    end[k] = std::min(P, ntask * (k + 1) / nw * task);
  }
  std::atomic<int64_t> ids{0};
  const std::function<void()> work = [&] {
    const int64_t me = ids.fetch_add(1);
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t k = (me + j) % nw;
      for (;;) {
        const int64_t g0 = next[k].fetch_add(task);
        if (g0 >= end[k]) break;
        fn(g0, std::min(end[k], g0 + task));
      }
    }
  };
  Helpers::get().run(nw - 1, work);
}

// for_tasks over the groups of a block, kGroups groups per task
template <typename F>
void for_groups(int64_t P, const F& fn) {
  for_tasks(P, kGroups, fn);
}

// Rows of one group times the group's matrix, with explicit SIMD vectors (GCC/Clang vector
// extensions; the width follows the target: 32 bytes covers AVX2 and is split by the
// compiler on narrower targets). One row alone is a chain of ra dependent FMAs per
// accumulator (latency-bound, about 3x below the FMA throughput): RB independent rows are
// computed at once and share every load of the matrix row.
template <typename T>
struct Simd {
  static constexpr int W = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
};

// The group's matrix columns j0 .. j0+NJ) copied into zero-padded vectors (ra x NV), so
// the kernels load whole vectors without reading past the matrix.
template <typename T, int NV>
inline void pad_cols(const T* m, int64_t ra, int64_t ld, int64_t j0, int nj,
                     typename Simd<T>::V* mp) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  for (int64_t f = 0; f < ra; ++f) {
    T tmp[NV * W] = {};
    for (int j = 0; j < nj; ++j) tmp[j] = m[f * ld + j0 + j];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V x;
      __builtin_memcpy(&x, tmp + v * W, sizeof(V));
      mp[f * NV + v] = x;
    }
  }
}

// The rows of one group's vectors: row i (counted from the group's first row) at p + i w,
// or, with idx, at p + idx[i] w (p a small table, e.g. of the first merged core's rows: it
// stays in cache, which spares storing and streaming a full (N, w) array of its rows).
template <typename T>
struct Rows {
  const T* p;
  const int32_t* idx;
  int64_t w;
  const T* operator()(int64_t i) const {
    return p + (idx ? static_cast<int64_t>(idx[i]) : i) * w;
  }
};

// The rows of the group starting at row i0 of vectors a (N, w), or of the table a by aidx
template <typename T>
Rows<T> group_rows(const T* a, int64_t w, const int32_t* aidx, int64_t i0) {
  return aidx ? Rows<T>{a, aidx + i0, w} : Rows<T>{a + i0 * w, nullptr, w};
}

// s[q] = x[q] @ mp for q < RB (RB rows)
template <typename T, int NV, int RB>
inline void rows_times(const T* const (&x)[RB], int64_t ra,
                       const typename Simd<T>::V* __restrict mp,
                       typename Simd<T>::V (&s)[RB][NV]) {
  using V = typename Simd<T>::V;
  #pragma GCC unroll 16
  for (int q = 0; q < RB; ++q)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) s[q][v] = V{};
  for (int64_t f = 0; f < ra; ++f) {
    V mv[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) mv[v] = mp[f * NV + v];
    #pragma GCC unroll 16
    for (int q = 0; q < RB; ++q) {
      const T xf = x[q][f];
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) s[q][v] += xf * mv[v];
    }
  }
}

// o[0 .. NJ) = the first NJ lanes of s: whole vectors, then the lanes of the last one
// (no round trip through memory: a wide reload of narrower stores stalls)
template <typename T, int NV, int NJ>
inline void store_row(const typename Simd<T>::V (&s)[NV], T* o) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  #pragma GCC unroll 16
  for (int v = 0; v < NJ / W; ++v) __builtin_memcpy(o + v * W, &s[v], sizeof(V));
  if (NJ % W) __builtin_memcpy(o + (NJ / W) * W, &s[NJ / W], (NJ % W) * sizeof(T));
}

// s = y[0 .. NJ) zero-padded to NV vectors (the tail lane by lane, in registers)
template <typename T, int NV, int NJ>
inline void load_row(const T* y, typename Simd<T>::V* s) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  #pragma GCC unroll 16
  for (int v = 0; v < NJ / W; ++v) __builtin_memcpy(&s[v], y + v * W, sizeof(V));
  if (NJ % W) {
    V t = V{};
    #pragma GCC unroll 16
    for (int l = 0; l < NJ % W; ++l) t[l] = y[(NJ / W) * W + l];
    s[NJ / W] = t;
  }
}

// s . y[0 .. NJ)
template <typename T, int NV, int NJ>
inline T dot_row(const typename Simd<T>::V (&s)[NV], const T* y) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  V acc = V{};
  #pragma GCC unroll 16
  for (int v = 0; v < NJ / W; ++v) {
    V yv;
    __builtin_memcpy(&yv, y + v * W, sizeof(V));
    acc += s[v] * yv;
  }
  T out = 0;
  #pragma GCC unroll 16
  for (int w = 0; w < NJ % W; ++w) out += s[NJ / W][w] * y[(NJ / W) * W + w];
  #pragma GCC unroll 16
  for (int w = 0; w < W; ++w) out += acc[w];
  return out;
}

// rows per register block: RB x NV accumulators plus NV matrix vectors and a broadcast
// fit the vector registers (32 with AVX-512, else 16), at most 8
#ifdef __AVX512F__
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif
template <int NV, int Regs = kVecRegs>
constexpr int rows_per_block() {
  return (Regs - NV - 1) / NV < 8 ? (Regs - NV - 1) / NV : 8;
}

// Rows i0 .. i1-1 of one group, columns j0 .. j0+NJ: out[dst[i]] = a[i] @ m (dst null:
// out[i]), or, with c (c0.p not null), t[i - i0] += a[i] @ m . c[i] (t the group's partial
// sums). The rows a[i] are a0(i - i0), c[i] c0(i - i0).
template <typename T, int NJ>
void group_cols(Rows<T> a0, int64_t ra, const T* m, int64_t rb, int64_t j0,
                int64_t i0, int64_t i1, const int32_t* dst, T* out, Rows<T> c0, T* t,
                std::vector<typename Simd<T>::V>& buf) {
  using V = typename Simd<T>::V;
  constexpr int NV = (NJ + Simd<T>::W - 1) / Simd<T>::W;
  // more rows at once than 16 registers hold makes the scattered stores come in bursts
  // (measured slower even with 32 registers)
  constexpr int RB = rows_per_block<NV, 16>() < 4 ? rows_per_block<NV, 16>() : 4;
  buf.resize(static_cast<size_t>(ra * NV));
  V* mp = buf.data();
  pad_cols<T, NV>(m, ra, rb, j0, NJ, mp);
  auto emit = [&](const V (&s)[NV], int64_t i) {
    if (c0.p) t[i - i0] += dot_row<T, NV, NJ>(s, c0(i - i0) + j0);
    else store_row<T, NV, NJ>(s, out + (dst ? static_cast<int64_t>(dst[i]) : i) * rb + j0);
  };
  int64_t i = i0;
  for (; i + RB <= i1; i += RB) {
    if (dst && i + kAhead + RB <= i1)  // the destination rows' lines, ahead of the stores
      #pragma GCC unroll 16
      for (int q = 0; q < RB; ++q) {
        T* o = out + static_cast<int64_t>(dst[i + kAhead + q]) * rb + j0;
        __builtin_prefetch(o, 1);
        __builtin_prefetch(o + NJ - 1, 1);  // a row may straddle two lines
      }
    if (a0.idx && i + kAhead + RB <= i1)  // table rows: irregular, not prefetched by the hardware
      #pragma GCC unroll 16
      for (int q = 0; q < RB; ++q) {
        const T* xa = a0(i - i0 + kAhead + q);
        __builtin_prefetch(xa);
        __builtin_prefetch(xa + ra - 1);
      }
    V s[RB][NV];
    const T* x[RB];
    #pragma GCC unroll 16
    for (int q = 0; q < RB; ++q) x[q] = a0(i - i0 + q);
    rows_times<T, NV, RB>(x, ra, mp, s);
    #pragma GCC unroll 16
    for (int q = 0; q < RB; ++q) emit(s[q], i + q);
  }
  for (; i < i1; ++i) {
    V s[1][NV];
    const T* x[1] = {a0(i - i0)};
    rows_times<T, NV, 1>(x, ra, mp, s);
    emit(s[0], i);
  }
}

template <typename T>
using GroupCols = void (*)(Rows<T>, int64_t, const T*, int64_t, int64_t, int64_t, int64_t,
                           const int32_t*, T*, Rows<T>, T*,
                           std::vector<typename Simd<T>::V>&);
template <typename T, int... J>
constexpr std::array<GroupCols<T>, sizeof...(J)> group_table(std::integer_sequence<int, J...>) {
  return {&group_cols<T, J + 1>...};
}

// One group (rows a0 as in group_cols): columns in chunks of at most kChunk (a
// compile-time width each).
template <typename T>
void group(Rows<T> a0, int64_t ra, const T* m, int64_t rb, int64_t i0, int64_t i1,
           const int32_t* dst, T* out, Rows<T> c0, T* t,
           std::vector<typename Simd<T>::V>& buf) {
  static constexpr auto tab = group_table<T>(std::make_integer_sequence<int, kChunk>{});
  for (int64_t j0 = 0; j0 < rb; j0 += kChunk)
    tab[std::min(kChunk, rb - j0) - 1](a0, ra, m, rb, j0, i0, i1, dst, out, c0, t, buf);
}

// out[dst[i]] = a[i] @ M[g] for the rows i of every group g (dst null: out[i]).
template <typename T>
void step_impl(const T* a, int64_t ra, const int32_t* aidx, const T* M, int64_t rb,
               const int64_t* off, int64_t P, const int32_t* dst, T* out) {
  for_groups(P, [&](int64_t g0, int64_t g1) {
    std::vector<typename Simd<T>::V> buf;
    for (int64_t g = g0; g < g1; ++g)
      group(group_rows(a, ra, aidx, off[g]), ra, M + g * ra * rb, rb, off[g], off[g + 1], dst,
            out, Rows<T>{nullptr, nullptr, 0}, static_cast<T*>(nullptr), buf);
  });
}

// t[i] = a[i] @ M[g] . c[i]  (a (N, ra), c (N, rb), M (P, ra, rb)), in the block's order.
// (Carrying the sums along the blocks' orders instead, one scattered scalar store per row
// and block, measured slower than the block-order output and one gather per block; so did
// a carried sum read inside this kernel at the rows' positions in the previous order: the
// streamed rows evict it from the cache, where the separate gather finds t.)
template <typename T>
void rowdot_impl(const T* a, int64_t ra, const int32_t* aidx, const T* M, int64_t rb,
                 const T* c, const int32_t* cidx, const int64_t* off, int64_t P, T* t) {
  for_groups(P, [&](int64_t g0, int64_t g1) {
    std::vector<typename Simd<T>::V> buf;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t i0 = off[g], i1 = off[g + 1];
      std::fill(t + i0, t + i1, T(0));
      group(group_rows(a, ra, aidx, i0), ra, M + g * ra * rb, rb, i0, i1, nullptr,
            static_cast<T*>(nullptr), group_rows(c, rb, cidx, i0), t + i0, buf);
    }
  });
}

// out[i] = src[idx[i]] (rows of w numbers; add: out[i] += src[idx[i]], w = 1), on the
// helper threads of for_tasks
template <typename T>
void gather_impl(const T* src, int64_t w, const int32_t* idx, int64_t N, bool add, T* out) {
  constexpr int64_t kRows = 1 << 13;  // rows per task
  constexpr int64_t kLead = 64;  // rows between the prefetch of a source row and its copy
  for_tasks(N, kRows, [&](int64_t i0, int64_t i1) {
    if (w == 1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (i + kLead < i1) __builtin_prefetch(src + idx[i + kLead]);
        out[i] = add ? out[i] + src[idx[i]] : src[idx[i]];
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        if (i + kLead < i1) __builtin_prefetch(src + static_cast<int64_t>(idx[i + kLead]) * w);
        std::copy_n(src + static_cast<int64_t>(idx[i]) * w, w, out + i * w);
      }
    }
  });
}

// FB rows f0 .. f0+FB of a group's C_g (columns of one chunk, NJ wide) in registers:
// out[q, :] = sum_i x[i, f0 + q] w[i] over the n staged rows w (NV vectors each).
template <typename T, int NJ, int FB>
inline void outer_tile(Rows<T> x, int64_t f0,
                       const typename Simd<T>::V* __restrict w, int64_t n, T* out, int64_t rb) {
  using V = typename Simd<T>::V;
  constexpr int NV = (NJ + Simd<T>::W - 1) / Simd<T>::W;
  V acc[FB][NV] = {};
  for (int64_t i = 0; i < n; ++i) {
    const V* wi = w + i * NV;
    const T* xi = x(i) + f0;
    #pragma GCC unroll 16
    for (int q = 0; q < FB; ++q) {
      const T xf = xi[q];
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[q][v] += xf * wi[v];
    }
  }
  #pragma GCC unroll 16
  for (int q = 0; q < FB; ++q) store_row<T, NV, NJ>(acc[q], out + q * rb);
}

// Columns j0 .. j0+NJ of C_g = sum_i z[perm[i]] a[i]^T c[i] over the rows i0 .. i0+n-1 of
// one group (C_g (ra, rb) row-major at out; the rows a[i] are a0(i - i0), c[i] c0(i - i0)).
// The weighted rows z c are staged once in zero-padded vectors (w); then RB rows of C_g at
// a time stay in registers while the group's rows stream through (they are in cache: the
// group is small).
template <typename T, int NJ>
void outer_cols(Rows<T> a0, int64_t ra, Rows<T> c0, int64_t rb, int64_t j0, const T* z,
                const int32_t* perm, int64_t i0, int64_t n, T* out,
                std::vector<typename Simd<T>::V>& w) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  constexpr int NV = (NJ + W - 1) / W;
  constexpr int RB = rows_per_block<NV>();
  w.resize(static_cast<size_t>(n * NV) + (n + W - 1) / W);
  // the group's weights first, in a tight loop of independent loads (z is in sample
  // order, so these are scattered reads; interleaved with the arithmetic they stall)
  T* zg = reinterpret_cast<T*>(w.data() + n * NV);
  for (int64_t i = 0; i < n; ++i) zg[i] = z ? z[perm ? perm[i0 + i] : i0 + i] : T(1);
  for (int64_t i = 0; i < n; ++i) {
    // the left rows are first read by the tiles below: fetch them along with these
    __builtin_prefetch(a0(i));
    const T zi = zg[i];
    const T* y = c0(i) + j0;
    V* wi = &w[static_cast<size_t>(i * NV)];
    load_row<T, NV, NJ>(y, wi);
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wi[v] *= zi;
  }
  // rows of C_g in tiles of at most RB, balanced (ra = 10, RB = 4: 4 + 3 + 3, not
  // 4 + 4 + 1 + 1: a one-row tile is a latency-bound chain)
  const int64_t nt = (ra + RB - 1) / RB;
  const int64_t fb = (ra + nt - 1) / nt;
  const Rows<T> x = a0;
  for (int64_t f0 = 0; f0 < ra; f0 += fb) {
    const int64_t m = std::min(fb, ra - f0);
    static_assert(RB <= 8, "tile table");
    switch (m) {
      case 1: outer_tile<T, NJ, 1>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 2: outer_tile<T, NJ, 2>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 3: outer_tile<T, NJ, 3>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 4: outer_tile<T, NJ, 4>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 5: outer_tile<T, NJ, (RB >= 5 ? 5 : 1)>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 6: outer_tile<T, NJ, (RB >= 6 ? 6 : 1)>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      case 7: outer_tile<T, NJ, (RB >= 7 ? 7 : 1)>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
      default: outer_tile<T, NJ, (RB >= 8 ? 8 : 1)>(x, f0, w.data(), n, out + f0 * rb + j0, rb); break;
    }
  }
}

template <typename T>
using OuterCols = void (*)(Rows<T>, int64_t, Rows<T>, int64_t, int64_t, const T*,
                           const int32_t*, int64_t, int64_t, T*,
                           std::vector<typename Simd<T>::V>&);
template <typename T, int... J>
constexpr std::array<OuterCols<T>, sizeof...(J)> outer_table(std::integer_sequence<int, J...>) {
  return {&outer_cols<T, J + 1>...};
}

// C_g (ra, rb) = sum over the rows i of group g (off[g] .. off[g+1]-1) of
// z[perm[i]] a[i]^T c[i] (rows a0 as in outer_cols)
template <typename T>
void outer_group(Rows<T> a0, int64_t ra, Rows<T> c0, int64_t rb, const T* z,
                 const int32_t* perm, int64_t i0, int64_t i1, T* out,
                 std::vector<typename Simd<T>::V>& w) {
  static constexpr auto tab = outer_table<T>(std::make_integer_sequence<int, kChunk>{});
  if (i1 == i0) {
    std::fill(out, out + ra * rb, T(0));
    return;
  }
  for (int64_t j0 = 0; j0 < rb; j0 += kChunk)
    tab[std::min(kChunk, rb - j0) - 1](a0, ra, c0, rb, j0, z, perm, i0, i1 - i0, out, w);
}

// C[g] = sum_{i in g} z[perm[i]] a[i]^T c[i]  (C (P, ra, rb)).
template <typename T>
void outer_impl(const T* a, int64_t ra, const int32_t* aidx, const T* c, int64_t rb,
                const int32_t* cidx, const T* z, const int64_t* off, int64_t P,
                const int32_t* perm, T* C) {
  for_groups(P, [&](int64_t g0, int64_t g1) {
    std::vector<typename Simd<T>::V> w;
    for (int64_t g = g0; g < g1; ++g)
      outer_group(group_rows(a, ra, aidx, off[g]), ra, group_rows(c, rb, cidx, off[g]), rb, z,
                  perm, off[g], off[g + 1], C + g * ra * rb, w);
  });
}

// The right step of a block fused with its scatter: per group g, out[dst[i]] = c[i] @ Mt[g]
// (c the block's right vectors (N, rb), Mt (P, rb, rc); skipped when out is null) and
// C[g] = sum_i z[perm[i]] a[i]^T c[i] (a the block's left vectors (N, ra)): the rows of c
// are read from memory once for both.
template <typename T>
void step_outer_impl(const T* c, int64_t rb, const int32_t* cidx, const T* Mt, int64_t rc,
                     const int32_t* dst, T* out, const T* a, int64_t ra, const int32_t* aidx,
                     const T* z, const int32_t* perm, const int64_t* off, int64_t P, T* C) {
  for_groups(P, [&](int64_t g0, int64_t g1) {
    std::vector<typename Simd<T>::V> buf, w;
    for (int64_t g = g0; g < g1; ++g) {
      const Rows<T> c0 = group_rows(c, rb, cidx, off[g]);
      if (out)
        group(c0, rb, Mt + g * rb * rc, rc, off[g], off[g + 1], dst, out,
              Rows<T>{nullptr, nullptr, 0}, static_cast<T*>(nullptr), buf);
      outer_group(group_rows(a, ra, aidx, off[g]), ra, c0, rb, z, perm, off[g], off[g + 1],
                  C + g * ra * rb, w);
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

// The row count of vectors a: its rows, or with aidx (a a table, row i = a[aidx[i]]) aidx's
int64_t rows_of(const torch::Tensor& a, const c10::optional<torch::Tensor>& aidx) {
  return aidx.has_value() ? aidx->numel() : a.size(0);
}

}  // namespace

// Every kernel taking left vectors a (N, ra) also takes them as a table a (S, ra) with
// aidx (N,) int32: row i is a[aidx[i]]; likewise right vectors c with cidx (the indices are
// not checked: the callers build them).

// out (rows, rb) receives a[i] @ M[g] at row dst[i] (or i).
void step(torch::Tensor a, torch::Tensor M, torch::Tensor off,
          c10::optional<torch::Tensor> dst, torch::Tensor out,
          c10::optional<torch::Tensor> aidx) {
  check(a, "a"); check(M, "M"); check(off, "off"); check(out, "out");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  TORCH_CHECK(M.dim() == 3 && a.dim() == 2 && M.size(1) == a.size(1) && out.dim() == 2 &&
              out.size(1) == M.size(2) && off.numel() == M.size(0) + 1,
              "step: inconsistent shapes");
  const int32_t* d = idx_ptr(dst, "dst");
  const int32_t* ai = idx_ptr(aidx, "aidx");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_step", [&] {
    step_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), ai, M.data_ptr<scalar_t>(),
                        M.size(2), off.data_ptr<int64_t>(), M.size(0), d,
                        out.data_ptr<scalar_t>());
  });
}

// t[i] = a[i] @ M[g] . c[i] in the block's order
void rowdot(torch::Tensor a, torch::Tensor M, torch::Tensor c, torch::Tensor off,
            torch::Tensor t, c10::optional<torch::Tensor> aidx,
            c10::optional<torch::Tensor> cidx) {
  check(a, "a"); check(M, "M"); check(c, "c"); check(off, "off"); check(t, "t");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  const int64_t N = rows_of(a, aidx);
  TORCH_CHECK(M.dim() == 3 && M.size(1) == a.size(1) && M.size(2) == c.size(1) &&
              N == rows_of(c, cidx) && t.numel() == N &&
              off.numel() == M.size(0) + 1, "rowdot: inconsistent shapes");
  const int32_t* ai = idx_ptr(aidx, "aidx");
  const int32_t* ci = idx_ptr(cidx, "cidx");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_rowdot", [&] {
    rowdot_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), ai, M.data_ptr<scalar_t>(),
                          M.size(2), c.data_ptr<scalar_t>(), ci, off.data_ptr<int64_t>(),
                          M.size(0), t.data_ptr<scalar_t>());
  });
}

// out (N, w) = rows idx of src (S, w) (1-d src and out: w = 1; add: out += src[idx], 1-d
// only); the indices are not checked (the callers build them)
void gather(torch::Tensor src, torch::Tensor idx, torch::Tensor out, bool add) {
  check(src, "src"); check(out, "out");
  const int32_t* ix = idx_ptr(idx, "idx");
  const int64_t w = src.dim() == 1 ? 1 : src.numel() / std::max<int64_t>(src.size(0), 1);
  TORCH_CHECK(src.dim() >= 1 && out.dim() == src.dim() && out.size(0) == idx.numel() &&
              out.numel() == idx.numel() * w && out.scalar_type() == src.scalar_type(),
              "gather: inconsistent shapes");
  TORCH_CHECK(!add || src.dim() == 1, "gather: add expects 1-d src and out");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ttm_gather", [&] {
    gather_impl<scalar_t>(src.data_ptr<scalar_t>(), w, ix, idx.numel(), add,
                          out.data_ptr<scalar_t>());
  });
}

// the scatter's arguments (outer, step_outer), checked; returns the number of rows N
static int64_t check_scatter_args(const torch::Tensor& a, const torch::Tensor& c,
                                  const torch::Tensor& z, const torch::Tensor& off,
                                  const torch::Tensor& C,
                                  const c10::optional<torch::Tensor>& aidx,
                                  const c10::optional<torch::Tensor>& cidx, const char* name) {
  check(a, "a"); check(c, "c"); check(z, "z"); check(off, "off"); check(C, "C");
  TORCH_CHECK(off.scalar_type() == torch::kInt64, "off: expected int64");
  const int64_t N = rows_of(a, aidx);
  TORCH_CHECK(C.dim() == 3 && C.size(1) == a.size(1) && C.size(2) == c.size(1) &&
              N == rows_of(c, cidx) && off.numel() == C.size(0) + 1 &&
              z.numel() == N, name, ": inconsistent shapes");
  return N;
}

// C (P, ra, rb) = per group sum of z[perm[i]] a[i]^T c[i] (perm absent: z[i])
void outer(torch::Tensor a, torch::Tensor c, torch::Tensor z, torch::Tensor off,
           c10::optional<torch::Tensor> perm, torch::Tensor C,
           c10::optional<torch::Tensor> aidx, c10::optional<torch::Tensor> cidx) {
  check_scatter_args(a, c, z, off, C, aidx, cidx, "outer");
  const int32_t* p = idx_ptr(perm, "perm");
  const int32_t* ai = idx_ptr(aidx, "aidx");
  const int32_t* ci = idx_ptr(cidx, "cidx");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_outer", [&] {
    outer_impl<scalar_t>(a.data_ptr<scalar_t>(), a.size(1), ai, c.data_ptr<scalar_t>(),
                         c.size(1), ci, z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
                         C.size(0), p, C.data_ptr<scalar_t>());
  });
}

// The right step of one block fused with its scatter: out[dst[i]] = c[i] @ Mt[g] (when out
// is given) and C[g] = sum_i z[perm[i]] a[i]^T c[i], reading c once.
void step_outer(torch::Tensor c, torch::Tensor Mt, c10::optional<torch::Tensor> dst,
                c10::optional<torch::Tensor> out, torch::Tensor a, torch::Tensor z,
                torch::Tensor off, c10::optional<torch::Tensor> perm, torch::Tensor C,
                c10::optional<torch::Tensor> aidx, c10::optional<torch::Tensor> cidx) {
  check(Mt, "Mt");
  check_scatter_args(a, c, z, off, C, aidx, cidx, "step_outer");
  const int32_t* ai = idx_ptr(aidx, "aidx");
  const int32_t* ci = idx_ptr(cidx, "cidx");
  const int32_t* d = idx_ptr(dst, "dst");
  const int32_t* p = idx_ptr(perm, "perm");
  if (out.has_value()) {
    check(*out, "out");
    TORCH_CHECK(Mt.dim() == 3 && Mt.size(0) == C.size(0) && Mt.size(1) == c.size(1) &&
                out->dim() == 2 && out->size(1) == Mt.size(2) &&
                out->scalar_type() == c.scalar_type(), "step_outer: inconsistent shapes");
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ttm_step_outer", [&] {
    step_outer_impl<scalar_t>(c.data_ptr<scalar_t>(), c.size(1), ci, Mt.data_ptr<scalar_t>(),
                              Mt.size(2), d,
                              out.has_value() ? out->data_ptr<scalar_t>() : nullptr,
                              a.data_ptr<scalar_t>(), a.size(1), ai, z.data_ptr<scalar_t>(), p,
                              off.data_ptr<int64_t>(), C.size(0), C.data_ptr<scalar_t>());
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "rows times their group's matrix, scattered to dst", py::arg("a"),
        py::arg("M"), py::arg("off"), py::arg("dst"), py::arg("out"),
        py::arg("aidx") = py::none());
  m.def("rowdot", &rowdot, "a M c per row", py::arg("a"), py::arg("M"), py::arg("c"),
        py::arg("off"), py::arg("t"), py::arg("aidx") = py::none(),
        py::arg("cidx") = py::none());
  m.def("gather", &gather, "rows of a table by int32 index (or their sum with out)",
        py::arg("src"), py::arg("idx"), py::arg("out"), py::arg("add") = false);
  m.def("outer", &outer, "per-group weighted sums of outer products", py::arg("a"),
        py::arg("c"), py::arg("z"), py::arg("off"), py::arg("perm"), py::arg("C"),
        py::arg("aidx") = py::none(), py::arg("cidx") = py::none());
  m.def("step_outer", &step_outer, "a right step fused with the per-group scatter",
        py::arg("c"), py::arg("Mt"), py::arg("dst"), py::arg("out"), py::arg("a"), py::arg("z"),
        py::arg("off"), py::arg("perm"), py::arg("C"), py::arg("aidx") = py::none(),
        py::arg("cidx") = py::none());
}
