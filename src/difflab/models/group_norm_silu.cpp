// GroupNorm (of x + a per-channel shift, optionally), optionally followed by SiLU and then
// dropout, as one kernel, forward and backward, for float32 and bfloat16 feature maps in NCHW or
// channels_last layout on the CPU. The shift is a ResBlock's timestep embedding: folded into the
// statistics and the affine map in closed form, so adding it costs no pass over the map.
//
// Built by cpu_kernels.py with the system C++ compiler (no torch headers, so it compiles in about
// a second) and called through ctypes by the operators of group_norm_silu.py, which check the
// pointers' tensors (dtype, shape, layout) before they get here. Parallel regions use OpenMP; the
// library links the libgomp.so.1 that torch already loaded, so it shares torch's thread pool
// and torch.set_num_threads.
//
// Why: torch's channels_last GroupNorm kernel on the CPU is 2-3x its NCHW kernel in float32 and
// ~40x in bfloat16, which kept channels_last (where oneDNN's convolutions are 1.2-1.5x faster
// and need no reorders) out of reach; GroupNorm -> SiLU -> dropout as three kernels reads and
// writes the map three times, and torch draws the dropout mask serially. Here the forward reads
// x twice (statistics, then normalise + activate + drop) and writes the output once; the
// backward reads x and the incoming gradient once, then its own dy, and writes dx. Sums go
// to double, so E[x^2] - E[x]^2 loses nothing to cancellation.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_math.h"

namespace {

inline float sigmoid(float t) { return 1.0f / (1.0f + fast_exp(-t)); }

// Dropout after the SiLU, its mask a counter-based hash of (seeds, element index): drawn in the
// loops at no memory cost, recomputed identically by the backward instead of stored, and 16
// lanes at a time where torch's CPU generator draws one number after another. The index is the
// element's NCHW one (b*C*P + c*P + p, mod 2^32) in either layout, so the mask does not depend
// on the layout, and group_norm_silu.py's torch fallback computes the same hash.
struct Drop {
    uint32_t s1, s2;   // two random seeds per call, from torch's generator
    uint32_t cut;      // keep when the hash's top 24 bits are >= cut = round(p * 2^24)
    float scale;       // 1 / (1 - p)
};

inline uint32_t mix(uint32_t x) {  // Wellons' lowbias32 integer hash
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

inline float keep_scale(const Drop& d, uint32_t index) {
    return static_cast<float>((mix(mix(index + d.s1) ^ d.s2) >> 8) >= d.cut) * d.scale;
}

// One sample's layout: element (c, p) of its C x P map (P = H*W) is at p*C + c when
// channels_last, else at c*P + p. Its NCHW index, which the dropout hashes, is plane[c] + p:
// a load, not a multiply, per lane of a channels_last row.
struct Layout {
    int64_t C, P;
    bool cl;
    const uint32_t* plane;  // plane[c] = c * P, mod 2^32 as the indices
    bool channels_last() const { return cl; }
};

std::vector<uint32_t> plane_starts(int64_t C, int64_t P) {
    std::vector<uint32_t> plane(C);
    for (int64_t c = 0; c < C; ++c) plane[c] = static_cast<uint32_t>(c * P);
    return plane;
}

// Two per-channel sums over the P positions of one sample, in double: elem(c, offset, index)
// gives the two terms of the element of channel c at `offset` in the sample's memory, `index`
// its NCHW index in the sample. Channels_last
// rows are summed in float over blocks of ROWS rows first: a double add per element was the
// bottleneck.
constexpr int64_t ROWS = 32;

struct Terms {
    float u, w;
};

template <typename Elem>
void channel_sums(const Layout& L, Elem elem, double* s1, double* s2, float* f1, float* f2) {
    if (L.channels_last()) {
        for (int64_t c = 0; c < L.C; ++c) s1[c] = s2[c] = 0.0;
        for (int64_t p0 = 0; p0 < L.P; p0 += ROWS) {
            for (int64_t c = 0; c < L.C; ++c) f1[c] = f2[c] = 0.0f;
            const int64_t p1 = p0 + ROWS < L.P ? p0 + ROWS : L.P;
            for (int64_t p = p0; p < p1; ++p) {
#pragma omp simd
                for (int64_t c = 0; c < L.C; ++c) {
                    const Terms t = elem(c, p * L.C + c, L.plane[c] + static_cast<uint32_t>(p));
                    f1[c] += t.u;
                    f2[c] += t.w;
                }
            }
            for (int64_t c = 0; c < L.C; ++c) {
                s1[c] += f1[c];
                s2[c] += f2[c];
            }
        }
    } else {
        for (int64_t c = 0; c < L.C; ++c) {
            double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
            for (int64_t p = 0; p < L.P; ++p) {
                const Terms t = elem(c, c * L.P + p, static_cast<uint32_t>(c * L.P + p));
                a += t.u;
                b += t.w;
            }
            s1[c] = a;
            s2[c] = b;
        }
    }
}

// y = drop(act(x * a[c] + b[c])) over one sample whose first element has NCHW index `base`. SILU
// and DROP are template parameters, not runtime flags: a branch inside the loops kept the
// compiler from vectorising them (5x slower).
template <bool SILU, bool DROP, typename T>
void apply(const T* x, T* y, const Layout& L, const float* a, const float* b, const Drop& d, uint32_t base) {
    if (L.channels_last()) {
        for (int64_t p = 0; p < L.P; ++p) {
            const T* row = x + p * L.C;
            const uint32_t rowbase = base + static_cast<uint32_t>(p);  // indices wrap mod 2^32
            T* out = y + p * L.C;
#pragma omp simd
            for (int64_t c = 0; c < L.C; ++c) {
                float t = load(row, c) * a[c] + b[c];
                float u = SILU ? t * sigmoid(t) : t;
                store(out, c, DROP ? u * keep_scale(d, rowbase + L.plane[c]) : u);
            }
        }
    } else {
        for (int64_t c = 0; c < L.C; ++c) {
            const T* plane = x + c * L.P;
            const uint32_t rowbase = base + L.plane[c];
            T* out = y + c * L.P;
            const float ac = a[c], bc = b[c];
#pragma omp simd
            for (int64_t p = 0; p < L.P; ++p) {
                float t = load(plane, p) * ac + bc;
                float u = SILU ? t * sigmoid(t) : t;
                store(out, p, DROP ? u * keep_scale(d, rowbase + static_cast<uint32_t>(p)) : u);
            }
        }
    }
}

// The gradient reaching the normalised map: dout itself, or dout * silu'(t).
template <bool SILU>
inline float pre_activation_grad(float dout, float t) {
    if (!SILU) return dout;
    float sg = sigmoid(t);
    return dout * sg * (1.0f + t * (1.0f - sg));
}

// Per-channel sums of dy*x and dy over one sample, dy being the pre-activation gradient; with
// SiLU, dy is also kept in `dys` (float, the sample's layout) so the second pass need not
// evaluate the sigmoid again.
template <bool SILU, bool DROP, typename T>
void grad_moments(const T* x, const T* dout, const Layout& L, const float* a, const float* b, const Drop& d,
                  uint32_t base, float* dys, double* ds, double* db, float* fs, float* fb) {
    auto elem = [&](int64_t c, int64_t off, uint32_t index) {
        float v = load(x, off);
        float g = load(dout, off);
        if (DROP) g *= keep_scale(d, base + index);  // indices wrap mod 2^32
        float dy = pre_activation_grad<SILU>(g, v * a[c] + b[c]);
        if (SILU) dys[off] = dy;
        return Terms{dy * v, dy};
    };
    channel_sums(L, elem, ds, db, fs, fb);
}

// dx = dy * k1[c] + x * k2[c] + k3[c] over one sample, dy from `dys` (SiLU) or dout itself.
template <bool SILU, typename T>
void grad_input(const T* x, const T* dout, const float* dys, T* dx, const Layout& L, const float* k1,
                const float* k2, const float* k3) {
    if (L.channels_last()) {
        for (int64_t p = 0; p < L.P; ++p) {
            const T* row = x + p * L.C;
            const T* grow = dout + p * L.C;
            const float* drow = dys + p * L.C;
            T* out = dx + p * L.C;
#pragma omp simd
            for (int64_t c = 0; c < L.C; ++c) {
                float dy = SILU ? drow[c] : load(grow, c);
                store(out, c, dy * k1[c] + load(row, c) * k2[c] + k3[c]);
            }
        }
    } else {
        for (int64_t c = 0; c < L.C; ++c) {
            const T* plane = x + c * L.P;
            const T* gplane = dout + c * L.P;
            const float* dplane = dys + c * L.P;
            T* out = dx + c * L.P;
            const float c1 = k1[c], c2 = k2[c], c3 = k3[c];
#pragma omp simd
            for (int64_t p = 0; p < L.P; ++p) {
                float dy = SILU ? dplane[p] : load(gplane, p);
                store(out, p, dy * c1 + load(plane, p) * c2 + c3);
            }
        }
    }
}

// Scale and shift of the affine map x -> x * a + b that normalises one sample's x + shift (shift
// per channel, or null), applied to x itself.
void affine(const float* gamma, const float* beta, const float* mean, const float* rstd, const float* shift,
            int64_t C, int64_t G, float* a, float* b) {
    const int64_t cg = C / G;
    for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / cg;
        a[c] = rstd[g] * gamma[c];
        b[c] = beta[c] + ((shift ? shift[c] : 0.0f) - mean[g]) * a[c];
    }
}

template <bool SILU, bool DROP, typename T>
void forward(const T* x, const float* shift, const float* gamma, const float* beta, T* y, float* mean, float* rstd,
             float* xsum, int64_t B, int64_t C, int64_t P, int64_t G, float eps, bool channels_last, Drop d) {
    const std::vector<uint32_t> plane = plane_starts(C, P);
    const Layout L{C, P, channels_last, plane.data()};
    const int64_t cg = C / G;
    const double n = static_cast<double>(cg * P);
#pragma omp parallel
    {
        std::vector<double> s(C), ss(C);
        std::vector<float> a(C), b(C), fs(C), fss(C);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; ++i) {
            const T* xi = x + i * C * P;
            auto moments = [&](int64_t, int64_t off, uint32_t) {
                const float v = load(xi, off);
                return Terms{v, v * v};
            };
            channel_sums(L, moments, s.data(), ss.data(), fs.data(), fss.data());
            const float* sh = shift ? shift + i * C : nullptr;
            for (int64_t c = 0; c < C; ++c) {
                xsum[i * C + c] = static_cast<float>(s[c]);
                if (sh) {  // the moments of x + shift, from those of x: no pass over the map
                    ss[c] += 2.0 * sh[c] * s[c] + static_cast<double>(P) * sh[c] * sh[c];
                    s[c] += static_cast<double>(P) * sh[c];
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                double m = 0.0, m2 = 0.0;
                for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                    m += s[c];
                    m2 += ss[c];
                }
                m /= n;
                const double var = std::fmax(m2 / n - m * m, 0.0);
                mean[i * G + g] = static_cast<float>(m);
                rstd[i * G + g] = static_cast<float>(1.0 / std::sqrt(var + eps));
            }
            affine(gamma, beta, mean + i * G, rstd + i * G, sh, C, G, a.data(), b.data());
            apply<SILU, DROP>(xi, y + i * C * P, L, a.data(), b.data(), d, static_cast<uint32_t>(i * C * P));
        }
    }
}

// dgamma_rows and dbeta_rows get one row of C per sample; the caller sums them over the batch.
template <bool SILU, bool DROP, typename T>
void backward(const T* x, const float* shift, const float* xsum, const T* dout, const float* gamma,
              const float* beta, const float* mean, const float* rstd, T* dx, float* dgamma_rows, float* dbeta_rows,
              float* dshift_rows, int64_t B, int64_t C, int64_t P, int64_t G, bool channels_last, Drop d) {
    const std::vector<uint32_t> plane = plane_starts(C, P);
    const Layout L{C, P, channels_last, plane.data()};
    const int64_t cg = C / G;
    const double n = static_cast<double>(cg * P);
#pragma omp parallel
    {
        std::vector<double> ds(C), db(C);
        std::vector<float> a(C), b(C), k1(C), k2(C), k3(C), fs(C), fb(C);
        std::vector<float> dys(SILU ? C * P : 0);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; ++i) {
            const T* xi = x + i * C * P;
            const T* gi = dout + i * C * P;
            const float* mi = mean + i * G;
            const float* ri = rstd + i * G;
            const float* sh = shift ? shift + i * C : nullptr;
            affine(gamma, beta, mi, ri, sh, C, G, a.data(), b.data());
            grad_moments<SILU, DROP>(xi, gi, L, a.data(), b.data(), d, static_cast<uint32_t>(i * C * P), dys.data(),
                                     ds.data(), db.data(), fs.data(), fb.data());
            if (sh)
                for (int64_t c = 0; c < C; ++c) ds[c] += sh[c] * db[c];  // sums of dy * (x + shift)
            for (int64_t g = 0; g < G; ++g) {
                double dsg = 0.0, dbg = 0.0;
                for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                    dsg += ds[c] * gamma[c];
                    dbg += db[c] * gamma[c];
                }
                const double r = ri[g], m = mi[g];
                const double c2 = (dbg * m - dsg) * r * r * r / n;
                const double c3 = -c2 * m - dbg * r / n;
                for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                    k1[c] = static_cast<float>(r * gamma[c]);
                    k2[c] = static_cast<float>(c2);
                    k3[c] = static_cast<float>(c3);
                    dgamma_rows[i * C + c] = static_cast<float>((ds[c] - db[c] * m) * r);
                    dbeta_rows[i * C + c] = static_cast<float>(db[c]);
                    // d shift = the sum of dx over the positions, in closed form
                    const double s = sh ? sh[c] : 0.0, x_sum = xsum[i * C + c] + static_cast<double>(P) * s;
                    dshift_rows[i * C + c] =
                        static_cast<float>(r * gamma[c] * db[c] + c2 * x_sum + static_cast<double>(P) * c3);
                    if (sh) k3[c] = static_cast<float>(c3 + c2 * s);  // dx's x * k2 term is on x + shift
                }
            }
            grad_input<SILU>(xi, gi, dys.data(), dx + i * C * P, L, k1.data(), k2.data(), k3.data());
        }
    }
}

// Only SiLU -> dropout is fused (the networks' order); dropout without SiLU is not asked for.
template <typename T>
void forward_dispatch(const void* x, const float* shift, const float* gamma, const float* beta, void* y,
                      float* mean, float* rstd, float* xsum, int64_t B, int64_t C, int64_t P, int64_t G, float eps,
                      int channels_last, int silu, const Drop& d) {
    auto f = !silu ? forward<false, false, T> : d.cut ? forward<true, true, T> : forward<true, false, T>;
    f(static_cast<const T*>(x), shift, gamma, beta, static_cast<T*>(y), mean, rstd, xsum, B, C, P, G, eps,
      channels_last, d);
}

template <typename T>
void backward_dispatch(const void* x, const float* shift, const float* xsum, const void* dout, const float* gamma,
                       const float* beta, const float* mean, const float* rstd, void* dx, float* dgamma_rows,
                       float* dbeta_rows, float* dshift_rows, int64_t B, int64_t C, int64_t P, int64_t G,
                       int channels_last, int silu, const Drop& d) {
    auto f = !silu ? backward<false, false, T> : d.cut ? backward<true, true, T> : backward<true, false, T>;
    f(static_cast<const T*>(x), shift, xsum, static_cast<const T*>(dout), gamma, beta, mean, rstd,
      static_cast<T*>(dx), dgamma_rows, dbeta_rows, dshift_rows, B, C, P, G, channels_last, d);
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16 (x, y, dout, dx); gamma, beta, mean, rstd and the gradient rows
// are float32. x is (B, C, H*W) when channels_last is 0 and (B, H*W, C) when it is 1. shift
// (B, C) or null is added to x per channel before normalising (a ResBlock's timestep
// embedding); the forward writes x's per-channel sums to xsum (B, C), which the backward needs
// to give dshift_rows (B, C): the gradient of the shift, of a shift of zeros when it is null.
// drop_cut is round(p * 2^24) of a dropout after the SiLU (0: none), seed1/seed2 its seeds; the
// backward must get the forward's.
void group_norm_silu_forward(int dtype, const void* x, const float* shift, const float* gamma, const float* beta,
                             void* y, float* mean, float* rstd, float* xsum, int64_t B, int64_t C, int64_t P,
                             int64_t G, float eps, int channels_last, int silu, uint32_t drop_cut, float drop_scale,
                             uint32_t seed1, uint32_t seed2) {
    const Drop d{seed1, seed2, drop_cut, drop_scale};
    auto f = dtype == 0 ? forward_dispatch<float> : forward_dispatch<uint16_t>;
    f(x, shift, gamma, beta, y, mean, rstd, xsum, B, C, P, G, eps, channels_last, silu, d);
}

void group_norm_silu_backward(int dtype, const void* x, const float* shift, const float* xsum, const void* dout,
                              const float* gamma, const float* beta, const float* mean, const float* rstd, void* dx,
                              float* dgamma_rows, float* dbeta_rows, float* dshift_rows, int64_t B, int64_t C,
                              int64_t P, int64_t G, int channels_last, int silu, uint32_t drop_cut, float drop_scale,
                              uint32_t seed1, uint32_t seed2) {
    const Drop d{seed1, seed2, drop_cut, drop_scale};
    auto f = dtype == 0 ? backward_dispatch<float> : backward_dispatch<uint16_t>;
    f(x, shift, xsum, dout, gamma, beta, mean, rstd, dx, dgamma_rows, dbeta_rows, dshift_rows, B, C, P, G,
      channels_last, silu, d);
}

}  // extern "C"
