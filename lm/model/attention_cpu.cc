// Causal attention within packed documents, float32, on a CPU: the forward pass (output and
// log-sum-exp) and the backward pass (dq, dk, dv) of model.attention="flash" on a CPU
// (lm/model/attention_cpu.py builds this file with the machine's C++ compiler and registers both
// as XLA FFI targets).
//
// Shapes: q (B, T, N, H), k and v (B, T, K, H) with head n using key/value head n / (N / K),
// start (B, T) int32: the first position of each token's document (a query at t attends to the
// keys start[t] .. t). o (B, T, N, H), lse (B, N, T).
//
// Why a kernel: written with XLA's operations, attention over blocks of queries is dozens of small
// operations per layer (slices, masks, transposes, reductions), each a pass over memory; on a
// 2-core CPU they took a quarter of the reference model's training step for 5% of its FLOPs.
// Here a block of 64 queries is one task: its scores against the keys it can see (from its
// first query's document start to its last query) stay in the task's own buffer, and every
// product is a small register-blocked matrix product over 16-float vectors.
//
// Both passes run one task per (batch row, key/value head): it transposes that head's keys (and,
// backward, values) once, walks its query heads' blocks, and owns its outputs (o and lse of its
// query heads; backward dq of its query heads, its dk and dv), so no two tasks write the same
// memory. Tasks are claimed from one counter by the caller and by helpers on the XLA CPU
// client's thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

constexpr int64_t kBlock = 64;  // queries per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Unaligned loads and stores of 16 floats. With AVX-512, intrinsics: GCC 12 compiles the
// portable memcpy through the stack and then keeps a product's sums there too (18 GFLOP/s
// against about 80 on one core with the intrinsics).
#if defined(__AVX512F__)
inline f16 Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, f16 v) { _mm512_storeu_ps(p, v); }
#else
inline f16 Load(const float* p) {
  f16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, f16 v) { std::memcpy(p, &v, sizeof(v)); }
#endif

inline f16 Splat(float x) { return f16{} + x; }

// exp(x) for 16 floats: e^r * 2^n with n = round(x log2 e) and r = x - n ln 2 in two parts
// (Cody-Waite, so r keeps its bits for large |x|), e^r by its degree-6 Taylor polynomial on
// [-ln2/2, ln2/2] (relative error about 2e-7); exactly 0 below -87 (masked scores are -inf);
// NaN stays NaN
inline f16 Exp(f16 x) {
  const f16 lo = Splat(-87.0f), hi = Splat(88.0f), magic = Splat(12582912.0f);  // 1.5 * 2^23
  const i16 keep = x >= lo, nan = x != x;
  f16 c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const f16 t = c * 1.44269504088896341f + magic;  // round to nearest: n sits in the low mantissa bits
  const f16 n = t - magic;
  f16 r = c - n * 0.693145751953125f;  // ln 2 = 0.693145751953125 (exact in 16 bits) + 1.4286068e-6
  r = r - n * 1.428606765330187e-6f;
  f16 p = Splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16 ti, pi, xi;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&pi, &p, sizeof(pi));
  std::memcpy(&xi, &x, sizeof(xi));
  pi += (ti - 0x4B400000) << 23;  // times 2^n
  pi = (pi & keep) | (xi & nan);
  f16 out;
  std::memcpy(&out, &pi, sizeof(out));
  return out;
}

inline float HMax(f16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

inline float HSum(f16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// c[r, :] (=|+=) alpha * sum_k a(r, k) * b[k, :] for R rows and 16 V columns, where a(r, k) is
// a[r * am + k * ak] and b's rows are ldb floats apart
template <int R, int V, bool Acc>
inline void Micro(int64_t kk, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
                  int64_t ldc, float alpha) {
  f16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = f16{};
  for (int64_t k = 0; k < kk; ++k) {
    f16 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Load(b + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * am + k * ak];
      for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      f16 out = acc[r][v] * alpha;
      if (Acc) out += Load(c + r * ldc + 16 * v);
      Store(c + r * ldc + 16 * v, out);
    }
}

template <int R, bool Acc>
inline void Rows(int64_t n, int64_t kk, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                 float* c, int64_t ldc, float alpha) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) Micro<R, 4, Acc>(kk, a, am, ak, b + j, ldb, c + j, ldc, alpha);
  for (; j + 16 <= n; j += 16) Micro<R, 1, Acc>(kk, a, am, ak, b + j, ldb, c + j, ldc, alpha);
  for (; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < kk; ++k) s += a[r * am + k * ak] * b[k * ldb + j];
      c[r * ldc + j] = alpha * s + (Acc ? c[r * ldc + j] : 0.0f);
    }
}

// C (m x n, rows ldc apart) (=|+=) alpha * A (m x kk; element (r, k) at a[r * am + k * ak]) @ B (kk x n)
template <bool Acc>
void Gemm(int64_t m, int64_t n, int64_t kk, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
          float* c, int64_t ldc, float alpha) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) Rows<4, Acc>(n, kk, a + r * am, am, ak, b, ldb, c + r * ldc, ldc, alpha);
  switch (m - r) {
    case 3: Rows<3, Acc>(n, kk, a + r * am, am, ak, b, ldb, c + r * ldc, ldc, alpha); break;
    case 2: Rows<2, Acc>(n, kk, a + r * am, am, ak, b, ldb, c + r * ldc, ldc, alpha); break;
    case 1: Rows<1, Acc>(n, kk, a + r * am, am, ak, b, ldb, c + r * ldc, ldc, alpha); break;
    default: break;
  }
}

// Runs fn(task) for task in [0, tasks) on the caller and up to (threads - 1) helpers of the pool.
// The caller waits only for tasks already claimed, so a pool busy with other work cannot stall it.
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const std::function<void(int64_t)>& fn) {
  struct Shared {
    std::function<void(int64_t)> fn;
    int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto s = std::make_shared<Shared>();
  s->fn = fn;
  s->tasks = tasks;
  auto claim = [](Shared& w) {
    for (int64_t t; (t = w.next.fetch_add(1, std::memory_order_relaxed)) < w.tasks;) {
      w.fn(t);
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([s, claim] { claim(*s); });
  claim(*s);
  for (int spins = 0; s->done.load(std::memory_order_acquire) < tasks; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

struct Dims {
  int64_t b, t, n, kh, h, g;
  float scale;
  int64_t qrow() const { return n * h; }   // floats between tokens in q, o, dq
  int64_t kvrow() const { return kh * h; }  // ... in k, v, dk, dv
};

inline int64_t Pad16(int64_t x) { return (x + 15) / 16 * 16; }

// kt (h x width, rows `ld` apart) = x[lo : lo + width, :] transposed; x's tokens `row` floats apart
void Transpose(const float* x, int64_t row, int64_t lo, int64_t width, int64_t h, float* kt, int64_t ld) {
  for (int64_t j = 0; j < width; ++j)
    for (int64_t d = 0; d < h; ++d) kt[d * ld + j] = x[(lo + j) * row + d];
}

// scores (rows x ld): row i holds query q0 + i against keys lo .. lo + ld - 1; keys outside
// [start[q], q] become -inf
void Mask(float* s, int64_t rows, int64_t ld, int64_t q0, int64_t lo, const int32_t* start) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t a = std::max<int64_t>(start[q0 + i] - lo, 0), e = q0 + i - lo;  // keep [a, e]
    float* row = s + i * ld;
    for (int64_t j = 0; j < std::min(a, ld); ++j) row[j] = kNegInf;
    for (int64_t j = e + 1; j < ld; ++j) row[j] = kNegInf;
  }
}

ffi::Error CheckShapes(const ffi::AnyBuffer::Dimensions& qd, const ffi::AnyBuffer::Dimensions& kd,
                       const ffi::AnyBuffer::Dimensions& vd, const ffi::AnyBuffer::Dimensions& sd, Dims* d) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 2)
    return ffi::Error::InvalidArgument("cpu attention: q (B, T, N, H), k and v (B, T, K, H), start (B, T)");
  d->b = qd[0];
  d->t = qd[1];
  d->n = qd[2];
  d->h = qd[3];
  d->kh = kd[2];
  if (kd[0] != d->b || kd[1] != d->t || kd[3] != d->h || vd[0] != d->b || vd[1] != d->t || vd[2] != d->kh ||
      vd[3] != d->h || sd[0] != d->b || sd[1] != d->t || d->kh == 0 || d->n % d->kh != 0)
    return ffi::Error::InvalidArgument("cpu attention: q, k, v and start do not fit (N must be a multiple of K)");
  d->g = d->n / d->kh;
  d->scale = d->h > 0 ? 1.0f / std::sqrt(static_cast<float>(d->h)) : 1.0f;
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start, ffi::ResultBuffer<ffi::F32> o,
                       ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto e = CheckShapes(q.dimensions(), k.dimensions(), v.dimensions(), start.dimensions(), &d); e.failure())
    return e;
  const int64_t tasks = d.b * d.kh;
  if (tasks == 0 || d.t == 0 || d.h == 0) return ffi::Error::Success();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* sp = start.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t kh = task % d.kh, b = task / d.kh, ldt = Pad16(d.t) + 16;  // room for a block's padded columns
    const int32_t* st = sp + b * d.t;
    thread_local std::vector<float> kt, s;
    float inv[kBlock];
    kt.assign(d.h * ldt, 0.0f);
    s.resize(kBlock * ldt);
    const float* kb = kp + (b * d.t * d.kh + kh) * d.h;  // token j of this head: kb + j * kvrow
    const float* vb = vp + (b * d.t * d.kh + kh) * d.h;
    Transpose(kb, d.kvrow(), 0, d.t, d.h, kt.data(), ldt);
    for (int64_t n = kh * d.g; n < (kh + 1) * d.g; ++n) {
      for (int64_t q0 = 0; q0 < d.t; q0 += kBlock) {
        const int64_t rows = std::min(kBlock, d.t - q0);
        const int64_t lo = std::clamp<int64_t>(st[q0], 0, q0), width = q0 + rows - lo, ld = Pad16(width);
        const int64_t at = (b * d.t + q0) * d.n + n;  // token q0 of head n in q and o
        Gemm<false>(rows, ld, d.h, qp + at * d.h, d.qrow(), 1, kt.data() + lo, ldt, s.data(), ld, d.scale);
        Mask(s.data(), rows, ld, q0, lo, st);
        float* lrow = lp + (b * d.n + n) * d.t + q0;
        for (int64_t i = 0; i < rows; ++i) {
          float* row = s.data() + i * ld;
          f16 mv = Splat(kNegInf);
          for (int64_t j = 0; j < ld; j += 16) mv = Load(row + j) > mv ? Load(row + j) : mv;
          const float m = HMax(mv);  // finite: a query always sees itself
          f16 sv = f16{};
          for (int64_t j = 0; j < ld; j += 16) {
            const f16 p = Exp(Load(row + j) - m);
            Store(row + j, p);
            sv += p;
          }
          const float l = HSum(sv);
          inv[i] = 1.0f / l;
          lrow[i] = m + std::log(l);
        }
        // o = (exp(s - m) v) / l: the division on the (rows, H) product, not on the scores
        float* ob = op + at * d.h;
        Gemm<false>(rows, d.h, width, s.data(), ld, 1, vb + lo * d.kvrow(), d.kvrow(), ob, d.qrow(), 1.0f);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t x = 0; x < d.h; ++x) ob[i * d.qrow() + x] *= inv[i];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto e = CheckShapes(q.dimensions(), k.dimensions(), v.dimensions(), start.dimensions(), &d); e.failure())
    return e;
  if (dout.element_count() != q.element_count() || lse.element_count() != d.b * d.n * d.t)
    return ffi::Error::InvalidArgument("cpu attention backward: lse or the output gradient do not fit q");
  const int64_t tasks = d.b * d.kh;
  if (tasks == 0 || d.t == 0 || d.h == 0) return ffi::Error::Success();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *lp = lse.typed_data(), *dop = dout.typed_data();
  const int32_t* sp = start.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t kh = task % d.kh, b = task / d.kh, ldt = Pad16(d.t) + 16;  // room for a block's padded columns
    const int32_t* st = sp + b * d.t;
    thread_local std::vector<float> kt, vt, gk, gv, s, dp, delta;
    kt.assign(d.h * ldt, 0.0f);
    vt.assign(d.h * ldt, 0.0f);
    gk.assign(d.t * d.h, 0.0f);  // dk, dv of this head, (T, H)
    gv.assign(d.t * d.h, 0.0f);
    s.resize(kBlock * ldt);
    dp.resize(kBlock * ldt);
    delta.resize(kBlock);
    const float* kb = kp + (b * d.t * d.kh + kh) * d.h;
    const float* vb = vp + (b * d.t * d.kh + kh) * d.h;
    Transpose(kb, d.kvrow(), 0, d.t, d.h, kt.data(), ldt);
    Transpose(vb, d.kvrow(), 0, d.t, d.h, vt.data(), ldt);
    for (int64_t n = kh * d.g; n < (kh + 1) * d.g; ++n) {
      for (int64_t q0 = 0; q0 < d.t; q0 += kBlock) {
        const int64_t rows = std::min(kBlock, d.t - q0);
        const int64_t lo = std::clamp<int64_t>(st[q0], 0, q0), width = q0 + rows - lo, ld = Pad16(width);
        const int64_t at = (b * d.t + q0) * d.n + n;  // token q0 of head n in q, o, dq, dout
        const float *qb = qp + at * d.h, *gob = dop + at * d.h;
        const float* lrow = lp + (b * d.n + n) * d.t + q0;
        // P = exp(scale q k^T - lse), masked; dP = dout v^T; dS = P (dP - delta)
        Gemm<false>(rows, ld, d.h, qb, d.qrow(), 1, kt.data() + lo, ldt, s.data(), ld, d.scale);
        Mask(s.data(), rows, ld, q0, lo, st);
        Gemm<false>(rows, ld, d.h, gob, d.qrow(), 1, vt.data() + lo, ldt, dp.data(), ld, 1.0f);
        for (int64_t i = 0; i < rows; ++i) {
          // delta = sum_j P dP over the row in cache: the softmax's own Jacobian (sum(dout o),
          // the usual shortcut, leaves rounding noise where the gradient is exactly 0)
          const f16 l = Splat(lrow[i]);
          float *row = s.data() + i * ld, *drow = dp.data() + i * ld;
          f16 acc = f16{};
          for (int64_t j = 0; j < ld; j += 16) {
            const f16 p = Exp(Load(row + j) - l);
            Store(row + j, p);
            acc += p * Load(drow + j);
          }
          const f16 delta = Splat(HSum(acc));
          for (int64_t j = 0; j < ld; j += 16) Store(drow + j, Load(row + j) * (Load(drow + j) - delta));
        }
        // dq = scale dS k; dk += scale dS^T q; dv += P^T dout
        Gemm<false>(rows, d.h, width, dp.data(), ld, 1, kb + lo * d.kvrow(), d.kvrow(), dqp + at * d.h, d.qrow(),
                    d.scale);
        Gemm<true>(width, d.h, rows, dp.data(), 1, ld, qb, d.qrow(), gk.data() + lo * d.h, d.h, d.scale);
        Gemm<true>(width, d.h, rows, s.data(), 1, ld, gob, d.qrow(), gv.data() + lo * d.h, d.h, 1.0f);
      }
    }
    float* dkb = dkp + (b * d.t * d.kh + kh) * d.h;
    float* dvb = dvp + (b * d.t * d.kh + kh) * d.h;
    for (int64_t j = 0; j < d.t; ++j) {
      std::memcpy(dkb + j * d.kvrow(), gk.data() + j * d.h, sizeof(float) * d.h);
      std::memcpy(dvb + j * d.kvrow(), gv.data() + j * d.h, sizeof(float) * d.h);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
