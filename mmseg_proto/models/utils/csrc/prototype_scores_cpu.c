/*
 * One-pass CPU kernels of FusedPrototypeScores (mmseg_proto).
 *
 * Rows are pixels; each row holds the K*C scaled similarities z = s / T,
 * prototype-major (column k * C + c). Forward, per row, in one read and
 * one write of the row: the class scores best[c] = max_k z[k, c] with the
 * first winning k (as torch.max), the row maximum m, z <- exp(z - m) in
 * place and the row sum of those. Backward, per row, in one pass:
 * grad = exp(z - m) * scale, plus the PPC/PPD term at the target column and
 * the class-score gradient at each class's winner.
 *
 * Plain C, no fast-math: NaN propagates. The exp is a Cephes-style
 * polynomial (about 1 ulp in float) written so that it vectorises; the
 * loader compiles for AVX2+FMA when the CPU has them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma omp declare simd
static inline float exp_poly(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447504f ? -87.3365447504f : x; /* NaN stays NaN */
  float fx = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = ((int32_t)fx + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

void proto_scores_forward(float *restrict z, int64_t n, int64_t k, int64_t c,
                          float *restrict best, uint8_t *restrict winner,
                          float *restrict row_max, float *restrict sum_exp,
                          int threads) {
#pragma omp parallel num_threads(threads)
  {
    int32_t *w32 = (int32_t *)malloc(sizeof(int32_t) * (size_t)c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float *restrict row = z + i * k * c;
      float *restrict b = best + i * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        b[j] = row[j];
        w32[j] = 0;
      }
      for (int64_t p = 1; p < k; ++p) {
        const float *restrict slab = row + p * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          int better = slab[j] > b[j];
          b[j] = better ? slab[j] : b[j];
          w32[j] = better ? (int32_t)p : w32[j];
        }
      }
      uint8_t *restrict w = winner + i * c;
      float m = b[0];
      for (int64_t j = 0; j < c; ++j) {
        w[j] = (uint8_t)w32[j];
        m = b[j] > m ? b[j] : m;
      }
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < k * c; ++j) {
        float e = exp_poly(row[j] - m);
        row[j] = e;
        s += e;
      }
      row_max[i] = m;
      sum_exp[i] = s;
    }
    free(w32);
  }
}

void proto_scores_backward(float *e, int64_t n, int64_t k, int64_t c,
                           const float *scale, const int64_t *target,
                           const float *at_target, const uint8_t *winner,
                           const float *g_best, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    float *row = e + i * k * c;
    const float a = scale[i];
#pragma omp simd
    for (int64_t j = 0; j < k * c; ++j)
      row[j] *= a;
    if (target[i] >= 0)
      row[target[i]] += at_target[i];
    if (g_best) {
      const uint8_t *w = winner + i * c;
      const float *g = g_best + i * c;
      for (int64_t j = 0; j < c; ++j)
        row[(int64_t)w[j] * c + j] += g[j];
    }
  }
}
