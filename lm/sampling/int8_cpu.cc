// y = (x @ q) * scale for float32 rows x (M, K), an int8 matrix q (K, N) and float32
// per-column scales (N): the int8 product of the decode engine on a CPU (lm/sampling/int8_cpu.py
// builds this file with the machine's C++ compiler and registers it as an XLA FFI target).
//
// Each int8 weight is read once and converted in registers, so a batch-1 step reads a quarter
// of the bytes of a float32 one. The matrix is cut into tiles (a slab of rows of q by a range
// of at most 2048 columns, so a tile of a narrow matrix is one contiguous block of memory);
// a tile walks its rows eight at a time, each pass over all its columns, with the M rows'
// sums for 16 to 64 columns in registers. Slabs of one column range write partial sums that are
// added at the end. The XLA CPU client's thread pool and the calling thread claim tiles from
// one counter; the caller waits only for tiles already claimed, so a pool busy with other
// work cannot stall it. Each load is prefetched one pass ahead: memory answers too slowly
// for the hardware prefetcher alone (without the prefetch, products of 768-column matrices
// got 17-42% less of memory's bandwidth on a 2-core AMD EPYC). Written with GCC/Clang vector extensions; AVX2 or AVX-512 intrinsics only
// where GCC 12 would scalarise the int8 -> float conversion.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f16 __attribute__((vector_size(64), aligned(4)));

constexpr int64_t kMaxRows = 8;    // rows of x per pass (larger M: several passes)
constexpr int64_t kMaxCols = 2048; // columns per tile
constexpr int64_t kStep = 8;       // rows of q per pass over a tile's columns

struct Work {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t m, k, n;
  int64_t cols, ranges, slab, slabs, tiles;
  std::unique_ptr<float[]> part;  // (slabs, m, n) partial sums when slabs > 1 (each tile writes its own)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline f16 Load(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  f16 f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  f16 f;
  std::memcpy(&f, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&f) + sizeof(lo), &hi, sizeof(hi));
  return f;
#else  // GCC 12 scalarises __builtin_convertvector from int8 lanes; this loop it vectorises where it can
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  f16 v;
  std::memcpy(&v, f, sizeof(v));
  return v;
#endif
}

// acc[:, j - c0 : j - c0 + 16 V] += xs (steps rows of x, R each) @ q[i : i + steps, j : j + 16 V];
// V vectors of 16 columns side by side: V independent chains of multiply-adds per row of x,
// and a whole 64-byte line of each row of q per load when V = 4
template <int R, int V>
inline void Block(const Work& w, int64_t i, int64_t steps, const float (*xs)[R], int64_t j, int64_t c0,
                  int64_t width, float* acc) {
  f16 a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(&a[r][v], acc + r * width + (j - c0) + 16 * v, sizeof(f16));
  for (int64_t s = 0; s < steps; ++s) {
    // the next pass's rows (see the top)
    if (i + s + kStep < w.k) __builtin_prefetch(w.q + (i + s + kStep) * w.n + j, 0, 0);
    f16 qv[V];
    for (int v = 0; v < V; ++v) qv[v] = Load(w.q + (i + s) * w.n + j + 16 * v);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) a[r][v] += xs[s][r] * qv[v];
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(acc + r * width + (j - c0) + 16 * v, &a[r][v], sizeof(f16));
}

// acc (R, c1 - c0) += x[r0:r0+R, k0:k1] @ q[k0:k1, c0:c1]
template <int R>
void Pass(const Work& w, int64_t r0, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  constexpr int V = R <= 2 ? 4 : (R <= 4 ? 2 : 1);  // R x V sums in registers, at most 16
  const int64_t width = c1 - c0;
  for (int64_t i = k0; i < k1; i += kStep) {
    const int64_t steps = std::min(kStep, k1 - i);
    float xs[kStep][R];
    for (int64_t s = 0; s < steps; ++s)
      for (int r = 0; r < R; ++r) xs[s][r] = w.x[(r0 + r) * w.k + i + s];
    int64_t j = c0;
    for (; j + 16 * V <= c1; j += 16 * V) Block<R, V>(w, i, steps, xs, j, c0, width, acc);
    for (; j + 16 <= c1; j += 16) Block<R, 1>(w, i, steps, xs, j, c0, width, acc);
    for (; j < c1; ++j)
      for (int64_t s = 0; s < steps; ++s)
        for (int r = 0; r < R; ++r) acc[r * width + (j - c0)] += xs[s][r] * w.q[(i + s) * w.n + j];
  }
}

void Tile(Work& w, int64_t t) {
  const int64_t slab = t / w.ranges, c0 = (t % w.ranges) * w.cols, c1 = std::min(c0 + w.cols, w.n);
  const int64_t k0 = slab * w.slab, k1 = std::min(k0 + w.slab, w.k), width = c1 - c0;
  alignas(64) float acc[kMaxRows * kMaxCols];
  for (int64_t r0 = 0; r0 < w.m; r0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, w.m - r0);
    std::memset(acc, 0, sizeof(float) * rows * width);
    switch (rows) {
      case 1: Pass<1>(w, r0, k0, k1, c0, c1, acc); break;
      case 2: Pass<2>(w, r0, k0, k1, c0, c1, acc); break;
      case 3: Pass<3>(w, r0, k0, k1, c0, c1, acc); break;
      case 4: Pass<4>(w, r0, k0, k1, c0, c1, acc); break;
      case 5: Pass<5>(w, r0, k0, k1, c0, c1, acc); break;
      case 6: Pass<6>(w, r0, k0, k1, c0, c1, acc); break;
      case 7: Pass<7>(w, r0, k0, k1, c0, c1, acc); break;
      default: Pass<8>(w, r0, k0, k1, c0, c1, acc); break;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = acc + r * width;
      if (w.slabs == 1) {
        float* out = w.y + (r0 + r) * w.n + c0;
        for (int64_t j = 0; j < width; ++j) out[j] = a[j] * w.scale[c0 + j];
      } else {
        std::memcpy(w.part.get() + (slab * w.m + r0 + r) * w.n + c0, a, sizeof(float) * width);
      }
    }
  }
}

void Claim(Work& w) {
  for (int64_t t; (t = w.next.fetch_add(1, std::memory_order_relaxed)) < w.tiles;) {
    Tile(w, t);
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = q.dimensions();
  if (qd.size() != 2) return ffi::Error::InvalidArgument("int8 matmul: q must be (K, N)");
  const int64_t k = qd[0], n = qd[1];
  const auto xd = x.dimensions();
  if (k == 0 || n == 0 || xd.size() == 0 || xd[xd.size() - 1] != k || scale.element_count() != n ||
      y->element_count() != x.element_count() / k * n)
    return ffi::Error::InvalidArgument("int8 matmul: x (..., K), q (K, N) and scale (N) do not fit");
  auto w = std::make_shared<Work>();
  w->x = x.typed_data();
  w->q = q.typed_data();
  w->scale = scale.typed_data();
  w->y = y->typed_data();
  w->m = x.element_count() / k;
  w->k = k;
  w->n = n;
  if (w->m == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1), want = 4 * threads;
  w->ranges = (n + kMaxCols - 1) / kMaxCols;
  w->cols = ((n + w->ranges - 1) / w->ranges + 15) / 16 * 16;
  w->ranges = (n + w->cols - 1) / w->cols;
  // slabs of at least 64 rows of q, enough of them for about four tiles per thread
  const int64_t slabs = std::clamp<int64_t>((want + w->ranges - 1) / w->ranges, 1, std::max<int64_t>(k / 64, 1));
  w->slab = (k + slabs - 1) / slabs;
  w->slabs = (k + w->slab - 1) / w->slab;
  w->tiles = w->slabs * w->ranges;
  if (w->slabs > 1) w->part.reset(new float[w->slabs * w->m * n]);
  const int64_t helpers = std::min(threads, w->tiles) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([w] { Claim(*w); });
  Claim(*w);
  for (int spins = 0; w->done.load(std::memory_order_acquire) < w->tiles; ++spins) {
    if (spins < 4096) {  // a helper's tile takes microseconds; if it was descheduled, give way
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
  if (w->slabs > 1) {
    for (int64_t r = 0; r < w->m; ++r) {
      float* out = w->y + r * n;
      const float* p = w->part.get() + r * n;
      for (int64_t j = 0; j < n; ++j) out[j] = p[j];
      for (int64_t s = 1; s < w->slabs; ++s) {
        const float* ps = w->part.get() + (s * w->m + r) * n;
        for (int64_t j = 0; j < n; ++j) out[j] += ps[j];
      }
      for (int64_t j = 0; j < n; ++j) out[j] *= w->scale[j];
    }
  }
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

