// The fused Titans memory scan on CPU: the forward over chunks and the reverse scan with the hand-written backward.
//
// The same algorithm, arguments and results as titans/memory/scan_torch.py, which is the readable version (read it
// first; the tests hold the two equal). What this file adds is how it runs:
// - The N = batch * heads memories are independent: each thread takes whole memories and scans all of their chunks,
//   so a memory's fast weights, the carried gradients and a chunk's intermediates stay in that core's cache.
// - The chunk coefficients (decays, carries, the masked mixes C_{t,i} theta_i) are built per chunk from the gates
//   in log space, and their backward to the gates is done here too (README "The fused scan", step 3).
// - A memory's state is one buffer holding, per layer, W stacked on S ([2 d_out, d_in]): the products that read or
//   write both (the query path's Q [W; S]^T, the end state's update, dW and dS) are one call each.
// - Each product is one direct single-threaded BLAS call (sgemm / dgemm of the BLAS inside libtorch); each
//   elementwise step is one loop (the activations through glibc's vector math library when it is there).
// - What the backward needs is kept in one tensor per kept chunk: the chunk-start state and, when every chunk is
//   kept (stride 1), the chunk's intermediates, so the backward recomputes nothing. These and the outputs come from
//   a pool of buffers reused step after step (BufferPool), instead of page-faulting fresh memory in every call.
//
// Built on first use by titans/memory/scan_cpp.py; registered as torch.ops.titans.scan_forward / scan_backward.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
#ifdef TITANS_MVEC
// glibc's libmvec has 8-wide AVX2 versions of these: declared SIMD, the activation loops call them
#pragma omp declare simd notinbranch
float erff(float);
#pragma omp declare simd notinbranch
float expf(float);
#endif
}

namespace {

using at::Tensor;

// The large tensors the scan returns (kept states and intermediates, outputs and gradients) come from a pool of
// buffers that takes them back when the tensors die: a training step asks for the same sizes every time, and fresh
// multi-MB allocations are mapped and page-faulted anew on every call wherever malloc serves them with mmap (the
// titans CLI pins glibc's threshold at 4 MiB). At most TITANS_SCAN_POOL_MB (default 1024) of idle buffers are kept.
class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may be freed during interpreter exit
    return *pool;
  }

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (auto s : sizes) numel *= s;
    const size_t bytes = (size_t)numel * options.dtype().itemsize();
    if (bytes < kSmallest) return at::empty(sizes, options);
    void* data = take(bytes);
    return at::from_blob(data, sizes, [bytes](void* p) { BufferPool::instance().give(p, bytes); }, options);
  }

 private:
  static constexpr size_t kSmallest = 256 << 10;

  BufferPool() {
    const char* limit = std::getenv("TITANS_SCAN_POOL_MB");
    capacity_ = (size_t)(limit ? std::stoll(limit) : 1024) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(bytes);
      if (it != idle_.end()) {
        void* data = it->second;
        idle_.erase(it);
        cached_ -= bytes;
        return data;
      }
    }
    void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TORCH_CHECK(data != nullptr, "titans scan: out of memory allocating ", bytes, " bytes");
    return data;
  }

  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= capacity_) {
        idle_.emplace(bytes, data);
        cached_ += bytes;
        return;
      }
    }
    std::free(data);
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> idle_;
  size_t cached_ = 0, capacity_ = 0;
};

Tensor pooled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferPool::instance().empty(sizes, options);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta,
                      double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M x N] = alpha op(A) op(B) + beta C, with op(A) M x K and op(B) K x N; ta / tb: A / B stored
// transposed. Column-major BLAS computes C^T = op(B)^T op(A)^T on the same memory.
template <typename T>
void mm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
        int ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  blas_gemm(&opb, &opa, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// The products with a causal [r, r] factor, written out: only the lower triangle is computed, and at these sizes
// (r = chunk size, K = a layer width) a loop beats a BLAS call's fixed cost.
// out[t][j] = X[t] . Y[j] for j <= t (row stride ldo; the upper triangle is left as it is).
template <typename T>
void lower_dots(int r, int K, const T* X, int ldx, const T* Y, int ldy, T* out, int ldo) {
  for (int t = 0; t < r; ++t) {
    for (int j = 0; j <= t; ++j) {
      const T* x = X + (size_t)t * ldx;
      const T* y = Y + (size_t)j * ldy;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int e = 0; e < K; ++e) acc += x[e] * y[e];
      out[t * ldo + j] = acc;
    }
  }
}

// Z[t] += alpha sum_{j <= t} P[t][j] Y[j]: a lower-triangular [r, r] times [r, K].
template <typename T>
void lower_mix(int r, int K, T alpha, const T* P, int ldp, const T* Y, int ldy, T* Z, int ldz) {
  for (int t = 0; t < r; ++t) {
    T* z = Z + (size_t)t * ldz;
    for (int j = 0; j <= t; ++j) {
      const T f = alpha * P[t * ldp + j];
      const T* y = Y + (size_t)j * ldy;
#pragma omp simd
      for (int e = 0; e < K; ++e) z[e] += f * y[e];
    }
  }
}

// Z[j] += alpha sum_{t >= j} P[t][j] Y[t]: the transpose of a lower-triangular [r, r] times [r, K].
template <typename T>
void lower_mix_transposed(int r, int K, T alpha, const T* P, int ldp, const T* Y, int ldy, T* Z, int ldz) {
  for (int j = 0; j < r; ++j) {
    T* z = Z + (size_t)j * ldz;
    for (int t = j; t < r; ++t) {
      const T f = alpha * P[t * ldp + j];
      const T* y = Y + (size_t)t * ldy;
#pragma omp simd
      for (int e = 0; e < K; ++e) z[e] += f * y[e];
    }
  }
}

enum Act { kGelu = 0, kSilu = 1 };

// erf and exp of float through the names glibc's vector math library vectorises (declared SIMD above), of double
// through the standard library: one template below serves both precisions.
inline float erf_of(float x) { return erff(x); }
inline double erf_of(double x) { return std::erf(x); }
inline float exp_of(float x) { return expf(x); }
inline double exp_of(double x) { return std::exp(x); }

// sigma(z) and sigma'(z) over n values (exact-erf GELU or SiLU, as network.py).
template <typename T>
void activate(int kind, const T* z, T* f, T* d, int n) {
  if (kind == kGelu) {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const T x = z[i];
      const T cdf = T(0.5) * (T(1) + erf_of(x * T(0.70710678118654752440)));
      const T pdf = exp_of(T(-0.5) * x * x) * T(0.39894228040143267794);
      f[i] = x * cdf;
      d[i] = cdf + x * pdf;
    }
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const T x = z[i];
      const T s = T(1) / (T(1) + exp_of(-x));
      f[i] = x * s;
      d[i] = s * (T(1) + x * (T(1) - s));
    }
  }
}

// sigma''(z) over n values.
template <typename T>
void second_derivative(int kind, const T* z, T* out, int n) {
  if (kind == kGelu) {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const T x = z[i];
      out[i] = exp_of(T(-0.5) * x * x) * T(0.39894228040143267794) * (T(2) - x * x);
    }
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const T x = z[i];
      const T s = T(1) / (T(1) + exp_of(-x));
      out[i] = s * (T(1) - s) * (T(2) + x * (T(1) - T(2) * s));
    }
  }
}

template <typename T>
inline T rowdot(const T* a, const T* b, int n) {
  T acc = 0;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline T norm(const T* a, int n) {
  return std::sqrt(rowdot(a, a, n));
}

// Everything about a scan that is the same for every memory: sizes, settings and input pointers.
template <typename T>
struct Problem {
  int L = 0, n = 0, b = 0, D = 0, stride = 1, activation = kGelu;
  int64_t length = 0;  // T, tokens of the call
  bool momentum = true, forgetting = true, has_anchor = false;
  bool exact = false;  // exact_last_layer: the last layer's inner gradient at M^L_{t-1}, not at the anchor
  T clip = 0;
  std::vector<int> lengths, starts, din, dout;
  std::vector<int64_t> wsize;   // d_out * d_in per layer
  std::vector<int64_t> offset;  // where layer l's [W; S] starts in a memory's state
  int64_t state_size = 0;       // sum over layers of 2 d_out d_in
  int64_t slot_size = 0;        // one chunk's kept intermediates (SlotLayout)
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  std::vector<const T*> theta, eta, alpha;  // per layer [N, T]; eta / alpha null when switched off
  std::vector<const T*> anchor;             // per layer [N, d_out, d_in] (has_anchor)
  int n_kept = 0;

  const T* rows(const T* base, int64_t m, int c) const { return base + (m * length + starts[c]) * D; }
  int64_t token(int64_t m, int c) const { return m * length + starts[c]; }  // index of chunk c's first gate
  bool keeps_slots() const { return stride == 1; }
  int64_t kept_size() const { return state_size + (keeps_slots() ? slot_size : 0); }
};

// One layer's chunk coefficients (r rows; matrices with row stride b, zero above the diagonal), built from its
// gates in log space: lambda = log(1 - alpha), mu = log(eta); LA[t][s] = exp(sum_{s<j<=t} lambda_j),
// decay_t = exp(sum_{j<=t} lambda_j) (A_t), LE and Ebar likewise from mu; C = LA LE, carry = LA Ebar (rho),
// mix = C * theta_cols, mom_mix_i = theta_i LE[r-1][i] (theta_{r-1} at i = r-1 without momentum).
template <typename T>
struct Coefficients {
  std::vector<T> LA, LE, C, mix, decay, carry, Ebar, mom_mix;
  T end_decay = 1, end_carry = 0, mom_decay = 0;
  const T* end_mix = nullptr;  // mix's row r - 1 (omega)
  // adjoints, filled by the backward
  std::vector<T> gD, gR, gM, gMM, gLA, gLE, gE;
  T gEr = 0;
  explicit Coefficients(int b) {
    for (auto* v : {&LA, &LE, &C, &mix, &gM, &gLA, &gLE}) v->assign((size_t)b * b, T(0));
    for (auto* v : {&decay, &carry, &Ebar, &mom_mix, &gD, &gR, &gMM, &gE}) v->assign(b, T(0));
  }
};

// exp of the segment sums of x[0..r) (row stride b): out[t][s] = exp(sum_{s<j<=t} x_j) for s <= t, and
// start[t] = exp(sum_{j<=t} x_j). Summed directly (never as a difference of cumulative sums).
template <typename T>
void segment_products(const T* x, int r, int b, T* out, T* start) {
  for (int t = 0; t < r; ++t) {
    T acc = 0;
    for (int s = t; s >= 0; --s) {
      out[t * b + s] = std::exp(acc);
      acc += x[s];
    }
    start[t] = std::exp(acc);
  }
}

// d loss / d x_j for the segment products above, given their adjoints gP (lower, stride b) and gStart: only the
// strictly lower part and the start column depend on x (the diagonal is 1), so the diagonal never enters.
template <typename T>
void segment_products_backward(const T* P, const T* start, const T* gP, const T* gStart, int r, int b, T* gx) {
  for (int j = 0; j < r; ++j) gx[j] = 0;
  for (int t = 0; t < r; ++t) {
    // row t contributes to every j <= t the sum of its entries left of j: the start column and s < j
    T prefix = gStart[t] * start[t];
    for (int j = 0; j <= t; ++j) {
      gx[j] += prefix;
      prefix += gP[t * b + j] * P[t * b + j];
    }
  }
}

// Where one chunk's kept intermediates live. Per layer i: K (key pre-activations, i < L-1), G (the inner
// gradients' row factors), Bk (G^{i+1} W'^{i+1}, i < L-1), Z (query pre-activations, i < L-1), R (Q^{i-1} A^{iT},
// b x b) and the clip scales, each sized for b rows. The activations of K and Z are recomputed from them.
struct SlotLayout {
  std::vector<int64_t> K, G, Bk, Z, R, scale;
  int64_t size = 0;
  SlotLayout(int L, int b, const std::vector<int>& dout) {
    for (int i = 0; i < L; ++i) {
      const int64_t rows = (int64_t)b * dout[i];
      const bool hidden = i < L - 1;
      K.push_back(size);
      size += hidden ? rows : 0;
      G.push_back(size);
      size += rows;
      Bk.push_back(size);
      size += hidden ? rows : 0;
      Z.push_back(size);
      size += hidden ? rows : 0;
      R.push_back(size);
      size += (int64_t)b * b;
      scale.push_back(size);
      size += b;
    }
  }
};

// A thread's buffers for one chunk of one memory.
template <typename T>
struct Workspace {
  const Problem<T>& p;
  const SlotLayout layout;
  std::vector<T> own_slot;
  std::vector<Coefficients<T>> co;
  std::vector<T*> K, G, Bk, Z, R, scale;  // into the current slot
  std::vector<std::vector<T>> A, dsig, Qin, qderiv, P, dA, dG, dScale, dK;
  std::vector<T> zlast, wide1, wide2, tmp1, tmp2, tmp3, tmp4, rr, logs;
  std::vector<T> ex1, ex2, ex3, ex4, exr1, exr2, exr3, exrow;  // the exact last layer's (p.exact)

  explicit Workspace(const Problem<T>& problem) : p(problem), layout(problem.L, problem.b, problem.dout) {
    const int L = p.L, b = p.b;
    own_slot.resize(layout.size);
    co.assign(L, Coefficients<T>(b));
    for (auto* v : {&K, &G, &Bk, &Z, &R, &scale}) v->resize(L);
    for (auto* v : {&A, &dsig, &Qin, &qderiv, &P, &dA, &dG, &dScale, &dK}) v->resize(L);
    int widest = std::max(p.D, b);  // tmp2 also holds a [b, b] product
    for (int i = 0; i < L; ++i) {
      A[i].resize((size_t)b * p.din[i]);
      dsig[i].resize((size_t)b * p.dout[i]);
      Qin[i].resize((size_t)b * p.din[i]);
      qderiv[i].resize((size_t)b * p.dout[i]);
      P[i].resize((size_t)b * b);
      dA[i].resize((size_t)b * p.din[i]);
      dG[i].resize((size_t)b * p.dout[i]);
      dScale[i].resize(b);
      dK[i].resize((size_t)b * p.dout[i]);
      widest = std::max({widest, p.din[i], p.dout[i]});
    }
    zlast.resize((size_t)b * p.D);
    wide1.resize((size_t)b * 2 * widest);
    wide2.resize((size_t)b * 2 * widest);
    for (auto* v : {&tmp1, &tmp2, &tmp3, &tmp4}) v->resize((size_t)b * widest);
    rr.resize((size_t)b * b);
    logs.resize(b);
    if (p.exact) {
      for (auto* v : {&ex1, &ex2, &ex3, &ex4}) v->resize((size_t)b * 2 * widest);
      for (auto* v : {&exr1, &exr2, &exr3}) v->resize((size_t)b * b);
      exrow.resize((size_t)2 * widest);
    }
  }

  // The exact last layer reads M^L_{t-1}, the state before token t: its coefficients are layer i's rows moved down
  // by one (decay 1, carry 0 and no gradient at t = 0; mix[t - 1][j] for j < t, zero on and above the diagonal).
  T dsh(int i, int t) const { return t == 0 ? T(1) : co[i].decay[t - 1]; }
  T csh(int i, int t) const { return (t == 0 || !p.momentum) ? T(0) : co[i].carry[t - 1]; }
  T msh(int i, int t, int j) const { return j < t ? co[i].mix[(size_t)(t - 1) * p.b + j] : T(0); }

  void use_slot(T* slot) {
    for (int i = 0; i < p.L; ++i) {
      K[i] = slot + layout.K[i];
      G[i] = slot + layout.G[i];
      Bk[i] = slot + layout.Bk[i];
      Z[i] = slot + layout.Z[i];
      R[i] = slot + layout.R[i];
      scale[i] = slot + layout.scale[i];
    }
  }

  // The coefficients of every layer for chunk c (r rows) of memory m, from the gates.
  void coefficients(int64_t m, int c, int r) {
    const int b = p.b;
    const int64_t at = p.token(m, c);
    const T max_alpha = T(1) - std::numeric_limits<T>::epsilon();  // alpha == 1 would make log(0)
    for (int i = 0; i < p.L; ++i) {
      Coefficients<T>& k = co[i];
      const T* theta = p.theta[i] + at;
      if (p.forgetting) {
        const T* alpha = p.alpha[i] + at;
        for (int t = 0; t < r; ++t) logs[t] = std::log1p(-std::min(alpha[t], max_alpha));
        segment_products(logs.data(), r, b, k.LA.data(), k.decay.data());
      } else {
        for (int t = 0; t < r; ++t) {
          for (int s = 0; s <= t; ++s) k.LA[t * b + s] = T(1);
          k.decay[t] = T(1);
        }
      }
      if (p.momentum) {
        const T* eta = p.eta[i] + at;
        for (int t = 0; t < r; ++t) logs[t] = std::log(std::max(eta[t], std::numeric_limits<T>::min()));
        segment_products(logs.data(), r, b, k.LE.data(), k.Ebar.data());
        for (int t = 0; t < r; ++t) {  // C = LA LE and rho = LA Ebar, lower triangular
          T rho = 0;
          for (int s = 0; s <= t; ++s) rho += k.LA[t * b + s] * k.Ebar[s];
          k.carry[t] = rho;
          for (int j = 0; j <= t; ++j) {
            T acc = 0;
            for (int s = j; s <= t; ++s) acc += k.LA[t * b + s] * k.LE[s * b + j];
            k.C[t * b + j] = acc;
          }
        }
        k.mom_decay = k.Ebar[r - 1];
        for (int j = 0; j < r; ++j) k.mom_mix[j] = theta[j] * k.LE[(r - 1) * b + j];
        k.end_carry = k.carry[r - 1];
      } else {
        for (int t = 0; t < r; ++t)
          for (int j = 0; j <= t; ++j) k.C[t * b + j] = k.LA[t * b + j];
        for (int j = 0; j < r; ++j) k.mom_mix[j] = j == r - 1 ? theta[j] : T(0);
      }
      for (int t = 0; t < r; ++t)
        for (int j = 0; j <= t; ++j) k.mix[t * b + j] = k.C[t * b + j] * theta[j];
      k.end_decay = k.decay[r - 1];
      k.end_mix = &k.mix[(size_t)(r - 1) * b];
    }
  }

  // d loss / d gates of layer i for chunk c from the coefficient adjoints (gD, gR, gM, gEr, gMM), written at the
  // chunk's tokens of dtheta / deta / dalpha.
  void gates_backward(int i, int64_t m, int c, int r, T* dtheta, T* deta, T* dalpha) {
    const int b = p.b;
    const int64_t at = p.token(m, c);
    Coefficients<T>& k = co[i];
    const T* theta = p.theta[i] + at;
    for (int j = 0; j < r; ++j) {
      T acc = 0;
      for (int t = j; t < r; ++t) acc += k.gM[t * b + j] * k.C[t * b + j];
      dtheta[at + j] = acc + k.gMM[j] * (p.momentum ? k.LE[(r - 1) * b + j] : T(j == r - 1));
    }
    // gC = gM * theta_cols; with momentum, C = LA LE and rho = LA Ebar spread it over LA and LE
    std::fill(k.gLA.begin(), k.gLA.end(), T(0));
    if (p.momentum) {
      std::fill(k.gLE.begin(), k.gLE.end(), T(0));
      std::fill(k.gE.begin(), k.gE.end(), T(0));
      for (int t = 0; t < r; ++t) {
        for (int s = 0; s <= t; ++s) {
          T acc_la = k.gR[t] * k.Ebar[s];
          for (int j = 0; j <= s; ++j) {
            const T gc = k.gM[t * b + j] * theta[j];
            acc_la += gc * k.LE[s * b + j];
            k.gLE[s * b + j] += k.LA[t * b + s] * gc;
          }
          k.gLA[t * b + s] += acc_la;
          k.gE[s] += k.LA[t * b + s] * k.gR[t];
        }
      }
      for (int j = 0; j < r; ++j) k.gLE[(r - 1) * b + j] += k.gMM[j] * theta[j];
      k.gE[r - 1] += k.gEr;
      T* dmu = logs.data();
      segment_products_backward(k.LE.data(), k.Ebar.data(), k.gLE.data(), k.gE.data(), r, b, dmu);
      const T* eta = p.eta[i] + at;
      for (int j = 0; j < r; ++j)  // mu = log(max(eta, tiny)): no gradient below the clamp
        deta[at + j] = eta[j] >= std::numeric_limits<T>::min() ? dmu[j] / eta[j] : T(0);
    } else {
      for (int t = 0; t < r; ++t)
        for (int j = 0; j <= t; ++j) k.gLA[t * b + j] = k.gM[t * b + j] * theta[j];
    }
    if (p.forgetting) {
      T* dlambda = logs.data();
      segment_products_backward(k.LA.data(), k.decay.data(), k.gLA.data(), k.gD.data(), r, b, dlambda);
      const T* alpha = p.alpha[i] + at;
      const T max_alpha = T(1) - std::numeric_limits<T>::epsilon();
      for (int j = 0; j < r; ++j)  // lambda = log1p(-min(alpha, 1 - eps)): no gradient above the clamp
        dalpha[at + j] = alpha[j] <= max_alpha ? -dlambda[j] / (T(1) - alpha[j]) : T(0);
    }
  }

  // The keys of chunk c through the anchor network: A, K, sigma'(K), G, Bk and the clip scales. With p.exact the
  // last layer's G (and the hidden layer's Bk below it) come from `exact_last` at the chunk-start `state` instead.
  void key_path(const std::vector<const T*>& anc, const T* state, int64_t m, int c, int r) {
    const int L = p.L;
    const T* kr = p.rows(p.k, m, c);
    const T* vr = p.rows(p.v, m, c);
    std::copy(kr, kr + (size_t)r * p.D, A[0].begin());
    for (int i = 0; i < L; ++i) {
      const int di = p.din[i], dO = p.dout[i];
      if (i == L - 1 && p.exact) {
        exact_last(state, m, c, r);
        break;
      }
      T* pre = i < L - 1 ? K[i] : dK[i].data();  // the last pre-activation is needed only for G
      mm<T>(false, true, r, dO, di, T(1), A[i].data(), di, anc[i], di, T(0), pre, dO);
      if (i < L - 1) {
        activate<T>(p.activation, pre, A[i + 1].data(), dsig[i].data(), r * dO);
      } else {
        for (int e = 0; e < r * dO; ++e) G[i][e] = T(2) * (pre[e] - vr[e]);
      }
    }
    for (int i = L - 2; i >= 0; --i) {
      const int dO = p.dout[i], d2 = p.dout[i + 1];
      if (!(p.exact && i == L - 2))
        mm<T>(false, false, r, dO, d2, T(1), G[i + 1], d2, anc[i + 1], dO, T(0), Bk[i], dO);
      for (int e = 0; e < r * dO; ++e) G[i][e] = Bk[i][e] * dsig[i][e];
    }
    for (int i = 0; i < L - (p.exact ? 1 : 0); ++i) {  // (the exact last layer's scales: exact_last)
      for (int t = 0; t < r; ++t) {
        if (p.clip > 0) {
          const T nrm = norm(&G[i][(size_t)t * p.dout[i]], p.dout[i]) * norm(&A[i][(size_t)t * p.din[i]], p.din[i]);
          scale[i][t] = p.clip / std::max(p.clip, nrm);
        } else {
          scale[i][t] = T(1);
        }
      }
    }
  }

  // The exact last layer's G and clip scales, and (depth > 1) the Bk of the layer below it (scan_exact.py,
  // key_path): with a = the anchor's features, the errors e_t = M^L_{t-1} a_t - v_t by forward substitution,
  //   e_t = dsh_t W a_t + csh_t S a_t - v_t - sum_{j<t} msh[t][j] (a_t . a_j) s_j g_j,   g_t = 2 e_t,
  // then Bk_t = M^L_{t-1}^T g_t = dsh_t W^T g_t + csh_t S^T g_t - sum_{j<t} msh[t][j] s_j (g_t . g_j) a_j.
  void exact_last(const T* state, int64_t m, int c, int r) {
    const int Li = p.L - 1, di = p.din[Li], dO = p.dout[Li];
    const int cols = p.momentum ? 2 * dO : dO;
    const T* W = state + p.offset[Li];
    const T* a = A[Li].data();
    const T* vr = p.rows(p.v, m, c);
    T* base = ex1.data();  // [r, cols]: a [W; S]^T
    mm<T>(false, true, r, cols, di, T(1), a, di, W, di, T(0), base, cols);
    T* gram = exr1.data();
    lower_dots<T>(r, di, a, di, a, di, gram, r);
    T* g = G[Li];
    for (int t = 0; t < r; ++t) {
      T* gt = g + (size_t)t * dO;
      const T d = dsh(Li, t), cc = csh(Li, t);
      for (int e = 0; e < dO; ++e) {
        T x = d * base[t * cols + e] - vr[t * dO + e];
        if (p.momentum) x += cc * base[t * cols + dO + e];
        gt[e] = x;
      }
      for (int j = 0; j < t; ++j) {
        const T w = msh(Li, t, j) * gram[t * r + j] * scale[Li][j];
        const T* gj = g + (size_t)j * dO;
        for (int e = 0; e < dO; ++e) gt[e] -= w * gj[e];
      }
      for (int e = 0; e < dO; ++e) gt[e] *= T(2);
      scale[Li][t] = p.clip > 0 ? p.clip / std::max(p.clip, norm(gt, dO) * norm(&a[(size_t)t * di], di)) : T(1);
    }
    if (p.L == 1) return;
    T* bk = Bk[Li - 1];  // [r, di]
    T* gw = ex2.data();  // [r, di]: G W, then G S
    mm<T>(false, false, r, di, dO, T(1), g, dO, W, di, T(0), gw, di);
    for (int t = 0; t < r; ++t)
      for (int e = 0; e < di; ++e) bk[t * di + e] = dsh(Li, t) * gw[t * di + e];
    if (p.momentum) {
      mm<T>(false, false, r, di, dO, T(1), g, dO, W + p.wsize[Li], di, T(0), gw, di);
      for (int t = 0; t < r; ++t)
        for (int e = 0; e < di; ++e) bk[t * di + e] += csh(Li, t) * gw[t * di + e];
    }
    T* pair = exr2.data();
    lower_dots<T>(r, dO, g, dO, g, dO, pair, r);
    for (int t = 0; t < r; ++t)
      for (int j = 0; j <= t; ++j) pair[t * r + j] = msh(Li, t, j) * scale[Li][j] * pair[t * r + j];
    lower_mix<T>(r, di, T(-1), pair, r, a, di, bk, di);
  }

  // P = R * mix * s on and below the diagonal.
  void masked_mix(int i, int r) {
    const int b = p.b;
    const T* mix = co[i].mix.data();
    const T* s = scale[i];
    for (int t = 0; t < r; ++t)
      for (int j = 0; j < r; ++j) P[i][t * r + j] = j <= t ? R[i][t * r + j] * mix[t * b + j] * s[j] : T(0);
  }

  // The outputs of chunk c's rows in the dual form (into y when given), keeping what the backward needs.
  void query_path(const T* state, int64_t m, int c, int r, T* y) {
    const int L = p.L;
    const T* qr = p.rows(p.q, m, c);
    std::copy(qr, qr + (size_t)r * p.D, Qin[0].begin());
    for (int i = 0; i < L; ++i) {
      const int di = p.din[i], dO = p.dout[i];
      const T* decay = co[i].decay.data();
      T* z = i < L - 1 ? Z[i] : (y != nullptr ? y : zlast.data());
      if (p.momentum) {  // [Y_W | Y_S] = Q [W; S]^T in one product
        const T* carry = co[i].carry.data();
        T* ys = wide1.data();
        mm<T>(false, true, r, 2 * dO, di, T(1), Qin[i].data(), di, state + p.offset[i], di, T(0), ys, 2 * dO);
        for (int t = 0; t < r; ++t)
          for (int e = 0; e < dO; ++e)
            z[t * dO + e] = decay[t] * ys[t * 2 * dO + e] + carry[t] * ys[t * 2 * dO + dO + e];
      } else {
        mm<T>(false, true, r, dO, di, T(1), Qin[i].data(), di, state + p.offset[i], di, T(0), z, dO);
        for (int t = 0; t < r; ++t)
          for (int e = 0; e < dO; ++e) z[t * dO + e] *= decay[t];
      }
      lower_dots<T>(r, di, Qin[i].data(), di, A[i].data(), di, R[i], r);
      masked_mix(i, r);
      lower_mix<T>(r, dO, T(-1), P[i].data(), r, G[i], dO, z, dO);
      if (i < L - 1) activate<T>(p.activation, z, Qin[i + 1].data(), qderiv[i].data(), r * dO);
    }
  }

  // The intermediates of chunk c from its slot (the state of the workspace after key_path and query_path).
  void load(T* slot, int64_t m, int c, int r) {
    use_slot(slot);
    const T* kr = p.rows(p.k, m, c);
    const T* qr = p.rows(p.q, m, c);
    std::copy(kr, kr + (size_t)r * p.D, A[0].begin());
    std::copy(qr, qr + (size_t)r * p.D, Qin[0].begin());
    coefficients(m, c, r);
    for (int i = 0; i < p.L; ++i) {
      const int dO = p.dout[i];
      if (i < p.L - 1) {
        activate<T>(p.activation, K[i], A[i + 1].data(), dsig[i].data(), r * dO);
        activate<T>(p.activation, Z[i], Qin[i + 1].data(), qderiv[i].data(), r * dO);
      }
      masked_mix(i, r);
    }
  }

  // The chunk-end state from the chunk-start `state` into `next` (same layout; `next` may be `state` itself):
  // [W_r; S_r] = [A_r W + rho_r S; E_r S] - [(omega s) . G | (mom_mix s) . G]^T A.
  void end_state(const T* state, T* next, int r) {
    for (int i = 0; i < p.L; ++i) {
      const Coefficients<T>& k = co[i];
      const int di = p.din[i], dO = p.dout[i];
      const int64_t size = p.wsize[i];
      const T* W = state + p.offset[i];
      const T* S = W + size;
      T* Wn = next + p.offset[i];
      T* Sn = Wn + size;
      const T* s = scale[i];
      T* gg = wide1.data();  // [r, 2 d_out]: the scaled G for W, then for S
      for (int t = 0; t < r; ++t) {
        const T om = k.end_mix[t] * s[t], vs = k.mom_mix[t] * s[t];
        for (int e = 0; e < dO; ++e) {
          gg[t * 2 * dO + e] = G[i][(size_t)t * dO + e] * om;
          gg[t * 2 * dO + dO + e] = G[i][(size_t)t * dO + e] * vs;
        }
      }
      const T ed = k.end_decay, ec = k.end_carry, md = k.mom_decay;
      if (p.momentum) {
#pragma omp simd
        for (int64_t e = 0; e < size; ++e) {
          Wn[e] = ed * W[e] + ec * S[e];
          Sn[e] = md * S[e];
        }
      } else {
#pragma omp simd
        for (int64_t e = 0; e < size; ++e) {
          Wn[e] = ed * W[e];
          Sn[e] = T(0);
        }
      }
      mm<T>(true, false, 2 * dO, di, r, T(-1), gg, 2 * dO, A[i].data(), di, T(1), Wn, di);
    }
  }
};

template <typename T>
std::vector<const T*> anchor_of(const Problem<T>& p, int64_t m) {
  std::vector<const T*> out;
  for (int i = 0; i < p.L; ++i) out.push_back(p.anchor[i] + m * p.wsize[i]);
  return out;
}

template <typename T>
std::vector<const T*> weights_of(const Problem<T>& p, const T* state) {
  std::vector<const T*> out;
  for (int i = 0; i < p.L; ++i) out.push_back(state + p.offset[i]);
  return out;
}

// The VJP of one chunk (rows r) of memory m, given its start `state`, anchor, the carried gradients `carried` of
// its end state ([Omega; Psi] per layer, state layout) and dy. Writes dq, dk, dv rows and the gates' gradients at
// the chunk's tokens; leaves the start state's gradients through this chunk in `result` (state layout) and the
// anchor's in `anc_grad` (W rows only). The workspace must hold the chunk's intermediates (Workspace::load).
template <typename T>
struct Backward {
  const Problem<T>& p;
  Workspace<T>& ws;
  T *dq, *dk, *dv;
  std::vector<T*> dtheta, deta, dalpha;

  void gates_backward(int i, int64_t m, int c, int r) {
    ws.gates_backward(i, m, c, r, dtheta[i], p.momentum ? deta[i] : nullptr, p.forgetting ? dalpha[i] : nullptr);
  }

  // Adds the adjoint x of the exact last layer's shifted row t (decay, carry: row t - 1 of the layer's own).
  void shifted_row(int t, T d_decay, T d_carry) {
    if (t == 0) return;  // row 0 is the start state itself: constant
    ws.co[p.L - 1].gD[t - 1] += d_decay;
    if (p.momentum) ws.co[p.L - 1].gR[t - 1] += d_carry;
  }

  // The exact last layer as its VJPs read it: index, widths, the [r, 2 d_out] width of products with [W; S] (d_out
  // without momentum), W at the chunk-start `state` (S below it), and the workspace's G, A and clip scales.
  struct LastLayer {
    int Li, di, dO, cols;
    const T *W, *g, *a, *s;
  };
  LastLayer last_layer(const T* state) const {
    const int Li = p.L - 1, dO = p.dout[Li];
    return {Li, p.din[Li], dO, p.momentum ? 2 * dO : dO, state + p.offset[Li], ws.G[Li], ws.A[Li].data(),
            ws.scale[Li]};
  }

  // For rows X [r, d_out] that meet the shifted state through P = Y [W; S]^T [r, cols]: adds X_t . P_t (W's half,
  // then S's) to the shifted decay's and carry's adjoints, and writes [dsh . X | csh . X] into out [r, cols], so that
  // [dW; dS] += out^T Y is one product.
  void shifted_terms(const T* X, const T* P, int r, T* out) {
    const int dO = p.dout[p.L - 1];
    const int cols = p.momentum ? 2 * dO : dO;
    for (int t = 0; t < r; ++t) {
      const T d = ws.dsh(p.L - 1, t), cc = ws.csh(p.L - 1, t);
      T gd = 0, gr = 0;
      for (int e = 0; e < dO; ++e) {
        const T x = X[t * dO + e];
        gd += x * P[t * cols + e];
        out[t * cols + e] = d * x;
        if (p.momentum) {
          gr += x * P[t * cols + dO + e];
          out[t * cols + dO + e] = cc * x;
        }
      }
      shifted_row(t, gd, gr);
    }
  }

  // The VJP of the exact last layer's B_t = dsh_t W^T g_t + csh_t S^T g_t - sum_{j<t} msh[t][j] s_j (g_t . g_j) a_j
  // (scan_exact.back_backward) for dB = dback [r, d_in]: adds to dG, dA of the last layer, its [dW; dS] in
  // `result` and its coefficients' adjoints; leaves the gradient of the clipped rows s_j g_j in ws.ex4 [r, d_out].
  void exact_back_backward(const T* state, const T* dback, int r, T* result) {
    const auto [Li, di, dO, cols, W, g, a, s] = last_layer(state);
    const int b = p.b;
    T* dG = ws.dG[Li].data();
    T* gw = ws.ex1.data();  // [r, cols]: dB [W; S]^T
    mm<T>(false, true, r, cols, di, T(1), dback, di, W, di, T(0), gw, cols);
    for (int t = 0; t < r; ++t) {
      const T d = ws.dsh(Li, t), cc = ws.csh(Li, t);
      for (int e = 0; e < dO; ++e) {
        dG[t * dO + e] += d * gw[t * cols + e];
        if (p.momentum) dG[t * dO + e] += cc * gw[t * cols + dO + e];
      }
    }
    T* sg = ws.ex2.data();  // [r, cols]: [dsh . G | csh . G]
    shifted_terms(g, gw, r, sg);
    mm<T>(true, false, cols, di, r, T(1), sg, cols, dback, di, T(1), result + p.offset[Li], di);
    T* pi = ws.exr1.data();    // dB_t . a_j, then msh . pi
    T* pair = ws.exr2.data();  // g_t . g_j, then msh . s_j (g_t . g_j)
    T* xs = ws.exr3.data();    // msh . pi . s_j
    lower_dots<T>(r, di, dback, di, a, di, pi, r);
    lower_dots<T>(r, dO, g, dO, g, dO, pair, r);
    Coefficients<T>& k = ws.co[Li];
    for (int t = 0; t < r; ++t) {
      for (int j = 0; j <= t; ++j) {
        const T ms = ws.msh(Li, t, j), pr = s[j] * pair[t * r + j];
        if (j < t) k.gM[(size_t)(t - 1) * b + j] -= pr * pi[t * r + j];
        pi[t * r + j] *= ms;
        xs[t * r + j] = pi[t * r + j] * s[j];
        pair[t * r + j] = ms * pr;
      }
    }
    lower_mix<T>(r, dO, T(-1), xs, r, g, dO, dG, dO);
    T* d_rows = ws.ex4.data();
    std::fill(d_rows, d_rows + (size_t)r * dO, T(0));
    lower_mix_transposed<T>(r, dO, T(-1), pi, r, g, dO, d_rows, dO);
    lower_mix_transposed<T>(r, di, T(-1), pair, r, dback, di, ws.dA[Li].data(), di);
  }

  // The VJP of the exact last layer's forward substitution (scan_exact.errors_backward): the reverse
  // substitution, row t's error gradient dE_t complete (every later row's, its clip scale's) before it reaches
  // earlier rows; then the base term (W, S, shifted decay and carry) and the Gram term (a, shifted mix). Takes dG and
  // dScale of the last layer from outside the substitution and the rows' gradient from ws.ex4; writes dv.
  void exact_errors_backward(const T* state, int64_t m, int c, int r, T* result) {
    const auto [Li, di, dO, cols, W, g, a, s] = last_layer(state);
    const int b = p.b;
    const T* d_rows = ws.ex4.data();
    T* dA = ws.dA[Li].data();
    T* gram = ws.exr1.data();
    lower_dots<T>(r, di, a, di, a, di, gram, r);
    T* dE = ws.ex3.data();  // [r, d_out]
    T* dr = ws.exrow.data();
    for (int j = r - 1; j >= 0; --j) {
      for (int e = 0; e < dO; ++e) dr[e] = d_rows[j * dO + e];
      for (int t = j + 1; t < r; ++t) {
        const T w = ws.msh(Li, t, j) * gram[t * r + j];
        for (int e = 0; e < dO; ++e) dr[e] -= w * dE[t * dO + e];
      }
      const T* gj = g + (size_t)j * dO;
      const T* aj = a + (size_t)j * di;
      T* dEj = dE + (size_t)j * dO;
      for (int e = 0; e < dO; ++e) dEj[e] = ws.dG[Li][j * dO + e] + s[j] * dr[e];
      if (p.clip > 0) {
        const T gn = norm(gj, dO), an = norm(aj, di);
        if (gn * an > p.clip) {  // s = clip / (|g| |a|): ds/dg = -s g / |g|^2, ds/da = -s a / |a|^2
          const T kk = -(ws.dScale[Li][j] + rowdot(dr, gj, dO)) * s[j];
          for (int e = 0; e < dO; ++e) dEj[e] += kk / (gn * gn) * gj[e];
          for (int e = 0; e < di; ++e) dA[j * di + e] += kk / (an * an) * aj[e];
        }
      }
      for (int e = 0; e < dO; ++e) dEj[e] *= T(2);
    }
    T* dvr = dv + p.token(m, c) * p.D;
    for (int e = 0; e < r * dO; ++e) dvr[e] = -dE[e];
    // base: dsh_t W a_t + csh_t S a_t
    T* ew = ws.ex1.data();  // [r, d_in]: dE W, then dE S
    mm<T>(false, false, r, di, dO, T(1), dE, dO, W, di, T(0), ew, di);
    for (int t = 0; t < r; ++t)
      for (int e = 0; e < di; ++e) dA[t * di + e] += ws.dsh(Li, t) * ew[t * di + e];
    if (p.momentum) {
      mm<T>(false, false, r, di, dO, T(1), dE, dO, W + p.wsize[Li], di, T(0), ew, di);
      for (int t = 0; t < r; ++t)
        for (int e = 0; e < di; ++e) dA[t * di + e] += ws.csh(Li, t) * ew[t * di + e];
    }
    T* aw = ws.ex2.data();  // [r, cols]: a [W; S]^T
    mm<T>(false, true, r, cols, di, T(1), a, di, W, di, T(0), aw, cols);
    T* se = ws.ex1.data();  // [r, cols]: [dsh . dE | csh . dE]
    shifted_terms(dE, aw, r, se);
    mm<T>(true, false, cols, di, r, T(1), se, cols, a, di, T(1), result + p.offset[Li], di);
    // Gram: - sum_{j<t} msh[t][j] (a_t . a_j) s_j g_j
    T* ov = ws.exr2.data();  // dE_t . g_j, then d gram
    lower_dots<T>(r, dO, dE, dO, g, dO, ov, r);
    Coefficients<T>& k = ws.co[Li];
    for (int t = 0; t < r; ++t) {
      for (int j = 0; j <= t; ++j) {
        const T o = ov[t * r + j] * s[j];
        if (j < t) k.gM[(size_t)(t - 1) * b + j] -= gram[t * r + j] * o;
        ov[t * r + j] = -ws.msh(Li, t, j) * o;
      }
    }
    lower_mix<T>(r, di, T(1), ov, r, a, di, dA, di);
    lower_mix_transposed<T>(r, di, T(1), ov, r, a, di, dA, di);
  }

  void chunk(int64_t m, int c, int r, const T* state, const std::vector<const T*>& anc, const T* carried,
             const T* dy, T* result, T* anc_grad) {
    const int L = p.L, b = p.b;
    for (int i = 0; i < L; ++i) {
      std::fill(ws.dA[i].begin(), ws.dA[i].end(), T(0));
      std::fill(ws.dG[i].begin(), ws.dG[i].end(), T(0));
      std::fill(ws.dScale[i].begin(), ws.dScale[i].end(), T(0));
      Coefficients<T>& k = ws.co[i];
      for (auto* v : {&k.gD, &k.gR, &k.gMM}) std::fill(v->begin(), v->end(), T(0));
      std::fill(k.gM.begin(), k.gM.end(), T(0));
      k.gEr = 0;
    }
    // 1. the query path, last layer first (dz: gradient of Z^i, dh: of its input Q^{i-1})
    T* dz = ws.tmp3.data();
    T* dh = ws.tmp4.data();
    std::copy(dy, dy + (size_t)r * p.dout[L - 1], dz);
    for (int i = L - 1; i >= 0; --i) {
      Coefficients<T>& k = ws.co[i];
      const int di = p.din[i], dO = p.dout[i];
      const T* W = state + p.offset[i];
      const T* S = W + p.wsize[i];
      const T* h = ws.Qin[i].data();
      const T* s = ws.scale[i];
      T* x = ws.tmp1.data();
      mm<T>(false, false, r, di, dO, T(1), dz, dO, W, di, T(0), x, di);
      for (int t = 0; t < r; ++t) {
        k.gD[t] = rowdot(&x[t * di], &h[t * di], di);
        for (int e = 0; e < di; ++e) dh[t * di + e] = k.decay[t] * x[t * di + e];
      }
      if (p.momentum) {
        mm<T>(false, false, r, di, dO, T(1), dz, dO, S, di, T(0), x, di);
        for (int t = 0; t < r; ++t) {
          k.gR[t] = rowdot(&x[t * di], &h[t * di], di);
          for (int e = 0; e < di; ++e) dh[t * di + e] += k.carry[t] * x[t * di + e];
        }
      }
      // H = dz G^T; H * mix * s feeds dQ and dA; d(mix * s) = -H * R; all on and below the diagonal
      T* hg = ws.rr.data();
      T* hm = ws.tmp2.data();
      lower_dots<T>(r, dO, dz, dO, ws.G[i], dO, hg, r);
      for (int t = 0; t < r; ++t) {
        for (int j = 0; j < r; ++j) {
          if (j <= t) {
            const T H = hg[t * r + j];
            hm[t * r + j] = H * k.mix[t * b + j] * s[j];
            const T dmixed = -H * ws.R[i][t * r + j];
            k.gM[t * b + j] = dmixed * s[j];
            if (p.clip > 0) ws.dScale[i][j] += dmixed * k.mix[t * b + j];
          } else {
            hm[t * r + j] = T(0);
          }
        }
      }
      lower_mix<T>(r, di, T(-1), hm, r, ws.A[i].data(), di, dh, di);
      lower_mix_transposed<T>(r, di, T(-1), hm, r, h, di, ws.dA[i].data(), di);
      lower_mix_transposed<T>(r, dO, T(-1), ws.P[i].data(), r, dz, dO, ws.dG[i].data(), dO);
      // [dW; dS] = [decay . dz | carry . dz]^T h in one product
      const int cols = p.momentum ? 2 * dO : dO;
      T* sdz = ws.wide2.data();
      for (int t = 0; t < r; ++t) {
        for (int e = 0; e < dO; ++e) {
          sdz[t * cols + e] = k.decay[t] * dz[t * dO + e];
          if (p.momentum) sdz[t * cols + dO + e] = k.carry[t] * dz[t * dO + e];
        }
      }
      T* dW = result + p.offset[i];
      mm<T>(true, false, cols, di, r, T(1), sdz, cols, h, di, T(0), dW, di);
      if (!p.momentum) std::fill(dW + p.wsize[i], dW + 2 * p.wsize[i], T(0));
      if (i > 0) {
        for (int e = 0; e < r * di; ++e) dz[e] = dh[e] * ws.qderiv[i - 1][e];
      }
    }
    std::copy(dh, dh + (size_t)r * p.D, dq + p.token(m, c) * p.D);
    // 2. the chunk-end state
    for (int i = 0; i < L; ++i) {
      Coefficients<T>& k = ws.co[i];
      const int di = p.din[i], dO = p.dout[i];
      const int64_t size = p.wsize[i];
      const T* W = state + p.offset[i];
      const T* S = W + size;
      const T* om = carried + p.offset[i];  // Omega, then Psi below it
      const T* ps = om + size;
      T* dW = result + p.offset[i];
      T* dS = dW + size;
      const T* s = ws.scale[i];
      const T ed = k.end_decay, ec = k.end_carry, md = k.mom_decay;
      T acc_w = 0, acc_ws = 0, acc_ps = 0;
      if (p.momentum) {
#pragma omp simd reduction(+ : acc_w, acc_ws, acc_ps)
        for (int64_t e = 0; e < size; ++e) {
          dW[e] += ed * om[e];
          dS[e] += ec * om[e] + md * ps[e];
          acc_w += om[e] * W[e];
          acc_ws += om[e] * S[e];
          acc_ps += ps[e] * S[e];
        }
        k.gR[r - 1] += acc_ws;  // end_carry is rho at row r - 1
        k.gEr += acc_ps;
      } else {
#pragma omp simd reduction(+ : acc_w)
        for (int64_t e = 0; e < size; ++e) {
          dW[e] += ed * om[e];
          acc_w += om[e] * W[e];
        }
      }
      k.gD[r - 1] += acc_w;  // end_decay is A at row r - 1
      const T* g = ws.G[i];
      const T* a = ws.A[i].data();
      T* u = ws.tmp1.data();   // G Omega
      T* vv = ws.tmp2.data();  // G Psi
      mm<T>(false, false, r, di, dO, T(1), g, dO, om, di, T(0), u, di);
      mm<T>(false, false, r, di, dO, T(1), g, dO, ps, di, T(0), vv, di);
      for (int t = 0; t < r; ++t) {
        const T omt = k.end_mix[t] * s[t], vst = k.mom_mix[t] * s[t];
        const T d_om = -rowdot(&u[t * di], &a[t * di], di);
        const T d_vs = -rowdot(&vv[t * di], &a[t * di], di);
        k.gM[(r - 1) * b + t] += d_om * s[t];  // end_mix is mix's row r - 1
        k.gMM[t] += d_vs * s[t];
        if (p.clip > 0) ws.dScale[i][t] += d_om * k.end_mix[t] + d_vs * k.mom_mix[t];
        for (int e = 0; e < di; ++e) ws.dA[i][t * di + e] -= omt * u[t * di + e] + vst * vv[t * di + e];
      }
      // [A Omega^T | A Psi^T] = A [Omega; Psi]^T in one product
      T* ao = ws.wide1.data();
      mm<T>(false, true, r, 2 * dO, di, T(1), a, di, om, di, T(0), ao, 2 * dO);
      for (int t = 0; t < r; ++t) {
        const T omt = k.end_mix[t] * s[t], vst = k.mom_mix[t] * s[t];
        for (int e = 0; e < dO; ++e)
          ws.dG[i][t * dO + e] -= omt * ao[t * 2 * dO + e] + vst * ao[t * 2 * dO + dO + e];
      }
      // (the exact last layer's coefficients get more adjoints in step 4)
      if (!(p.exact && i == L - 1)) gates_backward(i, m, c, r);
    }
    // 3. the inner-gradient clip: s = clip / max(clip, |g| |a|) (the exact last layer's: in step 4)
    if (p.clip > 0) {
      for (int i = 0; i < L - (p.exact ? 1 : 0); ++i) {
        const int di = p.din[i], dO = p.dout[i];
        for (int t = 0; t < r; ++t) {
          const T* g = &ws.G[i][(size_t)t * dO];
          const T* a = &ws.A[i][(size_t)t * di];
          const T gn = norm(g, dO), an = norm(a, di), nrm = gn * an;
          if (!(nrm > p.clip)) continue;
          const T dn = -ws.dScale[i][t] * p.clip / (nrm * nrm);
          const T fg = dn * an / gn, fa = dn * gn / an;
          for (int e = 0; e < dO; ++e) ws.dG[i][t * dO + e] += fg * g[e];
          for (int e = 0; e < di; ++e) ws.dA[i][t * di + e] += fa * a[e];
        }
      }
    }
    // 4. the key path at the anchor (second order: the anchor is also where the inner gradients are taken)
    for (int i = 0; i < L; ++i) std::fill(anc_grad + p.offset[i], anc_grad + p.offset[i] + p.wsize[i], T(0));
    for (int i = 0; i < L - 1; ++i) {
      const int dO = p.dout[i], d2 = p.dout[i + 1];
      T* dback = ws.tmp1.data();
      T* d2s = ws.tmp2.data();
      second_derivative<T>(p.activation, ws.K[i], d2s, r * dO);
      for (int e = 0; e < r * dO; ++e) {
        dback[e] = ws.dG[i][e] * ws.dsig[i][e];
        ws.dK[i][e] = ws.dG[i][e] * ws.Bk[i][e] * d2s[e];
      }
      if (p.exact && i == L - 2) {  // B = M^L_{t-1}^T G^L, not through the anchor
        exact_back_backward(state, dback, r, result);
        continue;
      }
      mm<T>(false, true, r, d2, dO, T(1), dback, dO, anc[i + 1], dO, T(1), ws.dG[i + 1].data(), d2);
      mm<T>(true, false, d2, dO, r, T(1), ws.G[i + 1], d2, dback, dO, T(1), anc_grad + p.offset[i + 1], dO);
    }
    if (p.exact) {
      if (L == 1) std::fill(ws.ex4.begin(), ws.ex4.end(), T(0));  // no hidden layer: the rows feed no B
      exact_errors_backward(state, m, c, r, result);
      gates_backward(L - 1, m, c, r);
    } else {
      const int dO = p.dout[L - 1];
      T* dvr = dv + p.token(m, c) * p.D;
      for (int e = 0; e < r * dO; ++e) {
        ws.dK[L - 1][e] = T(2) * ws.dG[L - 1][e];
        dvr[e] = T(-2) * ws.dG[L - 1][e];
      }
    }
    for (int i = L - 1; i >= 0; --i) {
      const int di = p.din[i], dO = p.dout[i];
      if (!(p.exact && i == L - 1)) {  // the exact last layer's gradient point is W (result), not the anchor
        mm<T>(false, false, r, di, dO, T(1), ws.dK[i].data(), dO, anc[i], di, T(1), ws.dA[i].data(), di);
        mm<T>(true, false, dO, di, r, T(1), ws.dK[i].data(), dO, ws.A[i].data(), di, T(1), anc_grad + p.offset[i],
              di);
      }
      if (i > 0) {
        for (int e = 0; e < r * di; ++e) ws.dK[i - 1][e] += ws.dA[i][e] * ws.dsig[i - 1][e];
      }
    }
    std::copy(ws.dA[0].begin(), ws.dA[0].begin() + (size_t)r * p.D, dk + p.token(m, c) * p.D);
  }
};

void check(bool ok, const char* what) { TORCH_CHECK(ok, "titans scan: ", what); }

template <typename T>
Problem<T> make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Tensor>& theta,
                        const std::vector<Tensor>& eta, const std::vector<Tensor>& alpha,
                        const std::vector<Tensor>& w, const std::vector<Tensor>& anchor, at::IntArrayRef lengths,
                        int64_t chunk_size, int64_t activation, double clip, int64_t stride, bool exact) {
  Problem<T> p;
  p.exact = exact;
  p.L = (int)w.size();
  p.length = q.size(1);
  p.D = (int)q.size(2);
  p.b = (int)chunk_size;
  p.n = (int)lengths.size();
  p.stride = (int)std::max<int64_t>(stride, 1);
  p.activation = (int)activation;
  p.clip = (T)clip;
  p.momentum = !eta.empty();
  p.forgetting = !alpha.empty();
  p.has_anchor = !anchor.empty();
  int64_t start = 0;
  for (auto r : lengths) {
    check(r >= 1 && r <= p.b, "chunk lengths must lie in [1, chunk_size]");
    p.lengths.push_back((int)r);
    p.starts.push_back((int)start);
    start += r;
  }
  check(start == p.length, "the chunk lengths must add up to the sequence length");
  for (int i = 0; i < p.L; ++i) {
    check(w[i].dim() == 3 && w[i].size(0) == q.size(0), "weights must be [N, d_out, d_in]");
    p.dout.push_back((int)w[i].size(1));
    p.din.push_back((int)w[i].size(2));
    p.wsize.push_back(w[i].size(1) * w[i].size(2));
    p.offset.push_back(p.state_size);
    p.state_size += 2 * p.wsize.back();
  }
  check(p.din[0] == p.D && p.dout[p.L - 1] == p.D, "the memory must map D features to D features");
  for (int i = 0; i + 1 < p.L; ++i) check(p.din[i + 1] == p.dout[i], "layer widths must chain");
  p.slot_size = SlotLayout(p.L, p.b, p.dout).size;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  for (int i = 0; i < p.L; ++i) {
    p.theta.push_back(theta[i].data_ptr<T>());
    p.eta.push_back(p.momentum ? eta[i].data_ptr<T>() : nullptr);
    p.alpha.push_back(p.forgetting ? alpha[i].data_ptr<T>() : nullptr);
    if (p.has_anchor) p.anchor.push_back(anchor[i].data_ptr<T>());
  }
  p.n_kept = (p.n + p.stride - 1) / p.stride;
  return p;
}

void check_tensors(const Tensor& q, const std::vector<const std::vector<Tensor>*>& lists) {
  check(q.dim() == 3 && q.device().is_cpu(), "q, k, v must be CPU tensors [N, T, D]");
  check(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  for (const auto* list : lists)
    for (const auto& t : *list)
      check(t.is_contiguous() && t.scalar_type() == q.scalar_type() && t.device().is_cpu(),
            "every tensor must be contiguous, on the CPU, of q's dtype");
}

void check_gates(const Tensor& q, int64_t L, const std::vector<Tensor>& theta, const std::vector<Tensor>& eta,
                 const std::vector<Tensor>& alpha) {
  check((int64_t)theta.size() == L, "one theta per layer");
  check(eta.empty() || (int64_t)eta.size() == L, "eta: none or one per layer");
  check(alpha.empty() || (int64_t)alpha.size() == L, "alpha: none or one per layer");
  for (const auto* list : {&theta, &eta, &alpha})
    for (const auto& t : *list) check(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(1), "gates: [N, T]");
}

template <typename T>
void copy_state_in(const Problem<T>& p, int64_t m, const std::vector<Tensor>& w, const std::vector<Tensor>& s,
                   T* state) {
  for (int i = 0; i < p.L; ++i) {
    const T* wi = w[i].data_ptr<T>() + m * p.wsize[i];
    const T* si = s[i].data_ptr<T>() + m * p.wsize[i];
    std::copy(wi, wi + p.wsize[i], state + p.offset[i]);
    std::copy(si, si + p.wsize[i], state + p.offset[i] + p.wsize[i]);
  }
}

template <typename T>
void copy_state_out(const Problem<T>& p, int64_t m, const T* state, std::vector<Tensor>& w, std::vector<Tensor>* s) {
  for (int i = 0; i < p.L; ++i) {
    const T* src = state + p.offset[i];
    std::copy(src, src + p.wsize[i], w[i].data_ptr<T>() + m * p.wsize[i]);
    if (s) std::copy(src + p.wsize[i], src + 2 * p.wsize[i], (*s)[i].data_ptr<T>() + m * p.wsize[i]);
  }
}

// Forward: y, w_end (L), s_end (L), w_last_start (L), then the kept tensors (n_kept, each [N, kept_size]: the
// chunk-start state of every stride-th chunk, and with stride 1 also the chunk's intermediates).
template <typename T>
std::vector<Tensor> forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Tensor>& theta,
                                 const std::vector<Tensor>& eta, const std::vector<Tensor>& alpha,
                                 const std::vector<Tensor>& w0, const std::vector<Tensor>& s0,
                                 const std::vector<Tensor>& anchor, at::IntArrayRef lengths, int64_t chunk_size,
                                 int64_t activation, double clip, int64_t stride, bool save, bool exact) {
  Problem<T> p =
      make_problem<T>(q, k, v, theta, eta, alpha, w0, anchor, lengths, chunk_size, activation, clip, stride, exact);
  const int64_t N = q.size(0);
  const bool direct = save && p.keeps_slots();  // chunk c's state and slot live in kept[c] itself
  Tensor y = pooled(q.sizes(), q.options());
  std::vector<Tensor> w_end, s_end, w_last, kept;
  for (int i = 0; i < p.L; ++i) {
    for (auto* list : {&w_end, &s_end, &w_last}) list->push_back(at::empty(w0[i].sizes(), w0[i].options()));
  }
  if (save) {
    for (int j = 0; j < p.n_kept; ++j) kept.push_back(pooled({N, p.kept_size()}, q.options()));
  }
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(p);
    std::vector<T> cur(p.state_size);
    for (int64_t m = begin; m < end; ++m) {
      auto kept_at = [&](int j) { return kept[j].data_ptr<T>() + m * p.kept_size(); };
      T* state = direct ? kept_at(0) : cur.data();
      copy_state_in(p, m, w0, s0, state);
      for (int c = 0; c < p.n; ++c) {
        const int r = p.lengths[c];
        if (save && !direct && c % p.stride == 0) std::copy(state, state + p.state_size, kept_at(c / p.stride));
        if (c == p.n - 1) copy_state_out<T>(p, m, state, w_last, nullptr);
        ws.use_slot(direct ? kept_at(c) + p.state_size : ws.own_slot.data());
        ws.coefficients(m, c, r);
        const auto W = weights_of(p, state);
        ws.key_path((c == 0 && p.has_anchor) ? anchor_of(p, m) : W, state, m, c, r);
        ws.query_path(state, m, c, r, yp + p.token(m, c) * p.D);
        // kept chunks get their own copy; otherwise the state is updated in place (half the memory traffic)
        T* next = (direct && c + 1 < p.n) ? kept_at(c + 1) : cur.data();
        ws.end_state(state, next, r);
        state = next;
      }
      copy_state_out<T>(p, m, state, w_end, &s_end);
    }
  });
  std::vector<Tensor> out{y};
  for (auto* list : {&w_end, &s_end, &w_last, &kept})
    for (auto& t : *list) out.push_back(t);
  return out;
}

// Backward: dq, dk, dv, dtheta (L), deta (L, with momentum), dalpha (L, with forgetting), dW and dS of the
// initial state (L each), and the anchor's gradient (L, when the first chunk resumed mid-chunk).
template <typename T>
std::vector<Tensor> backward_impl(const Tensor& grad_y, const std::vector<Tensor>& grad_w,
                                  const std::vector<Tensor>& grad_s, const std::vector<Tensor>& grad_last,
                                  const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Tensor>& theta,
                                  const std::vector<Tensor>& eta, const std::vector<Tensor>& alpha,
                                  const std::vector<Tensor>& anchor, const std::vector<Tensor>& kept,
                                  at::IntArrayRef lengths, int64_t chunk_size, int64_t activation, double clip,
                                  int64_t stride, bool exact) {
  Problem<T> p = make_problem<T>(q, k, v, theta, eta, alpha, grad_w, anchor, lengths, chunk_size, activation, clip,
                                 stride, exact);
  const int64_t N = q.size(0);
  check((int)kept.size() == p.n_kept, "one kept tensor per kept chunk");
  for (const auto& t : kept) check(t.dim() == 2 && t.size(0) == N && t.size(1) == p.kept_size(), "kept tensor shape");
  Tensor dq = pooled(q.sizes(), q.options()), dk = pooled(q.sizes(), q.options()), dv = pooled(q.sizes(), q.options());
  std::vector<Tensor> d_theta, d_eta, d_alpha, d_w0, d_s0, d_anchor;
  for (int i = 0; i < p.L; ++i) {
    d_theta.push_back(at::empty(theta[i].sizes(), q.options()));
    if (p.momentum) d_eta.push_back(at::empty(theta[i].sizes(), q.options()));
    if (p.forgetting) d_alpha.push_back(at::empty(theta[i].sizes(), q.options()));
    for (auto* list : {&d_w0, &d_s0}) list->push_back(at::empty(grad_w[i].sizes(), q.options()));
    if (p.has_anchor) d_anchor.push_back(at::empty(grad_w[i].sizes(), q.options()));
  }
  const T* gy = grad_y.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(p);
    Backward<T> bw{p, ws, dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), {}, {}, {}};
    for (int i = 0; i < p.L; ++i) {
      bw.dtheta.push_back(d_theta[i].data_ptr<T>());
      bw.deta.push_back(p.momentum ? d_eta[i].data_ptr<T>() : nullptr);
      bw.dalpha.push_back(p.forgetting ? d_alpha[i].data_ptr<T>() : nullptr);
    }
    // with stride > 1: the recomputed group's chunk-start states and intermediates
    const int group = p.keeps_slots() ? 0 : std::min(p.stride, p.n);
    std::vector<T> starts((size_t)group * p.state_size), group_slots((size_t)group * ws.layout.size);
    std::vector<T> carried(p.state_size), result(p.state_size), anc_grad(p.state_size);
    for (int64_t m = begin; m < end; ++m) {
      auto kept_at = [&](int j) { return kept[j].data_ptr<T>() + m * p.kept_size(); };
      for (int i = 0; i < p.L; ++i) {
        const T* gw = grad_w[i].data_ptr<T>() + m * p.wsize[i];
        const T* gs = grad_s[i].data_ptr<T>() + m * p.wsize[i];
        std::copy(gw, gw + p.wsize[i], carried.begin() + p.offset[i]);
        std::copy(gs, gs + p.wsize[i], carried.begin() + p.offset[i] + p.wsize[i]);
      }
      for (int g0 = ((p.n - 1) / p.stride) * p.stride; g0 >= 0; g0 -= p.stride) {
        const int g1 = std::min(g0 + p.stride, p.n);
        if (!p.keeps_slots()) {  // recompute the group's forward from its kept start state, keeping everything
          std::copy(kept_at(g0 / p.stride), kept_at(g0 / p.stride) + p.state_size, starts.begin());
          for (int c = g0; c < g1; ++c) {
            T* state = starts.data() + (size_t)(c - g0) * p.state_size;
            ws.use_slot(group_slots.data() + (size_t)(c - g0) * ws.layout.size);
            ws.coefficients(m, c, p.lengths[c]);
            const auto W = weights_of(p, (const T*)state);
            ws.key_path((c == 0 && p.has_anchor) ? anchor_of(p, m) : W, state, m, c, p.lengths[c]);
            ws.query_path(state, m, c, p.lengths[c], nullptr);
            if (c + 1 < g1) ws.end_state(state, state + p.state_size, p.lengths[c]);
          }
        }
        for (int c = g1 - 1; c >= g0; --c) {
          const T* state = p.keeps_slots() ? kept_at(c) : starts.data() + (size_t)(c - g0) * p.state_size;
          T* slot = p.keeps_slots() ? kept_at(c) + p.state_size : group_slots.data() + (size_t)(c - g0) * ws.layout.size;
          const bool separate = c == 0 && p.has_anchor;
          const auto anc = separate ? anchor_of(p, m) : weights_of(p, state);
          ws.load(slot, m, c, p.lengths[c]);
          bw.chunk(m, c, p.lengths[c], state, anc, carried.data(), gy + p.token(m, c) * p.D, result.data(),
                   anc_grad.data());
          for (int i = 0; i < p.L; ++i) {
            T* dW = result.data() + p.offset[i];
            const T* da = anc_grad.data() + p.offset[i];
            if (separate) {
              std::copy(da, da + p.wsize[i], d_anchor[i].data_ptr<T>() + m * p.wsize[i]);
            } else {
              for (int64_t e = 0; e < p.wsize[i]; ++e) dW[e] += da[e];
            }
            if (c == p.n - 1) {  // the weights at the last chunk's start are also an output (the next anchor)
              const T* gl = grad_last[i].data_ptr<T>() + m * p.wsize[i];
              for (int64_t e = 0; e < p.wsize[i]; ++e) dW[e] += gl[e];
            }
          }
          std::swap(carried, result);
        }
      }
      copy_state_out<T>(p, m, carried.data(), d_w0, &d_s0);
    }
  });
  std::vector<Tensor> out{dq, dk, dv};
  for (auto* list : {&d_theta, &d_eta, &d_alpha, &d_w0, &d_s0, &d_anchor})
    for (auto& t : *list) out.push_back(t);
  return out;
}

std::vector<Tensor> as_vector(at::TensorList list) { return std::vector<Tensor>(list.begin(), list.end()); }

std::vector<Tensor> scan_forward(const Tensor& q, const Tensor& k, const Tensor& v, at::TensorList theta,
                                 at::TensorList eta, at::TensorList alpha, at::TensorList w0, at::TensorList s0,
                                 at::TensorList anchor, at::IntArrayRef lengths, int64_t chunk_size,
                                 int64_t activation, double clip, int64_t stride, bool save, bool exact) {
  const auto th = as_vector(theta), et = as_vector(eta), al = as_vector(alpha), wv = as_vector(w0),
             sv = as_vector(s0), av = as_vector(anchor);
  const std::vector<Tensor> qkv{q, k, v};
  check(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must have one shape");
  check(!wv.empty() && sv.size() == wv.size(), "weights and momentum: one per layer");
  check(av.empty() || av.size() == wv.size(), "anchor: none or one per layer");
  check_gates(q, (int64_t)wv.size(), th, et, al);
  check_tensors(q, {&qkv, &th, &et, &al, &wv, &sv, &av});
  if (q.scalar_type() == at::kDouble)
    return forward_impl<double>(q, k, v, th, et, al, wv, sv, av, lengths, chunk_size, activation, clip, stride, save,
                                exact);
  return forward_impl<float>(q, k, v, th, et, al, wv, sv, av, lengths, chunk_size, activation, clip, stride, save,
                             exact);
}

std::vector<Tensor> scan_backward(const Tensor& grad_y, at::TensorList grad_w, at::TensorList grad_s,
                                  at::TensorList grad_last, const Tensor& q, const Tensor& k, const Tensor& v,
                                  at::TensorList theta, at::TensorList eta, at::TensorList alpha,
                                  at::TensorList anchor, at::TensorList kept, at::IntArrayRef lengths,
                                  int64_t chunk_size, int64_t activation, double clip, int64_t stride,
                                  bool exact) {
  const auto gw = as_vector(grad_w), gs = as_vector(grad_s), gl = as_vector(grad_last), th = as_vector(theta),
             et = as_vector(eta), al = as_vector(alpha), av = as_vector(anchor), kv = as_vector(kept);
  const std::vector<Tensor> qkv{grad_y, q, k, v};
  check(grad_y.sizes() == q.sizes() && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v, dy: one shape");
  check(!gw.empty() && gs.size() == gw.size() && gl.size() == gw.size(), "per-layer lists must agree");
  check(av.empty() || av.size() == gw.size(), "anchor: none or one per layer");
  check_gates(q, (int64_t)gw.size(), th, et, al);
  check_tensors(q, {&qkv, &gw, &gs, &gl, &th, &et, &al, &av, &kv});
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(grad_y, gw, gs, gl, q, k, v, th, et, al, av, kv, lengths, chunk_size, activation,
                                 clip, stride, exact);
  return backward_impl<float>(grad_y, gw, gs, gl, q, k, v, th, et, al, av, kv, lengths, chunk_size, activation, clip,
                              stride, exact);
}

}  // namespace

TORCH_LIBRARY(titans, m) {
  m.def(
      "scan_forward(Tensor q, Tensor k, Tensor v, Tensor[] theta, Tensor[] eta, Tensor[] alpha, Tensor[] weights, "
      "Tensor[] momentum, Tensor[] anchor, int[] lengths, int chunk_size, int activation, float clip, int stride, "
      "bool save, bool exact_last) -> Tensor[]");
  m.def(
      "scan_backward(Tensor grad_y, Tensor[] grad_weights, Tensor[] grad_momentum, Tensor[] grad_last_start, "
      "Tensor q, Tensor k, Tensor v, Tensor[] theta, Tensor[] eta, Tensor[] alpha, Tensor[] anchor, Tensor[] kept, "
      "int[] lengths, int chunk_size, int activation, float clip, int stride, bool exact_last) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(titans, CPU, m) {
  m.impl("scan_forward", &scan_forward);
  m.impl("scan_backward", &scan_backward);
}
