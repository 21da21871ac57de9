// The discriminator head's non-convolution kernels (ALGORITHM.md §2, src/train/disc_head.rs:
// Conv → GroupNorm → LeakyReLU(0.2) → Conv 1×1 → mean pool), layout [B, C, S] (S = h·w).
// Activations bf16 (they come from and go to bf16 GEMMs), f32 math, f32 statistics, f32
// parameter-gradient partials, f32 pooled logits.
// CPU twin: src/kernels/disc_head.rs (group_norm_fwd/_bwd, mean_pool_spatial/_bwd), with the
// LeakyReLU of src/kernels/elementwise.rs (Activation::LeakyRelu).
//
//   group_norm_fwd:  y = act((x − μ_g)·rstd_g·w[c] + b[c]), act = LeakyReLU(slope) or identity,
//                    saving μ, rstd per (b, g)
//   group_norm_bwd:  dx, and dweight, dbias (per-(b, c) partials, reduced over b in sample order by
//                    the grid's last block); the LeakyReLU's derivative comes from the
//                    pre-activation recomputed from x
//   mean_pool_fwd:   out[b, c] = mean_s x[b, c, s]
//   mean_pool_bwd:   dx[b, c, s] = dy[b, c] / S
//   head_logits_fwd: logits[b] = Σ_c pooled[b, c]·w[c] + bias — the 1×1 convolution after the pool
//                    (they commute), on the device so that a training step needs no host read
//   head_logits_bwd: dpooled[b, c] = dl[b]·w[c]; with parameter gradients gw[c] += Σ_b dl[b]·pooled[b, c],
//                    gb += Σ_b dl[b]
//
// One block per (b, g): a group is one contiguous run of C/G·S elements. The register kernels (`*_r<P>`) hold a whole group in
// registers, P 16-byte packs per thread, so x (and dy) are read from memory exactly once, every load
// of a thread is issued before its first use, and each op is one launch (the backward's parameter
// gradients are reduced over the batch by the last block to finish, in sample order, instead of
// two sum_splits launches and two memsets; its counter is a ticket of the device's ring, so no
// memset either).
#include "common.cuh"

// Loop kernels (groups too large for registers, or S % 8 != 0): 32 warps per block keep loads in
// flight; the second and third passes hit L2.
#define GN_THREADS 1024
#define POOL_ROWS 8  // rows (one warp each) per block of mean_pool_fwd

namespace disc_head {

__device__ __forceinline__ float leaky_relu(float v, float slope) { return v > 0.f ? v : slope * v; }

// dw[c] = Σ_b dw_part[b·C + c] (and db) by the last block of the grid to finish, in sample order
// (as sum_splits), counted by `ticket` (last_block_to_finish: zero at launch and left at zero).
// Every thread calls it.
__device__ __forceinline__ void param_grad_tail(float* __restrict__ dw, float* __restrict__ db,
                                                const float* dw_part, const float* db_part, unsigned* ticket, int B,
                                                int C) {
    if (!last_block_to_finish(ticket, gridDim.x)) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sw = 0.f, sb = 0.f;
        for (int b = 0; b < B; b++) {
            sw += load_volatile(dw_part + (long long)b * C + c);
            sb += load_volatile(db_part + (long long)b * C + c);
        }
        dw[c] = sw;
        db[c] = sb;
    }
}

// ---- GroupNorm forward -------------------------------------------------------------------------

__device__ __forceinline__ void gn_fwd_loop(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                                            const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                            const bf16* __restrict__ bias, int C, int S, int G, float eps, float slope,
                                            int leaky, float* scratch) {
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

// The group's n/8 packs (n = C/G·S, S % 8 == 0, n/8 ≤ P·blockDim.x) in registers: pack
// k = threadIdx.x + j·blockDim.x in r[j] (coalesced across the block for each j).
template <int P>
__device__ __forceinline__ void gn_fwd_regs(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                                            const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                            const bf16* __restrict__ bias, int C, int S, int G, float eps, float slope,
                                            int leaky, float* scratch) {
    const int bg = blockIdx.x, cg = C / G, c0 = (bg % G) * cg;
    const int n = cg * S, packs = n / 8;
    const long long base = (long long)bg * n;
    const bf16* xg = x + base;
    bf16* yg = y + base;
    pack16 r[P];
#pragma unroll
    for (int j = 0; j < P; j++) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < packs) r[j] = load16(xg + 8 * k);
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < P; j++) {
        if (threadIdx.x + j * blockDim.x < packs) {
            float f[8];
            unpack_bf16x8(r[j], f);
#pragma unroll
            for (int i = 0; i < 8; i++) s += f[i];
        }
    }
    const float mu = block_sum(s, scratch) / (float)n;
    float q = 0.f;
#pragma unroll
    for (int j = 0; j < P; j++) {
        if (threadIdx.x + j * blockDim.x < packs) {
            float f[8];
            unpack_bf16x8(r[j], f);
#pragma unroll
            for (int i = 0; i < 8; i++) q += (f[i] - mu) * (f[i] - mu);
        }
    }
    const float rs = rsqrtf(block_sum(q, scratch) / (float)n + eps);
#pragma unroll
    for (int j = 0; j < P; j++) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < packs) {
            const int c = c0 + 8 * k / S;
            const float a = rs * bf2f(weight[c]), sh = bf2f(bias[c]);
            float f[8];
            unpack_bf16x8(r[j], f);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float o = (f[i] - mu) * a + sh;
                f[i] = leaky ? leaky_relu(o, slope) : o;
            }
            store16(yg + 8 * k, pack_bf16x8(f));
        }
    }
    if (threadIdx.x == 0) {
        mean[bg] = mu;
        rstd[bg] = rs;
    }
}

}  // namespace disc_head

// grid: B·G, block: GN_THREADS. leaky != 0 fuses LeakyReLU(slope) after the affine transform.
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_fwd(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                   const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias, int C,
                   int S, int G, float eps, float slope, int leaky) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    disc_head::gn_fwd_loop(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
}

// grid: B·G, block: ≤ 1024 threads with C/G·S/8 ≤ P·blockDim.x; S % 8 == 0 (the launcher checks;
// unaligned pointers take the loop path).
extern "C" __global__ void __launch_bounds__(1024)
    group_norm_fwd_r1(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                      const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                      int C, int S, int G, float eps, float slope, int leaky) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    if (aligned16(x) && aligned16(y))
        disc_head::gn_fwd_regs<1>(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
    else
        disc_head::gn_fwd_loop(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
}
extern "C" __global__ void __launch_bounds__(1024)
    group_norm_fwd_r2(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                      const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                      int C, int S, int G, float eps, float slope, int leaky) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    if (aligned16(x) && aligned16(y))
        disc_head::gn_fwd_regs<2>(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
    else
        disc_head::gn_fwd_loop(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
}
extern "C" __global__ void __launch_bounds__(1024)
    group_norm_fwd_r4(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                      const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                      int C, int S, int G, float eps, float slope, int leaky) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    if (aligned16(x) && aligned16(y))
        disc_head::gn_fwd_regs<4>(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
    else
        disc_head::gn_fwd_loop(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
}
extern "C" __global__ void __launch_bounds__(1024)
    group_norm_fwd_r8(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                      const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                      int C, int S, int G, float eps, float slope, int leaky) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    if (aligned16(x) && aligned16(y))
        disc_head::gn_fwd_regs<8>(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
    else
        disc_head::gn_fwd_loop(y, mean, rstd, x, weight, bias, C, S, G, eps, slope, leaky, scratch);
}

// ---- GroupNorm backward ------------------------------------------------------------------------
// With x̂ = (x − μ)·rstd, g' = dy·act'(x̂·w + b) and dx̂ = g'·w:
//   dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) over the group;
//   dw_part[b·C + c] = Σ_s g'·x̂, db_part[b·C + c] = Σ_s g', then dw, db = Σ_b of those (last block).

namespace disc_head {

// Phase 1: one warp per channel of the group, Σ_s g' and Σ_s g'·x̂ → shared memory; phase 2:
// every thread forms the group means in channel order (identical in all threads), then dx.
// `sums`: 2·(C/G) floats of shared memory.
__device__ __forceinline__ void gn_bwd_loop(bf16* __restrict__ dx, float* __restrict__ dw_part,
                                            float* __restrict__ db_part, const bf16* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ rstd,
                                            const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                                            const bf16* __restrict__ dy, int C, int S, int G, float slope, int leaky,
                                            float* sums) {
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

// The register version (S % 8 == 0, n/8 ≤ P·blockDim.x, 16-byte aligned): x and dy packs held in
// registers; per-pack partial sums → shared memory `part` (2·n/8 floats), reduced per channel by
// one warp each in pack order, then `sums` (2·C/G floats) as in the loop version.
template <int P>
__device__ __forceinline__ void gn_bwd_regs(bf16* __restrict__ dx, float* __restrict__ dw_part,
                                            float* __restrict__ db_part, const bf16* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ rstd,
                                            const bf16* __restrict__ weight, const bf16* __restrict__ bias,
                                            const bf16* __restrict__ dy, int C, int S, int G, float slope, int leaky,
                                            float* part, float* sums) {
    const int bg = blockIdx.x, b = bg / G, cg = C / G, c0 = (bg % G) * cg;
    const int n = cg * S, packs = n / 8, spc = S / 8;
    const long long base = (long long)bg * n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    pack16 rx[P], rg[P];
#pragma unroll
    for (int j = 0; j < P; j++) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < packs) {
            rx[j] = load16(x + base + 8 * k);
            rg[j] = load16(dy + base + 8 * k);
        }
    }
    const float mu = mean[bg], rs = rstd[bg];
#pragma unroll
    for (int j = 0; j < P; j++) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < packs) {
            const int c = c0 + k / spc;
            const float w = bf2f(weight[c]), bb = bf2f(bias[c]);
            float fx[8], fg[8];
            unpack_bf16x8(rx[j], fx);
            unpack_bf16x8(rg[j], fg);
            float sg = 0.f, sgx = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float xh = (fx[i] - mu) * rs;
                const float g = leaky && !(xh * w + bb > 0.f) ? slope * fg[i] : fg[i];
                sg += g;
                sgx += g * xh;
            }
            part[k] = sg;
            part[packs + k] = sgx;
        }
    }
    __syncthreads();
    for (int ci = warp; ci < cg; ci += warps) {
        float sg = 0.f, sgx = 0.f;
        for (int k = ci * spc + lane; k < (ci + 1) * spc; k += 32) {
            sg += part[k];
            sgx += part[packs + k];
        }
        sg = warp_sum(sg);
        sgx = warp_sum(sgx);
        if (lane == 0) {
            sums[ci] = sg;
            sums[cg + ci] = sgx;
            db_part[(long long)b * C + c0 + ci] = sg;
            dw_part[(long long)b * C + c0 + ci] = sgx;
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
#pragma unroll
    for (int j = 0; j < P; j++) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < packs) {
            const int c = c0 + k / spc;
            const float w = bf2f(weight[c]), bb = bf2f(bias[c]);
            float fx[8], fg[8];
            unpack_bf16x8(rx[j], fx);
            unpack_bf16x8(rg[j], fg);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float xh = (fx[i] - mu) * rs;
                const float g = leaky && !(xh * w + bb > 0.f) ? slope * fg[i] : fg[i];
                fx[i] = rs * (g * w - m1 - xh * m2);
            }
            store16(dx + base + 8 * k, pack_bf16x8(fx));
        }
    }
}

}  // namespace disc_head

namespace disc_head {
// group_norm_bwd's body: the loop path, its 2·C/G floats of shared memory.
__device__ __forceinline__ void gn_bwd_loop_entry(bf16* dx, float* dw, float* db, float* dw_part, float* db_part,
                                                  unsigned* counter, const bf16* x, const float* mean,
                                                  const float* rstd, const bf16* weight, const bf16* bias,
                                                  const bf16* dy, int B, int C, int S, int G, float slope, int leaky) {
    DYNAMIC_SMEM(float, sums);
    gn_bwd_loop(dx, dw_part, db_part, x, mean, rstd, weight, bias, dy, C, S, G, slope, leaky, sums);
    param_grad_tail(dw, db, dw_part, db_part, counter, B, C);
}

// group_norm_bwd_r<R>'s body: R packs a thread held in registers where the pointers allow (the loop
// path otherwise, which needs only the last 2·C/G floats of shared memory).
template <int R>
__device__ __forceinline__ void gn_bwd_regs_entry(bf16* dx, float* dw, float* db, float* dw_part, float* db_part,
                                                  unsigned* counter, const bf16* x, const float* mean,
                                                  const float* rstd, const bf16* weight, const bf16* bias,
                                                  const bf16* dy, int B, int C, int S, int G, float slope, int leaky) {
    DYNAMIC_SMEM(float, part);
    const int packs = C / G * S / 8;
    if (aligned16(x) && aligned16(dy) && aligned16(dx))
        gn_bwd_regs<R>(dx, dw_part, db_part, x, mean, rstd, weight, bias, dy, C, S, G, slope, leaky, part,
                       part + 2 * packs);
    else
        gn_bwd_loop(dx, dw_part, db_part, x, mean, rstd, weight, bias, dy, C, S, G, slope, leaky, part + 2 * packs);
    param_grad_tail(dw, db, dw_part, db_part, counter, B, C);
}
}  // namespace disc_head

// The group-norm backward's entry points, one line each: the kernel's name, its launch bound and the
// body it runs (taking the entry's arguments in this order). build.rs reads the kernel names from
// these invocations. `counter`: one ticket (`KernelDevice::column_tickets`), zero at launch and left
// at zero; dw, db [C] are written by the last block.
#define GN_BWD_ENTRY(name, threads, ...)                                                                   \
    extern "C" __global__ void __launch_bounds__(threads)                                                  \
        name(bf16* __restrict__ dx, float* __restrict__ dw, float* __restrict__ db, float* dw_part,        \
             float* db_part, unsigned* __restrict__ counter, const bf16* __restrict__ x,                   \
             const float* __restrict__ mean, const float* __restrict__ rstd,                               \
             const bf16* __restrict__ weight, const bf16* __restrict__ bias, const bf16* __restrict__ dy, \
             int B, int C, int S, int G, float slope, int leaky) {                                         \
        kernel_prologue();                                                                                 \
        __VA_ARGS__(dx, dw, db, dw_part, db_part, counter, x, mean, rstd, weight, bias, dy, B, C, S, G,    \
                    slope, leaky);                                                                         \
    }

// grid: B·G, block: GN_THREADS, dynamic shared memory 2·(C/G) floats.
GN_BWD_ENTRY(group_norm_bwd, GN_THREADS, disc_head::gn_bwd_loop_entry)
// grid: B·G, block: ≤ 1024 threads with C/G·S/8 ≤ R·blockDim.x, S % 8 == 0; dynamic shared memory
// (2·C/G·S/8 + 2·C/G) floats.
GN_BWD_ENTRY(group_norm_bwd_r1, 1024, disc_head::gn_bwd_regs_entry<1>)
GN_BWD_ENTRY(group_norm_bwd_r2, 1024, disc_head::gn_bwd_regs_entry<2>)
GN_BWD_ENTRY(group_norm_bwd_r4, 1024, disc_head::gn_bwd_regs_entry<4>)

// ---- Mean pool ---------------------------------------------------------------------------------

// out[r] = mean over S of row r of x (rows = B·C), one warp per row, four packs in flight per lane.
// grid: ceil(rows / POOL_ROWS), block: 32·POOL_ROWS.
extern "C" __global__ void __launch_bounds__(32 * POOL_ROWS)
    mean_pool_fwd(float* __restrict__ out, const bf16* __restrict__ x, long long rows, int S) {
    kernel_prologue();
    const long long row = (long long)blockIdx.x * POOL_ROWS + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const bf16* xr = x + row * S;
    float s = 0.f;
    if (S % 8 == 0 && aligned16(x)) {
        const int packs = S / 8;
        int k = lane;
        for (; k + 96 < packs; k += 128) {
            pack16 p[4];
#pragma unroll
            for (int u = 0; u < 4; u++) p[u] = load16(xr + 8 * (k + 32 * u));
#pragma unroll
            for (int u = 0; u < 4; u++) {
                float f[8];
                unpack_bf16x8(p[u], f);
#pragma unroll
                for (int j = 0; j < 8; j++) s += f[j];
            }
        }
        for (; k < packs; k += 32) {
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

// dx[r, s] = dy[r] · (1/S), a grid-stride loop over 8-element vectors when S % 8 == 0 (32-bit
// index arithmetic when the pack count allows: the row of a pack is one 32-bit division).
// grid: ceil(rows·S / 8 / 256), block: 256.
extern "C" __global__ void mean_pool_bwd(bf16* __restrict__ dx, const float* __restrict__ dy, long long rows, int S) {
    kernel_prologue();
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    const float inv = 1.f / (float)S;
    const long long n = rows * S;
    if (S % 8 == 0 && aligned16(dx)) {
        const long long packs = n / 8;
        const int spr = S / 8;
        if (packs + step < 0x7fffffffLL) {
            for (int k = (int)t0; k < (int)packs; k += (int)step) {
                const float v = dy[k / spr] * inv;
                float f[8];
#pragma unroll
                for (int j = 0; j < 8; j++) f[j] = v;
                store16(dx + 8LL * k, pack_bf16x8(f));
            }
        } else {
            for (long long k = t0; k < packs; k += step) {
                const float v = dy[k / spr] * inv;
                float f[8];
#pragma unroll
                for (int j = 0; j < 8; j++) f[j] = v;
                store16(dx + 8 * k, pack_bf16x8(f));
            }
        }
    } else {
        for (long long e = t0; e < n; e += step) dx[e] = f2bf(dy[e / S] * inv);
    }
}

// ---- The last 1×1 convolution, after the pool ----------------------------------------------------

// B and h are small (a batch of logits, the head's width): one thread per logit, the sum over c in
// order as the CPU twin's. grid: ceil(B / 256), block: 256.
extern "C" __global__ void head_logits_fwd(float* __restrict__ logits, const float* __restrict__ pooled,
                                           const bf16* __restrict__ w, const bf16* __restrict__ bias, int B, int h) {
    kernel_prologue();
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    float acc = 0.f;
    for (int c = 0; c < h; c++) acc += pooled[(long long)b * h + c] * bf2f(w[c]);
    logits[b] = acc + bf2f(bias[0]);
}

// grid: ceil(max(B·h, h + 1) / 256), block: 256. gw, gb: null without parameter gradients.
extern "C" __global__ void head_logits_bwd(float* __restrict__ dpooled, float* __restrict__ gw, float* __restrict__ gb,
                                           const float* __restrict__ dl, const float* __restrict__ pooled,
                                           const bf16* __restrict__ w, int B, int h) {
    kernel_prologue();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)B * h) dpooled[i] = dl[i / h] * bf2f(w[i % h]);
    if (gw && i < h) {
        float acc = 0.f;
        for (int b = 0; b < B; b++) acc += dl[b] * pooled[(long long)b * h + i];
        gw[i] += acc;
    }
    if (gb && i == h) {
        float acc = 0.f;
        for (int b = 0; b < B; b++) acc += dl[b];
        gb[0] += acc;
    }
}
