// The discriminator head's non-convolution kernels (ALGORITHM.md §2, src/train/disc_head.rs:
// Conv → GroupNorm → LeakyReLU(0.2) → Conv 1×1 → mean pool), layout [B, C, S] (S = h·w).
// Activations bf16 (they come from and go to bf16 GEMMs), f32 math, f32 statistics, f32
// parameter-gradient partials, f32 pooled logits.
// CPU twin: src/kernels/disc_head.rs (group_norm_fwd/_bwd, mean_pool_spatial/_bwd), with the
// LeakyReLU of src/kernels/elementwise.rs (Activation::LeakyRelu).
//
//   group_norm_fwd:  y = act((x − μ_g)·rstd_g·w[c] + b[c]), act = LeakyReLU(slope) or identity,
//                    saving μ, rstd per (b, g)
//   group_norm_bwd:  dx, and per-(b, c) partials of dweight, dbias (reduced over b by sum_splits);
//                    the LeakyReLU's derivative comes from the pre-activation recomputed from x
//   mean_pool_fwd:   out[b, c] = mean_s x[b, c, s]
//   mean_pool_bwd:   dx[b, c, s] = dy[b, c] / S
//
// One block per (b, g): a group is one contiguous run of C/G·S elements, read from memory once
// (the second and third passes hit L2: the head's groups are tens of KB).
#include "common.cuh"

// One block per (b, g) and few groups (B·32 for the head): a block of 32 warps per SM keeps
// enough loads in flight.
#define GN_THREADS 1024
#define POOL_ROWS 8  // rows (one warp each) per block of mean_pool_fwd

namespace disc_head {

__device__ __forceinline__ float leaky_relu(float v, float slope) { return v > 0.f ? v : slope * v; }

}  // namespace disc_head

// grid: B·G, block: GN_THREADS. leaky != 0 fuses LeakyReLU(slope) after the affine transform.
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_fwd(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                   const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias, int C,
                   int S, int G, float eps, float slope, int leaky) {
    using namespace disc_head;
    __shared__ float scratch[32];
    const int bg = blockIdx.x, cg = C / G, c0 = (bg % G) * cg;
    const long long n = (long long)cg * S, base = (long long)bg * n;
    const bf16* xg = x + base;
    bf16* yg = y + base;
    // A 16-byte vector never straddles two channels when S % 8 == 0.
    const bool vec = S % 8 == 0 && aligned16(x) && aligned16(y);

    // Two passes for the variance: E[x²] − E[x]² loses everything when |μ| ≫ σ (as the CPU twin).
    float s = 0.f;
    if (vec) {
        for (long long k = threadIdx.x; k < n / 8; k += blockDim.x) {
            float f[8];
            unpack_bf16x8(load16(xg + 8 * k), f);
#pragma unroll
            for (int j = 0; j < 8; j++) s += f[j];
        }
    } else {
        for (long long e = threadIdx.x; e < n; e += blockDim.x) s += bf2f(xg[e]);
    }
    const float mu = block_sum(s, scratch) / (float)n;
    float q = 0.f;
    if (vec) {
        for (long long k = threadIdx.x; k < n / 8; k += blockDim.x) {
            float f[8];
            unpack_bf16x8(load16(xg + 8 * k), f);
#pragma unroll
            for (int j = 0; j < 8; j++) q += (f[j] - mu) * (f[j] - mu);
        }
    } else {
        for (long long e = threadIdx.x; e < n; e += blockDim.x) {
            const float d = bf2f(xg[e]) - mu;
            q += d * d;
        }
    }
    const float rs = rsqrtf(block_sum(q, scratch) / (float)n + eps);

    if (vec) {
        for (long long k = threadIdx.x; k < n / 8; k += blockDim.x) {
            const int c = c0 + (int)(8 * k / S);
            const float a = rs * bf2f(weight[c]), sh = bf2f(bias[c]);
            float f[8];
            unpack_bf16x8(load16(xg + 8 * k), f);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float o = (f[j] - mu) * a + sh;
                f[j] = leaky ? leaky_relu(o, slope) : o;
            }
            store16(yg + 8 * k, pack_bf16x8(f));
        }
    } else {
        for (long long e = threadIdx.x; e < n; e += blockDim.x) {
            const int c = c0 + (int)(e / S);
            const float o = (bf2f(xg[e]) - mu) * (rs * bf2f(weight[c])) + bf2f(bias[c]);
            yg[e] = f2bf(leaky ? leaky_relu(o, slope) : o);
        }
    }
    if (threadIdx.x == 0) {
        mean[bg] = mu;
        rstd[bg] = rs;
    }
}

// grid: B·G, block: GN_THREADS, dynamic shared memory 2·(C/G) floats.
// With x̂ = (x − μ)·rstd, g' = dy·act'(x̂·w + b) and dx̂ = g'·w:
//   dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) over the group;
//   dw_part[b·C + c] = Σ_s g'·x̂, db_part[b·C + c] = Σ_s g' (reduce over b with sum_splits).
// Phase 1: one warp per channel of the group, Σ_s g' and Σ_s g'·x̂ → shared memory; phase 2:
// every thread forms the group means in channel order (identical in all threads), then dx.
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_bwd(bf16* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part,
                   const bf16* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
                   const bf16* __restrict__ weight, const bf16* __restrict__ bias, const bf16* __restrict__ dy,
                   int C, int S, int G, float slope, int leaky) {
    DYNAMIC_SMEM(float, sums);  // [0, cg): Σ g'; [cg, 2cg): Σ g'·x̂
    const int bg = blockIdx.x, b = bg / G, cg = C / G, c0 = (bg % G) * cg;
    const long long n = (long long)cg * S, base = (long long)bg * n;
    const float mu = mean[bg], rs = rstd[bg];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool vec = S % 8 == 0 && aligned16(x) && aligned16(dy) && aligned16(dx);

    for (int ci = warp; ci < cg; ci += warps) {
        const int c = c0 + ci;
        const float w = bf2f(weight[c]), bb = bf2f(bias[c]);
        const bf16* xc = x + base + (long long)ci * S;
        const bf16* gc = dy + base + (long long)ci * S;
        float sg = 0.f, sgx = 0.f;
        if (vec) {
            for (int k = lane; k < S / 8; k += 32) {
                float fx[8], fg[8];
                unpack_bf16x8(load16(xc + 8 * k), fx);
                unpack_bf16x8(load16(gc + 8 * k), fg);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const float xh = (fx[j] - mu) * rs;
                    const float g = leaky && !(xh * w + bb > 0.f) ? slope * fg[j] : fg[j];
                    sg += g;
                    sgx += g * xh;
                }
            }
        } else {
            for (int s = lane; s < S; s += 32) {
                const float xh = (bf2f(xc[s]) - mu) * rs;
                const float g0 = bf2f(gc[s]);
                const float g = leaky && !(xh * w + bb > 0.f) ? slope * g0 : g0;
                sg += g;
                sgx += g * xh;
            }
        }
        sg = warp_sum(sg);
        sgx = warp_sum(sgx);
        if (lane == 0) {
            sums[ci] = sg;
            sums[cg + ci] = sgx;
            db_part[(long long)b * C + c] = sg;
            dw_part[(long long)b * C + c] = sgx;
        }
    }
    __syncthreads();
    float sd = 0.f, sdx = 0.f;
    for (int ci = 0; ci < cg; ci++) {
        const float w = bf2f(weight[c0 + ci]);
        sd += sums[ci] * w;
        sdx += sums[cg + ci] * w;
    }
    const float m1 = sd / (float)n, m2 = sdx / (float)n;

    const bf16* xg = x + base;
    const bf16* gg = dy + base;
    bf16* dg = dx + base;
    if (vec) {
        for (long long k = threadIdx.x; k < n / 8; k += blockDim.x) {
            const int c = c0 + (int)(8 * k / S);
            const float w = bf2f(weight[c]), bb = bf2f(bias[c]);
            float fx[8], fg[8];
            unpack_bf16x8(load16(xg + 8 * k), fx);
            unpack_bf16x8(load16(gg + 8 * k), fg);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float xh = (fx[j] - mu) * rs;
                const float g = leaky && !(xh * w + bb > 0.f) ? slope * fg[j] : fg[j];
                fx[j] = rs * (g * w - m1 - xh * m2);
            }
            store16(dg + 8 * k, pack_bf16x8(fx));
        }
    } else {
        for (long long e = threadIdx.x; e < n; e += blockDim.x) {
            const int c = c0 + (int)(e / S);
            const float w = bf2f(weight[c]), bb = bf2f(bias[c]);
            const float xh = (bf2f(xg[e]) - mu) * rs;
            const float g0 = bf2f(gg[e]);
            const float g = leaky && !(xh * w + bb > 0.f) ? slope * g0 : g0;
            dg[e] = f2bf(rs * (g * w - m1 - xh * m2));
        }
    }
}

// out[r] = mean over S of row r of x (rows = B·C), one warp per row.
// grid: ceil(rows / POOL_ROWS), block: 32·POOL_ROWS.
extern "C" __global__ void __launch_bounds__(32 * POOL_ROWS)
    mean_pool_fwd(float* __restrict__ out, const bf16* __restrict__ x, long long rows, int S) {
    const long long row = (long long)blockIdx.x * POOL_ROWS + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const bf16* xr = x + row * S;
    float s = 0.f;
    if (S % 8 == 0 && aligned16(x)) {
        for (int k = lane; k < S / 8; k += 32) {
            float f[8];
            unpack_bf16x8(load16(xr + 8 * k), f);
#pragma unroll
            for (int j = 0; j < 8; j++) s += f[j];
        }
    } else {
        for (int j = lane; j < S; j += 32) s += bf2f(xr[j]);
    }
    s = warp_sum(s);
    if (lane == 0) out[row] = s / (float)S;
}

// dx[r, s] = dy[r] · (1/S), a grid-stride loop over 8-element vectors when S % 8 == 0.
// grid: ceil(rows·S / 8 / 256), block: 256.
extern "C" __global__ void mean_pool_bwd(bf16* __restrict__ dx, const float* __restrict__ dy, long long rows, int S) {
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    const float inv = 1.f / (float)S;
    const long long n = rows * S;
    if (S % 8 == 0 && aligned16(dx)) {
        for (long long k = t0; k < n / 8; k += step) {
            const float v = dy[8 * k / S] * inv;
            float f[8];
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = v;
            store16(dx + 8 * k, pack_bf16x8(f));
        }
    } else {
        for (long long e = t0; e < n; e += step) dx[e] = f2bf(dy[e / S] * inv);
    }
}
