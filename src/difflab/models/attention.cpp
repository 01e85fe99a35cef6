// Multi-head self-attention, softmax(q k^T * scale) v, forward and backward, in float32 on the
// CPU, reading q, k and v straight out of the packed (B, L, 3, H, D) projection and writing the
// output as (B, L, H, D) and the gradient as (B, L, 3, H, D): the layouts the attention block
// has on either side, so no head-splitting copies are made. Built with group_norm_silu.cpp into
// one library (cpu_kernels.py).
//
// Why: at diffusion sizes (L = 256 tokens, D = 64 per head) the time is in small matrix
// products, which torch's CPU kernels send to a BLAS that runs AVX2 code on AMD CPUs
// (80-170 GFLOP/s on two cores). The register-tiled product below runs at ~230 GFLOP/s per core
// in AVX-512 with -march=native (GCC vector extensions, so it builds for any target). Rows are
// done in blocks of QB queries with the whole row of scores at hand: an exact softmax with no
// online rescaling, and its log-sum-exp kept for the backward, which recomputes the
// probabilities instead of storing them.
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_math.h"

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int MR = 8, NR = 32;  // register tile: 8 rows x 2 vectors = 16 accumulators
constexpr int64_t QB = 64;      // queries per block

// B (K x N, element (k, n) at B[k*rs + n*cs]) packed into column panels of NR, zero-padded:
// panel p holds Bp[(p*K + k)*NR + j] = B(k, p*NR + j).
void pack(int64_t K, int64_t N, const float* B, int64_t rs, int64_t cs, float* Bp) {
    for (int64_t j0 = 0; j0 < N; j0 += NR)
        for (int64_t k = 0; k < K; ++k, Bp += NR)
            for (int64_t j = 0; j < NR; ++j) Bp[j] = j0 + j < N ? B[k * rs + (j0 + j) * cs] : 0.0f;
}

// C[R x ncols] = alpha * A B (+ C when acc) for R rows of A (element (i, k) at A[i*ars + k*acs])
// and one packed panel of B.
template <int R>
void tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* Bp, float* C, int64_t ldc, int64_t ncols,
          float alpha, bool acc) {
    v16 c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = v16{};
    for (int64_t k = 0; k < K; ++k) {
        v16 b0, b1;
        std::memcpy(&b0, Bp + k * NR, 64);
        std::memcpy(&b1, Bp + k * NR + 16, 64);
        for (int r = 0; r < R; ++r) {
            const float a = A[r * ars + k * acs];
            c0[r] += a * b0;
            c1[r] += a * b1;
        }
    }
    for (int r = 0; r < R; ++r) {
        float out[NR];
        const v16 x0 = c0[r] * alpha, x1 = c1[r] * alpha;
        std::memcpy(out, &x0, 64);
        std::memcpy(out + 16, &x1, 64);
        float* c = C + r * ldc;
        if (acc)
            for (int64_t j = 0; j < ncols; ++j) c[j] += out[j];
        else
            for (int64_t j = 0; j < ncols; ++j) c[j] = out[j];
    }
}

template <int R>
void rows(int64_t K, const float* A, int64_t ars, int64_t acs, const float* Bp, float* C, int64_t ldc, int64_t ncols,
          float alpha, bool acc, int64_t left) {
    if (left == R) return tile<R>(K, A, ars, acs, Bp, C, ldc, ncols, alpha, acc);
    if constexpr (R > 1) rows<R - 1>(K, A, ars, acs, Bp, C, ldc, ncols, alpha, acc, left);
}

// C (M x N, row stride ldc) = alpha * A B (+ C when acc), B packed by pack().
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* Bp, float* C,
          int64_t ldc, float alpha, bool acc) {
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
        const float* panel = Bp + (j0 / NR) * K * NR;
        const int64_t ncols = N - j0 < NR ? N - j0 : NR;
        int64_t i = 0;
        for (; i + MR <= M; i += MR)
            tile<MR>(K, A + i * ars, ars, acs, panel, C + i * ldc + j0, ldc, ncols, alpha, acc);
        if (i < M)  // the last M % MR rows
            rows<MR - 1>(K, A + i * ars, ars, acs, panel, C + i * ldc + j0, ldc, ncols, alpha, acc, M - i);
    }
}

int64_t padded(int64_t n) { return (n + NR - 1) / NR * NR; }

// Where one (batch, head)'s matrices live: q, k, v rows of the packed projection (row stride
// 3*H*D), output rows (row stride H*D).
struct Head {
    const float *q, *k, *v;
    int64_t qkv_rs;
    int64_t o_off, o_rs;
};

Head head(const float* qkv, int64_t bh, int64_t L, int64_t H, int64_t D) {
    const int64_t b = bh / H, h = bh % H, C = H * D;
    const float* base = qkv + b * L * 3 * C + h * D;
    return {base, base + C, base + 2 * C, 3 * C, b * L * C + h * D, C};
}

// scores = scale * q k^T for queries [q0, q0 + n), each row then turned into probabilities
// exp(s - lse): the forward computes the rows' lse into lse_out, the backward passes lse_in.
void probabilities(const Head& hd, int64_t q0, int64_t n, int64_t L, int64_t D, const float* kt_packed, float scale,
                   float* S, float* lse_out, const float* lse_in) {
    gemm(n, L, D, hd.q + q0 * hd.qkv_rs, hd.qkv_rs, 1, kt_packed, S, L, scale, false);
    for (int64_t i = 0; i < n; ++i) {
        float* s = S + i * L;
        if (lse_in != nullptr) {  // backward: the forward's normaliser, no reductions
            const float lse = lse_in[i];
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) s[j] = fast_exp(s[j] - lse);
            continue;
        }
        float m = s[0];
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < L; ++j) {
            s[j] = fast_exp(s[j] - m);
            sum += s[j];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
        lse_out[i] = m + std::log(sum);
    }
}

}  // namespace

extern "C" {

// out (B, L, H, D) = attention over the packed qkv (B, L, 3, H, D); lse (B, H, L) for the backward.
void attention_forward(const float* qkv, float* out, float* lse, int64_t B, int64_t L, int64_t H, int64_t D,
                       float scale) {
    const int64_t blocks = (L + QB - 1) / QB;
#pragma omp parallel
    {
        std::vector<float> kt(D * padded(L)), vp(L * padded(D)), S(QB * L);
        int64_t packed_for = -1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * H * blocks; ++item) {
            const int64_t bh = item / blocks, q0 = item % blocks * QB, n = L - q0 < QB ? L - q0 : QB;
            const Head hd = head(qkv, bh, L, H, D);
            if (packed_for != bh) {  // static schedule: a thread's items of one head are consecutive
                pack(D, L, hd.k, 1, hd.qkv_rs, kt.data());  // k^T: (d, token)
                pack(L, D, hd.v, hd.qkv_rs, 1, vp.data());
                packed_for = bh;
            }
            probabilities(hd, q0, n, L, D, kt.data(), scale, S.data(), lse + bh * L + q0, nullptr);
            gemm(n, D, L, S.data(), L, 1, vp.data(), out + hd.o_off + q0 * hd.o_rs, hd.o_rs, 1.0f, false);
        }
    }
}

// dqkv (B, L, 3, H, D) from the output's gradient dout (B, L, H, D), with out and lse of the
// forward. Parallel over (batch, head): each owns its slices of dk and dv, summed over blocks.
void attention_backward(const float* qkv, const float* out, const float* dout, const float* lse, float* dqkv,
                        int64_t B, int64_t L, int64_t H, int64_t D, float scale) {
#pragma omp parallel
    {
        const int64_t Lp = padded(L), Dp = padded(D);
        std::vector<float> kt(D * Lp), vt(D * Lp), kp(L * Dp), qp(QB * Dp), dop(QB * Dp), P(QB * L), dP(QB * L);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const Head hd = head(qkv, bh, L, H, D);
            const int64_t grad_off = hd.q - qkv;
            float *dq = dqkv + grad_off, *dk = dq + H * D, *dv = dq + 2 * H * D;
            pack(D, L, hd.k, 1, hd.qkv_rs, kt.data());  // k^T
            pack(D, L, hd.v, 1, hd.qkv_rs, vt.data());  // v^T
            pack(L, D, hd.k, hd.qkv_rs, 1, kp.data());  // k
            for (int64_t q0 = 0; q0 < L; q0 += QB) {
                const int64_t n = L - q0 < QB ? L - q0 : QB;
                const bool acc = q0 > 0;
                const float* o = out + hd.o_off + q0 * hd.o_rs;
                const float* g = dout + hd.o_off + q0 * hd.o_rs;
                probabilities(hd, q0, n, L, D, kt.data(), scale, P.data(), nullptr, lse + bh * L + q0);
                // dv += P^T dout
                pack(n, D, g, hd.o_rs, 1, dop.data());
                gemm(L, D, n, P.data(), 1, L, dop.data(), dv, hd.qkv_rs, 1.0f, acc);
                // dP = dout v^T; dS = P * (dP - rowsum(dout * out)), scaled
                gemm(n, L, D, g, hd.o_rs, 1, vt.data(), dP.data(), L, 1.0f, false);
                for (int64_t i = 0; i < n; ++i) {
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; ++d) dot += g[i * hd.o_rs + d] * o[i * hd.o_rs + d];
                    float *ds = dP.data() + i * L;
                    const float* p = P.data() + i * L;
#pragma omp simd
                    for (int64_t j = 0; j < L; ++j) ds[j] = p[j] * (ds[j] - dot) * scale;
                }
                // dq = dS k; dk += dS^T q
                gemm(n, D, L, dP.data(), L, 1, kp.data(), dq + q0 * hd.qkv_rs, hd.qkv_rs, 1.0f, false);
                pack(n, D, hd.q + q0 * hd.qkv_rs, hd.qkv_rs, 1, qp.data());
                gemm(L, D, n, dP.data(), 1, L, qp.data(), dk, hd.qkv_rs, 1.0f, acc);
            }
        }
    }
}

}  // extern "C"
