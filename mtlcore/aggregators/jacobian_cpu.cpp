// The task Jacobian's two products that gradient-level aggregators need, for a float32 J on the CPU (AVX2 + FMA):
// the Gramian G = J Jᵀ in float64 and the update d = Jᵀw. mtlcore/aggregators/base.py builds and calls them.
//
// G: a product of two float32 numbers is exact in float64, so the only rounding is the float64 summation: the
// precision of numpy's float64 product of a converted J, without converting all of J (1.8 GB for ResNet18 × 20
// tasks) and faster than TorchJD's float32 J Jᵀ. Columns are summed in fixed chunks, each in a fixed order, and then
// the chunks in order, so G does not depend on the number of threads.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <cstdlib>
#include <vector>

namespace {
constexpr int64_t MIN_CHUNK = 1 << 16, MAX_CHUNKS = 256;  // columns per task of the parallel loop
constexpr int64_t ROWS = 4, COLS = 3;  // micro-tile: 12 accumulators, 3 + 1 operand registers of AVX2's 16

// acc[r * stride + c] += Σ_t a_r[t] · b_c[t] for r < 4, c < C (rows `ld` apart), over n columns (a multiple of
// 4), in 4 float64 lanes each. On the way it prefetches the next tile's row segment pf (pfn floats), a line per
// 4 iterations, so that reading J overlaps the arithmetic.
template <int C>
void micro(__m256d* acc, int64_t stride, const double* a, const double* b, int64_t ld, int64_t n, const float* pf,
           int64_t pfn) {
  __m256d s[ROWS][C];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) s[r][c] = acc[r * stride + c];
  for (int64_t t = 0; t < n; t += 4) {
    if (pf != nullptr && (t & 15) == 0 && t < pfn) _mm_prefetch(reinterpret_cast<const char*>(pf + t), _MM_HINT_T0);
    __m256d x[C];
    for (int c = 0; c < C; ++c) x[c] = _mm256_load_pd(b + c * ld + t);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m256d y = _mm256_load_pd(a + r * ld + t);
      for (int c = 0; c < C; ++c) s[r][c] = _mm256_fmadd_pd(y, x[c], s[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) acc[r * stride + c] = s[r][c];
}

// The 10 entries c ≥ r of the Gramian of rows a_0..a_3 with themselves (a diagonal block), as micro does.
void micro_diagonal(__m256d* acc, int64_t stride, const double* a, int64_t ld, int64_t n, const float* pf,
                    int64_t pfn) {
  __m256d s[10];
  for (int r = 0, e = 0; r < ROWS; ++r)
    for (int c = r; c < ROWS; ++c, ++e) s[e] = acc[r * stride + c];
  for (int64_t t = 0; t < n; t += 4) {
    if (pf != nullptr && (t & 15) == 0 && t < pfn) _mm_prefetch(reinterpret_cast<const char*>(pf + t), _MM_HINT_T0);
    __m256d y[ROWS];
    for (int r = 0; r < ROWS; ++r) y[r] = _mm256_load_pd(a + r * ld + t);
    for (int r = 0, e = 0; r < ROWS; ++r)
      for (int c = r; c < ROWS; ++c, ++e) s[e] = _mm256_fmadd_pd(y[r], y[c], s[e]);
  }
  for (int r = 0, e = 0; r < ROWS; ++r)
    for (int c = r; c < ROWS; ++c, ++e) acc[r * stride + c] = s[e];
}

// Lane sums of the entries (i, j ≥ i) of the Gramian of columns [c0, c1) into acc (R × R): K·(K+1)/2 products
// per column when K is a multiple of 4, and none more. The columns are converted to float64 a tile at
// a time into buf (R rows of `tile`; rows K.. stay zero and pad the last diagonal block).
void chunk_gramian(const float* J, int64_t K, int64_t ldJ, int64_t c0, int64_t c1, int64_t R, int64_t tile,
                   __m256d* acc, double* buf) {
  std::fill(acc, acc + R * R, _mm256_setzero_pd());
  for (int64_t t0 = c0; t0 < c1; t0 += tile) {
    const int64_t n = std::min(tile, c1 - t0), n4 = (n + 3) & ~int64_t(3);
    for (int64_t r = 0; r < K; ++r) {
      const float* src = J + r * ldJ + t0;
      double* dst = buf + r * tile;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) _mm256_store_pd(dst + t, _mm256_cvtps_pd(_mm_loadu_ps(src + t)));
      for (; t < n4; ++t) dst[t] = t < n ? double(src[t]) : 0.0;
    }
    // Row blocks of 4: the diagonal block's 10 entries, then the columns right of it 3 (the last 1 or 2) at a time.
    // Call m prefetches row m of the next tile.
    const int64_t next = t0 + tile, pfn = std::min(tile, c1 - next);
    int64_t m = 0;
    auto prefetch = [&]() { return m < K && pfn > 0 ? J + (m++) * ldJ + next : nullptr; };
    for (int64_t i = 0; i < K; i += ROWS) {
      const double* a = buf + i * tile;
      micro_diagonal(acc + i * R + i, R, a, tile, n4, prefetch(), pfn);
      int64_t j = i + ROWS;
      for (; j + COLS <= K; j += COLS) micro<COLS>(acc + i * R + j, R, a, buf + j * tile, tile, n4, prefetch(), pfn);
      if (K - j == 2) micro<2>(acc + i * R + j, R, a, buf + j * tile, tile, n4, prefetch(), pfn);
      if (K - j == 1) micro<1>(acc + i * R + j, R, a, buf + j * tile, tile, n4, prefetch(), pfn);
    }
  }
}
}  // namespace

torch::Tensor gramian(const torch::Tensor& J) {
  TORCH_CHECK(J.dim() == 2 && J.scalar_type() == torch::kFloat32 && J.device().is_cpu() &&
                (J.stride(1) == 1 || J.size(1) <= 1),
              "gramian: J must be a float32 CPU matrix with contiguous rows");
  TORCH_CHECK(J.size(0) >= 1, "gramian: J needs at least one row");
  const int64_t K = J.size(0), P = J.size(1), ldJ = J.stride(0);
  // Rows of the float64 tiles: K, then zero rows up to a multiple of 4 (the last diagonal block's).
  const int64_t R = (K + ROWS - 1) / ROWS * ROWS;
  // Long reads from each row of J, while the tiles stay in L2 (~256 KB).
  const int64_t tile = std::clamp<int64_t>((int64_t(1) << 15) / R / 4 * 4, 256, 2048);
  // Fixed chunks (their partial Gramians are kept, then summed in order), at most MAX_CHUNKS of them.
  const int64_t chunk = std::max(MIN_CHUNK, (P + MAX_CHUNKS - 1) / MAX_CHUNKS);
  const int64_t chunks = std::max<int64_t>(1, (P + chunk - 1) / chunk);
  std::vector<double> partial(chunks * K * K);
  const float* data = J.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m256d> acc(R * R);
    double* buf = static_cast<double*>(std::aligned_alloc(32, R * tile * sizeof(double)));
    TORCH_CHECK(buf != nullptr, "gramian: out of memory for a ", R, " x ", tile, " float64 tile");
    std::fill(buf, buf + R * tile, 0.0);
    for (int64_t c = begin; c < end; ++c) {
      chunk_gramian(data, K, ldJ, c * chunk, std::min(P, (c + 1) * chunk), R, tile, acc.data(), buf);
      double* out = partial.data() + c * K * K;
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = i; j < K; ++j) {
          alignas(32) double v[4];
          _mm256_store_pd(v, acc[i * R + j]);
          out[i * K + j] = out[j * K + i] = (v[0] + v[1]) + (v[2] + v[3]);
        }
    }
    std::free(buf);
  });
  auto G = torch::zeros({K, K}, torch::kFloat64);
  double* g = G.data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = 0; e < K * K; ++e) g[e] += partial[c * K * K + e];
  return G;
}


// d = Jᵀw = Σ_k w_k J_k in float32 (fused multiply-adds in task order, so each entry of d is rounded the same
// whatever the thread count), and whether every entry of d is finite: NaN or inf anywhere in J reaches d
// (0·inf is NaN), so the caller learns that the run diverged without another pass over J or d.
std::tuple<torch::Tensor, bool> combine(const torch::Tensor& J, const torch::Tensor& w) {
  TORCH_CHECK(J.dim() == 2 && J.scalar_type() == torch::kFloat32 && J.device().is_cpu() &&
                (J.stride(1) == 1 || J.size(1) <= 1),
              "combine: J must be a float32 CPU matrix with contiguous rows");
  TORCH_CHECK(J.size(0) >= 1 && w.dim() == 1 && w.size(0) == J.size(0) && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "combine: w must be a float32 CPU vector with one weight per row of J");
  const int64_t K = J.size(0), P = J.size(1), ldJ = J.stride(0);
  auto d = torch::empty({P}, torch::kFloat32);
  const auto wc = w.contiguous();
  const float *data = J.data_ptr<float>(), *weights = wc.data_ptr<float>();
  float* out = d.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, P, 1 << 14, [&](int64_t begin, int64_t end) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 probe = zero;  // probe += d·0 on the last group: NaN once an entry of d is NaN or inf
    bool ok = true;
    // Blocks of 2048 columns, whose sums stay in L1, and in each the rows in groups of 8 read side by side (all
    // 20 of ResNet18's at once ran 15% slower than BLAS's GEMV: too many streams for the prefetchers). Each group
    // goes on with the previous groups' sums, so every entry is one chain of fused multiply-adds in task order.
    for (int64_t b0 = begin; b0 < end; b0 += 2048) {
      const int64_t b1 = std::min(end, b0 + 2048), m8 = b0 + (b1 - b0) / 8 * 8;
      for (int64_t k0 = 0; k0 < K; k0 += 8) {
        const int64_t k1 = std::min(K, k0 + 8);
        int64_t t = b0;
        for (; t < m8; t += 8) {
          __m256 s = k0 == 0 ? _mm256_mul_ps(_mm256_set1_ps(weights[0]), _mm256_loadu_ps(data + t))
                             : _mm256_loadu_ps(out + t);
          for (int64_t k = k0 == 0 ? 1 : k0; k < k1; ++k)
            s = _mm256_fmadd_ps(_mm256_set1_ps(weights[k]), _mm256_loadu_ps(data + k * ldJ + t), s);
          _mm256_storeu_ps(out + t, s);
          if (k1 == K) probe = _mm256_fmadd_ps(s, zero, probe);
        }
        for (; t < b1; ++t) {
          float s = k0 == 0 ? weights[0] * data[t] : out[t];
          for (int64_t k = k0 == 0 ? 1 : k0; k < k1; ++k) s = std::fma(weights[k], data[k * ldJ + t], s);
          out[t] = s;
          if (k1 == K) ok = ok && std::isfinite(s);
        }
      }
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, probe);
    for (float v : lanes) ok = ok && v == 0.0f;
    if (!ok) finite = false;
  });
  return {d, finite.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("combine", &combine, py::call_guard<py::gil_scoped_release>());
  m.def("gramian", &gramian, py::call_guard<py::gil_scoped_release>());
}
