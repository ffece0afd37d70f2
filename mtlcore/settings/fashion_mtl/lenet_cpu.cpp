// LeNet's two conv blocks for the CPU (AVX2 + FMA); mtlcore/models/fused.py builds and dispatches them.
// Block 1, conv(1→C, 5×5) → max-pool 2×2 → ReLU on 28×28 images, forward and backward in one pass each: oneDNN's
// kernels suit one input channel badly (its weight gradient does not even use a second thread). Block 2's backward,
// conv(Ci→Co, 5×5) → Dropout2d → max-pool → ReLU, uses the sparsity of its gradient. Max-pool routes each
// gradient to its window's maximum as PyTorch's does (the first maximum in row-major order, NaN taking
// precedence), and weight gradients are summed over fixed chunks of 16 images, then the chunks in order in
// float64, so they do not depend on the number of threads.
#include <torch/extension.h>
#include <immintrin.h>
#include <cstring>
#include <ATen/Parallel.h>
#include <vector>

namespace {
constexpr int H = 28, K = 5, O = 24, P = 12, HH = 14;  // image, kernel, conv output, pooled, half image width

// The image's even and odd columns, each row padded to 16: conv outputs at even and odd x then load contiguously.
void deinterleave(const float* img, float* even, float* odd) {
  for (int y = 0; y < H; ++y)
    for (int j = 0; j < 16; ++j) {
      even[y * 16 + j] = j < HH ? img[y * H + 2 * j] : 0.0f;
      odd[y * 16 + j] = j < HH ? img[y * H + 2 * j + 1] : 0.0f;
    }
}

// Three vectors holding a row's 24 conv outputs: E[0..7] (x = 0, 2, ..., 14), E[8..11] | D[8..11], D[0..7]
// (D: odd x), read from the even-output source (E lanes) and the odd-output source (D lanes).
inline void load_row(const float* even_col, const float* odd_col, __m256 v[3]) {
  v[0] = _mm256_loadu_ps(even_col);
  v[1] = _mm256_loadu2_m128(odd_col + 8, even_col + 8);  // high half: D lanes 8..11, low half: E lanes 8..11
  v[2] = _mm256_loadu_ps(odd_col);
}

// conv outputs of rows y0 = 2py and y0 + 1 of G channels (weights w, w + 25, ...), in the layout of load_row. Each
// output sums the bias and then w[ky][kx]·input in (ky, kx) order. Two channels at once: each input vector loaded
// serves both, and the 12 independent sums keep the FMA units busy.
template <int G>
inline void conv_rows(const float* even, const float* odd, const float* w, const float* bias, int y0,
                      __m256 A[G][3], __m256 B[G][3]) {
  for (int j = 0; j < G; ++j)
    for (int i = 0; i < 3; ++i) A[j][i] = B[j][i] = _mm256_set1_ps(bias[j]);
  for (int r = 0; r <= K; ++r) {  // input row y0 + r: tap row r of output row y0, tap row r - 1 of y0 + 1
    const float* ev = even + (y0 + r) * 16;
    const float* od = odd + (y0 + r) * 16;
    for (int kx = 0; kx < K; ++kx) {
      const int m = kx >> 1;
      // x = 2i + kx is the even column 2(i+m) when kx is even, the odd column 2(i+m)+1 when it is odd;
      // x = 2i + 1 + kx is the odd column 2(i+m)+1 when kx is even, the even column 2(i+m+1) when it is odd
      __m256 v[3];  // the inputs under tap (r, kx) for the 24 outputs, in load_row's layout
      load_row((kx & 1 ? od : ev) + m, (kx & 1 ? ev + 1 : od) + m, v);
      for (int j = 0; j < G; ++j) {
        if (r < K) {
          const __m256 wv = _mm256_broadcast_ss(w + j * K * K + r * K + kx);
          for (int i = 0; i < 3; ++i) A[j][i] = _mm256_fmadd_ps(wv, v[i], A[j][i]);
        }
        if (r > 0) {
          const __m256 wv = _mm256_broadcast_ss(w + j * K * K + (r - 1) * K + kx);
          for (int i = 0; i < 3; ++i) B[j][i] = _mm256_fmadd_ps(wv, v[i], B[j][i]);
        }
      }
    }
  }
}

inline __m256 take_mask(__m256 v, __m256 best) {  // v > best, or v is NaN: PyTorch's max-pool update rule
  return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// Max-pool (PyTorch's rule) and ReLU of one channel's rows A (2py) and B (2py + 1): 12 outputs (of 16 lanes) and
// the position of each maximum.
inline void pool_rows(const __m256 A[3], const __m256 B[3], float* pooled, int32_t* where_out) {
  // window order (0,0) (0,1) (1,0) (1,1): E of row A, D of row A, E of row B, D of row B. In lanes: the E values
  // of pooled columns 0..7 are A[0], their D values A[2]; columns 8..11 have E in A[1]'s low half, D in its high.
  const __m256 e0[2] = {A[0], _mm256_permute2f128_ps(A[1], A[1], 0x00)};
  const __m256 d0[2] = {A[2], _mm256_permute2f128_ps(A[1], A[1], 0x11)};
  const __m256 e1[2] = {B[0], _mm256_permute2f128_ps(B[1], B[1], 0x00)};
  const __m256 d1[2] = {B[2], _mm256_permute2f128_ps(B[1], B[1], 0x11)};
  const __m256 zero = _mm256_setzero_ps();
  for (int part = 0; part < 2; ++part) {
    __m256 best = e0[part], where = zero, m;
    m = take_mask(d0[part], best); best = _mm256_blendv_ps(best, d0[part], m); where = _mm256_blendv_ps(where, _mm256_set1_ps(1), m);
    m = take_mask(e1[part], best); best = _mm256_blendv_ps(best, e1[part], m); where = _mm256_blendv_ps(where, _mm256_set1_ps(2), m);
    m = take_mask(d1[part], best); best = _mm256_blendv_ps(best, d1[part], m); where = _mm256_blendv_ps(where, _mm256_set1_ps(3), m);
    const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(best, zero, _CMP_GT_OQ), _mm256_cmp_ps(best, best, _CMP_UNORD_Q));
    _mm256_storeu_ps(pooled + part * 8, _mm256_blendv_ps(zero, best, keep));  // ReLU (NaN stays NaN)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(where_out + part * 8), _mm256_cvttps_epi32(where));
  }
}

inline void axpy(float* __restrict__ y, const float* __restrict__ x, float a, int64_t n) {  // y += a·x
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
}  // namespace

// x: N×28×28 float32; w: C×25; b: C. Returns ReLU(max-pool(conv)) as N×C×12×12 in channels-last memory, and the
// position (0..3, row-major in the window) of each maximum, as int32 N×C×12×16 (rows padded to 16).
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t N = x.size(0), C = w.size(0);
  auto out = at::empty({N, C, P, P}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto idx = at::empty({N, C, P, 16}, x.options().dtype(at::kInt));
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int32_t* ip = idx.data_ptr<int32_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float even[H * 16], odd[H * 16];
    std::vector<float> pooled(C * P * 16);  // one image's output, channel-major, before its channels-last copy
    for (int64_t n = begin; n < end; ++n) {
      deinterleave(xp + n * H * H, even, odd);
      for (int py = 0; py < P; ++py) {
        int64_t c = 0;
        for (; c + 2 <= C; c += 2) {
          __m256 A[2][3], B[2][3];  // rows 2py and 2py + 1 of channels c and c + 1
          conv_rows<2>(even, odd, wp + c * K * K, bp + c, 2 * py, A, B);
          for (int j = 0; j < 2; ++j) {
            const int64_t row = ((c + j) * P + py) * 16;
            pool_rows(A[j], B[j], pooled.data() + row, ip + n * C * P * 16 + row);
          }
        }
        for (; c < C; ++c) {
          __m256 A[1][3], B[1][3];
          conv_rows<1>(even, odd, wp + c * K * K, bp + c, 2 * py, A, B);
          const int64_t row = (c * P + py) * 16;
          pool_rows(A[0], B[0], pooled.data() + row, ip + n * C * P * 16 + row);
        }
      }
      for (int py = 0; py < P; ++py)
        for (int px = 0; px < P; ++px)
          for (int64_t c = 0; c < C; ++c) op[((n * P + py) * P + px) * C + c] = pooled[(c * P + py) * 16 + px];
    }
  });
  return {out, idx};
}

// d loss / d w (C×1×5×5) and d loss / d b (C) from d loss / d out. Each pooled output's gradient goes to its
// window's maximum only, so the weight gradient adds one 5×5 input patch per pooled output and channel (a quarter
// of a dense correlation).
std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& out,
                                 const at::Tensor& idx) {
  const int64_t N = x.size(0), C = out.size(1), chunk = 16, chunks = (N + chunk - 1) / chunk, S = K * K + 1;
  auto grad = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  auto partial = at::zeros({chunks, C, S}, x.options().dtype(at::kDouble));
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>(), *op = out.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float last[H * H + 8] = {0};  // the batch's last image, padded: a patch row is read as 8 floats
    std::vector<__m256> sums(C * K);  // per channel and patch row: lanes kx = 0..4 (5..7 unused)
    std::vector<float> bias_sums(C);
    for (int64_t ch = begin; ch < end; ++ch) {
      std::fill(sums.begin(), sums.end(), _mm256_setzero_ps());
      std::fill(bias_sums.begin(), bias_sums.end(), 0.0f);
      for (int64_t n = ch * chunk; n < std::min(N, (ch + 1) * chunk); ++n) {
        const float* img = xp + n * H * H;
        if (n == N - 1) img = static_cast<const float*>(std::memcpy(last, img, sizeof(float) * H * H));
        for (int64_t c = 0; c < C; ++c) {
          __m256 acc[K] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                           _mm256_setzero_ps()};
          float bias_sum = 0.0f;
          for (int py = 0; py < P; ++py)
            for (int px = 0; px < P; ++px) {
              const int64_t o = ((n * P + py) * P + px) * C + c;
              const float value = (op[o] > 0.0f) | (op[o] != op[o]) ? gp[o] : 0.0f;  // ReLU passes where input > 0
              const int k = ip[((n * C + c) * P + py) * 16 + px];
              const float* patch = img + (2 * py + (k >> 1)) * H + 2 * px + (k & 1);
              const __m256 v = _mm256_set1_ps(value);
              for (int ky = 0; ky < K; ++ky)
                acc[ky] = _mm256_fmadd_ps(v, _mm256_loadu_ps(patch + ky * H), acc[ky]);  // lanes 5..7 unused
              bias_sum += value;
            }
          for (int ky = 0; ky < K; ++ky) sums[c * K + ky] = _mm256_add_ps(sums[c * K + ky], acc[ky]);
          bias_sums[c] += bias_sum;
        }
      }
      double* total = pp + ch * C * S;
      for (int64_t c = 0; c < C; ++c) {
        for (int ky = 0; ky < K; ++ky) {
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, sums[c * K + ky]);
          for (int kx = 0; kx < K; ++kx) total[c * S + ky * K + kx] = lanes[kx];
        }
        total[c * S + K * K] = bias_sums[c];
      }
    }
  });
  auto total = partial.sum(0).to(at::kFloat);  // chunks summed in float64, in order
  return {total.narrow(1, 0, K * K).reshape({C, 1, K, K}).contiguous(), total.select(1, K * K).contiguous()};
}

// The backward of LeNet's second block, ReLU(max-pool₂(dropout2d(conv(h)))) with conv 10→20 (5×5) on 12×12 maps.
// Its gradient at the conv output is sparse: dropped maps get none, and each pooled output sends its gradient to one
// of its four positions (if ReLU lets it through). So each non-zero adds one input patch to the weight gradient and
// one weight patch to the input gradient: ~1/8 of the dense backward's work. Channels-last memory throughout: h is
// N×12×12×Ci, w Co×5×5×Ci; a patch row (5 positions × Ci) is contiguous in both.
// grad, out: N×Co×4×4 (any layout); where: N×Co×4×4 int64 positions in the 8×8 conv output; scale: N×Co (dropout).
std::vector<at::Tensor> block2_backward(const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& where_in,
                                        const at::Tensor& scale_in, const at::Tensor& h_in, const at::Tensor& w_in) {
  const int64_t N = h_in.size(0), Ci = h_in.size(1), Hi = h_in.size(2), Co = w_in.size(0), Q = 4, Oc = Hi - K + 1;
  const int64_t row = K * Ci, patch = K * row, chunk = 16, chunks = (N + chunk - 1) / chunk;
  auto grad = grad_in.contiguous(), out = out_in.contiguous(), where = where_in.contiguous(), scale = scale_in.contiguous();
  auto h = h_in.contiguous(at::MemoryFormat::ChannelsLast), w = w_in.contiguous(at::MemoryFormat::ChannelsLast);
  auto grad_h = at::zeros_like(h, at::MemoryFormat::ChannelsLast);
  auto partial = at::zeros({chunks, Co, patch + 1}, h.options().dtype(at::kDouble));
  const float *gp = grad.data_ptr<float>(), *op = out.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const float *hp = h.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int64_t* ip = where.data_ptr<int64_t>();
  float* ghp = grad_h.data_ptr<float>();
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(Co * (patch + 1));
    for (int64_t ch = begin; ch < end; ++ch) {
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t n = ch * chunk; n < std::min(N, (ch + 1) * chunk); ++n) {
        const float* hn = hp + n * Hi * Hi * Ci;
        float* ghn = ghp + n * Hi * Hi * Ci;
        for (int64_t o = 0; o < Co; ++o) {
          const float s = sp[n * Co + o];
          if (s == 0.0f) continue;  // a dropped map: no gradient anywhere in it
          float* gw = sums.data() + o * (patch + 1);
          const float* wo = wp + o * patch;
          for (int64_t q = 0; q < Q * Q; ++q) {
            const int64_t e = (n * Co + o) * Q * Q + q;
            if (!(op[e] > 0.0f || op[e] != op[e])) continue;  // ReLU passes the gradient where its input > 0
            const float v = gp[e] * s;
            const int64_t y = ip[e] / Oc, x = ip[e] % Oc;  // the window's maximum in the conv output
            gw[patch] += v;
            for (int ky = 0; ky < K; ++ky) {
              const float* hr = hn + ((y + ky) * Hi + x) * Ci;
              float* ghr = ghn + ((y + ky) * Hi + x) * Ci;
              float* gwr = gw + ky * row;
              const float* wr = wo + ky * row;
              axpy(gwr, hr, v, row);
              axpy(ghr, wr, v, row);
            }
          }
        }
      }
      double* total = pp + ch * Co * (patch + 1);
      for (int64_t i = 0; i < Co * (patch + 1); ++i) total[i] = sums[i];
    }
  });
  auto total = partial.sum(0).to(at::kFloat);  // chunks summed in float64, in order
  // the weight gradient in w's channels-last memory order (o, ky, kx, c), returned as an o×c×ky×kx tensor
  auto grad_w = total.narrow(1, 0, patch).reshape({Co, K, K, Ci}).permute({0, 3, 1, 2});
  return {grad_h, grad_w.contiguous(at::MemoryFormat::ChannelsLast), total.select(1, patch).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  m.def("block2_backward", &block2_backward, py::call_guard<py::gil_scoped_release>());
}
