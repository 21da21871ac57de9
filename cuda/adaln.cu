// adaLN modulation and the gated residual (MMDIT.md A.3), bf16 in and out, f32 math.
// CPU twin: src/kernels/adaln.rs.
//
//   adaln_modulate_fwd:  y = (x − μ)·rstd·(1 + scale[b]) + shift[b], saving μ and rstd per row
//   adaln_modulate_bwd:  dx per row; dshift, dscale as per-split column partials summed in a fixed
//                        order (by the kernel's last block or sum_splits), so the reduction over a
//                        sample's tokens is deterministic;
//                        `_dx_acc` adds dx into the residual stream's f32 gradient instead
//   gated_residual_adaln_fwd: the two above in one pass (the residual, then adaLN of it)
//   gated_residual_adaln_of_x_fwd: the residual and adaLN of its input x in one pass
//   gated_residual_fwd:  out = x + gate[b]·y;  its backward reuses colsum_mul_partial, or
//                        gated_residual_bwd_vec adds the producing layer's bias gradient in one pass
//
// Rows are tokens of [B, L, D]; a row's sample is row / L. The modulation vectors (shift, scale,
// gate) are rows of M ≥ D elements, sample b's at b·M: windows of the modulation GEMM's output
// [B, n·D] (M = n·D), so its chunks need no copies. When D % 8 == 0 and D ≤ 8192 one
// block handles one row with one 16-byte pack (8 bf16) per thread held in registers, so x is read
// from memory once and registers stay few (high occupancy; the first version kept up to 12 packs
// per lane of a warp-per-row kernel and ran at 48% of the copy rate on an H200 for want of
// occupancy). Other widths take the warp-per-row scalar kernels (`*_rows`), which re-read the
// row from cache.
#include "column_lanes.cuh"

#define ROWS_PER_BLOCK 4

__device__ __forceinline__ void adaln_fwd_row_scalar(bf16* __restrict__ y, float* __restrict__ mean_out,
                                                     float* __restrict__ rstd_out, const bf16* __restrict__ x,
                                                     const bf16* __restrict__ shift,
                                                     const bf16* __restrict__ scale, long long row, int L, int D,
                                                     float eps, int M) {
    const int lane = threadIdx.x & 31;
    const bf16* xr = x + row * D;
    float sum = 0.f;
    for (int j = lane; j < D; j += 32) sum += bf2f(xr[j]);
    const float mu = warp_sum(sum) / D;
    float sq = 0.f;
    for (int j = lane; j < D; j += 32) {
        float d = bf2f(xr[j]) - mu;
        sq += d * d;
    }
    const float rs = rsqrtf(warp_sum(sq) / D + eps);
    const long long b = row / L;
    for (int j = lane; j < D; j += 32) {
        float o = (bf2f(xr[j]) - mu) * rs * (1.f + bf2f(scale[b * M + j])) + bf2f(shift[b * M + j]);
        y[row * D + j] = f2bf(o);
    }
    if (lane == 0) {
        mean_out[row] = mu;
        rstd_out[row] = rs;
    }
}

// Scalar path, any D: one warp per row. grid: ceil(rows / ROWS_PER_BLOCK), block: 32·ROWS_PER_BLOCK.
extern "C" __global__ void __launch_bounds__(32 * ROWS_PER_BLOCK)
    adaln_modulate_fwd_rows(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                            const bf16* __restrict__ x, const bf16* __restrict__ shift,
                            const bf16* __restrict__ scale, int rows, int L, int D, float eps, int M) {
    kernel_prologue();
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= rows) return;
    adaln_fwd_row_scalar(y, mean, rstd, x, shift, scale, row, L, D, eps, M);
}

// Loads pack c of a bf16 row as 8 floats: one 16-byte load (the launcher guarantees 16-byte
// aligned buffers and D % 8 == 0).
__device__ __forceinline__ void load_pack(const bf16* row, int c, float f[8]) {
    unpack_bf16x8(load16(row + 8 * c), f);
}

// Packs (8 bf16) per thread of the vector kernels: two, so each thread has two independent
// 16-byte loads per tensor in flight and a 1536-wide row takes 96 threads (21 blocks per SM
// rather than 10: more bytes in flight per SM, which a kernel this short is limited by).
#define PACKS 2

// Vector path (D % 8 == 0, D/8 ≤ 2048): grid: rows, block: ceil(D/8 / PACKS) rounded up to a
// multiple of 32. The modulation packs are loaded before the reductions so their latency hides
// behind them. RESID: mid = x + gate[b]·yres is formed (rounded to bf16 and stored,
// gated_residual_fwd's value) and is the row normalised, so a gated residual and the adaLN after
// it take one pass — or, with LN_OF_X, x itself is normalised beside it (an MMDiT-X block's second
// attention normalises the block's input while its first attention's residual is added to it).
template <bool RESID, bool LN_OF_X = false>
__device__ __forceinline__ void adaln_fwd_vec(bf16* __restrict__ y, float* __restrict__ mean,
                                              float* __restrict__ rstd, const bf16* __restrict__ x,
                                              const bf16* __restrict__ shift, const bf16* __restrict__ scale, int L,
                                              int D, float eps, int M, bf16* __restrict__ mid,
                                              const bf16* __restrict__ gate, const bf16* __restrict__ yres,
                                              int GM) {
    STATIC_SMEM(float, scratch, [32]);
    const long long row = blockIdx.x;
    const int nvec = D / 8;
    const long long b = row / L;
    pack16 px[PACKS], psh[PACKS], psc[PACKS], pg[PACKS], py[PACKS];
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        const int c = threadIdx.x + p * blockDim.x;
        if (c < nvec) {
            px[p] = load16(x + row * D + 8 * c);
            if constexpr (RESID) {
                py[p] = load16(yres + row * D + 8 * c);
                pg[p] = load16(gate + b * GM + 8 * c);
            }
            psh[p] = load16(shift + b * M + 8 * c);
            psc[p] = load16(scale + b * M + 8 * c);
        }
    }
    float v[PACKS][8];
    float sum = 0.f;
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        const int c = threadIdx.x + p * blockDim.x;
        if (c < nvec) {
            unpack_bf16x8(px[p], v[p]);
            if constexpr (RESID) {
                float fg[8], fy[8];
                unpack_bf16x8(pg[p], fg);
                unpack_bf16x8(py[p], fy);
                float sum_row[8];
#pragma unroll
                for (int k = 0; k < 8; k++) sum_row[k] = v[p][k] + fg[k] * fy[k];
                const pack16 m = pack_bf16x8(sum_row);
                store16(mid + row * D + 8 * c, m);
                if constexpr (!LN_OF_X) unpack_bf16x8(m, v[p]);  // normalise the stored (rounded) values
            }
#pragma unroll
            for (int k = 0; k < 8; k++) sum += v[p][k];
        }
    }
    const float mu = block_sum(sum, scratch) / D;
    float sq = 0.f;
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        if (threadIdx.x + p * blockDim.x < nvec) {
#pragma unroll
            for (int k = 0; k < 8; k++) sq += (v[p][k] - mu) * (v[p][k] - mu);
        }
    }
    const float rs = rsqrtf(block_sum(sq, scratch) / D + eps);
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        const int c = threadIdx.x + p * blockDim.x;
        if (c < nvec) {
            float fs[8], fc[8], o[8];
            unpack_bf16x8(psh[p], fs);
            unpack_bf16x8(psc[p], fc);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = (v[p][k] - mu) * rs * (1.f + fc[k]) + fs[k];
            store16(y + row * D + 8 * c, pack_bf16x8(o));
        }
    }
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    adaln_modulate_fwd(bf16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                       const bf16* __restrict__ x, const bf16* __restrict__ shift,
                       const bf16* __restrict__ scale, int rows, int L, int D, float eps, int M) {
    kernel_prologue();
    adaln_fwd_vec<false>(y, mean, rstd, x, shift, scale, L, D, eps, M, nullptr, nullptr, nullptr, 0);
}

// gated_residual_fwd then adaln_modulate_fwd of its output in one pass (the vector path's
// conditions, and every buffer 16-byte aligned): mid = x + gate[b]·yres, y = adaLN(mid). The gate's
// rows are GM apart, shift's and scale's M (one block's gate, the next block's adaLN).
extern "C" __global__ void __launch_bounds__(1024)
    gated_residual_adaln_fwd(bf16* __restrict__ mid, bf16* __restrict__ y, float* __restrict__ mean,
                             float* __restrict__ rstd, const bf16* __restrict__ x, const bf16* __restrict__ gate,
                             const bf16* __restrict__ yres, const bf16* __restrict__ shift,
                             const bf16* __restrict__ scale, int rows, int L, int D, float eps, int M, int GM) {
    kernel_prologue();
    adaln_fwd_vec<true>(y, mean, rstd, x, shift, scale, L, D, eps, M, mid, gate, yres, GM);
}

// gated_residual_fwd and adaln_modulate_fwd of its *input* x in one pass (conditions as above):
// mid = x + gate[b]·yres, y = adaLN(x) — one read of x instead of two.
extern "C" __global__ void __launch_bounds__(1024)
    gated_residual_adaln_of_x_fwd(bf16* __restrict__ mid, bf16* __restrict__ y, float* __restrict__ mean,
                                  float* __restrict__ rstd, const bf16* __restrict__ x, const bf16* __restrict__ gate,
                                  const bf16* __restrict__ yres, const bf16* __restrict__ shift,
                                  const bf16* __restrict__ scale, int rows, int L, int D, float eps, int M, int GM) {
    kernel_prologue();
    adaln_fwd_vec<true, true>(y, mean, rstd, x, shift, scale, L, D, eps, M, mid, gate, yres, GM);
}

// dx of one row: dx̂ = dy·(1+scale); dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
// Scalar loop over the row (three cached passes); the row-wise parts are cheap next to the
// column reductions of the parameter gradients.
// grid: ceil(rows / ROWS_PER_BLOCK), block: 32·ROWS_PER_BLOCK.
extern "C" __global__ void __launch_bounds__(32 * ROWS_PER_BLOCK)
    adaln_modulate_bwd_dx_rows(bf16* __restrict__ dx, const bf16* __restrict__ x, const bf16* __restrict__ scale,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          const bf16* __restrict__ dy, int rows, int L, int D, int M) {
    kernel_prologue();
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const long long b = row / L;
    const float mu = mean[row], rs = rstd[row];
    const bf16* xr = x + row * D;
    const bf16* gr = dy + row * D;
    const bf16* sc = scale + b * M;
    float sg = 0.f, sgx = 0.f;
    for (int j = lane; j < D; j += 32) {
        float xh = (bf2f(xr[j]) - mu) * rs;
        float dxh = bf2f(gr[j]) * (1.f + bf2f(sc[j]));
        sg += dxh;
        sgx += dxh * xh;
    }
    const float mg = warp_sum(sg) / D, mgx = warp_sum(sgx) / D;
    for (int j = lane; j < D; j += 32) {
        float xh = (bf2f(xr[j]) - mu) * rs;
        float dxh = bf2f(gr[j]) * (1.f + bf2f(sc[j]));
        dx[row * D + j] = f2bf(rs * (dxh - mg - xh * mgx));
    }
}

// One adaLN's operands of the dx kernels: its scale chunk (rows M apart), its saved statistics
// and its output gradient.
struct LnGradIn {
    const bf16* scale;
    const float* mean;
    const float* rstd;
    const bf16* dy;
    int M;
};

// Vector dx (D % 8 == 0, D/8 ≤ 1024): grid: rows, block: D/8 rounded up to a multiple of 32.
// ACC: instead of dx (bf16), out = a + dx (f32, dx rounded to bf16 first, as the two-kernel path
// adds it) and, when out16 is not null, out's bf16 rounding; `out` may be `a` (in-place
// accumulation): the residual stream's gradient in the same pass, saving the bf16 dx's write and
// read and a launch (adaln_modulate_bwd_dx + residual_grad_add before).
// N = 2 (ACC only): two adaLNs of the same x (an MMDiT-X block's first and attn2's), their dx
// added in order — out = (a + bf16(dx₀)) + bf16(dx₁), each dx's row sums as the N = 1 kernel forms
// them: the bits of two N = 1 launches, with x read once and the f32 gradient once.
template <bool ACC, int N>
__device__ __forceinline__ void adaln_bwd_dx_vec(bf16* __restrict__ dx, float* out, bf16* __restrict__ out16,
                                                 const float* a, const bf16* __restrict__ x, const LnGradIn (&in)[N],
                                                 int L, int D) {
    static_assert(N == 1 || ACC, "two adaLNs only accumulate");
    STATIC_SMEM(float, scratch, [32]);
    const long long row = blockIdx.x;
    const int c = threadIdx.x;
    const bool mine = c < D / 8;
    float xv[8], xh[N][8], dxh[N][8], acc[8];
    float sg[N], sgx[N], rs[N];
#pragma unroll
    for (int n = 0; n < N; n++) sg[n] = sgx[n] = 0.f;
    if (mine) {
        float g[N][8], sc[N][8];
        load_pack(x + row * D, c, xv);
#pragma unroll
        for (int n = 0; n < N; n++) {
            load_pack(in[n].dy + row * D, c, g[n]);
            load_pack(in[n].scale + (row / L) * in[n].M, c, sc[n]);
        }
        if constexpr (ACC) {
            const float4 a0 = load_f4(a + row * D + 8 * c);
            const float4 a1 = load_f4(a + row * D + 8 * c + 4);
            acc[0] = a0.x, acc[1] = a0.y, acc[2] = a0.z, acc[3] = a0.w;
            acc[4] = a1.x, acc[5] = a1.y, acc[6] = a1.z, acc[7] = a1.w;
        }
#pragma unroll
        for (int n = 0; n < N; n++) {
            const float mu = in[n].mean[row];
            rs[n] = in[n].rstd[row];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                xh[n][k] = (xv[k] - mu) * rs[n];
                dxh[n][k] = g[n][k] * (1.f + sc[n][k]);
                sg[n] += dxh[n][k];
                sgx[n] += dxh[n][k] * xh[n][k];
            }
        }
    } else {
#pragma unroll
        for (int n = 0; n < N; n++) rs[n] = 0.f;
    }
    float mg[N], mgx[N];
#pragma unroll
    for (int n = 0; n < N; n++) {
        mg[n] = block_sum(sg[n], scratch) / D;
        mgx[n] = block_sum(sgx[n], scratch) / D;
    }
    if (!mine) return;
#pragma unroll
    for (int n = 0; n < N; n++) {
        float o[8];
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = rs[n] * (dxh[n][k] - mg[n] - xh[n][k] * mgx[n]);
        if constexpr (!ACC) {
            store16(dx + row * D + 8 * c, pack_bf16x8(o));
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) acc[k] += bf2f(f2bf(o[k]));
        }
    }
    if constexpr (ACC) {
        float* dst = out + row * D + 8 * c;
        store_f4(dst, make_float4(acc[0], acc[1], acc[2], acc[3]));
        store_f4(dst + 4, make_float4(acc[4], acc[5], acc[6], acc[7]));
        if (out16 != nullptr) store16(out16 + row * D + 8 * c, pack_bf16x8(acc));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    adaln_modulate_bwd_dx(bf16* __restrict__ dx, const bf16* __restrict__ x, const bf16* __restrict__ scale,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          const bf16* __restrict__ dy, int rows, int L, int D, int M) {
    kernel_prologue();
    const LnGradIn in[1] = {{scale, mean, rstd, dy, M}};
    adaln_bwd_dx_vec<false, 1>(dx, nullptr, nullptr, nullptr, x, in, L, D);
}

// adaln_modulate_bwd_dx adding dx into the residual stream's gradient (adaln_bwd_dx_vec's ACC).
// grid: rows, block: as adaln_modulate_bwd_dx.
extern "C" __global__ void __launch_bounds__(1024)
    adaln_modulate_bwd_dx_acc(float* out, bf16* __restrict__ out16, const float* a, const bf16* __restrict__ x,
                              const bf16* __restrict__ scale, const float* __restrict__ mean,
                              const float* __restrict__ rstd, const bf16* __restrict__ dy, int rows, int L, int D,
                              int M) {
    kernel_prologue();
    const LnGradIn in[1] = {{scale, mean, rstd, dy, M}};
    adaln_bwd_dx_vec<true, 1>(nullptr, out, out16, a, x, in, L, D);
}

// Two adaLNs of the same x added into the residual stream's gradient in one pass
// (adaln_bwd_dx_vec's N = 2): pair 0's dx first, then pair 1's. grid, block: as above.
extern "C" __global__ void __launch_bounds__(1024)
    adaln_modulate_bwd_dx_acc2(float* out, bf16* __restrict__ out16, const float* a, const bf16* __restrict__ x,
                               const bf16* __restrict__ scale0, const float* __restrict__ mean0,
                               const float* __restrict__ rstd0, const bf16* __restrict__ dy0, int M0,
                               const bf16* __restrict__ scale1, const float* __restrict__ mean1,
                               const float* __restrict__ rstd1, const bf16* __restrict__ dy1, int M1, int rows,
                               int L, int D) {
    kernel_prologue();
    const LnGradIn in[2] = {{scale0, mean0, rstd0, dy0, M0}, {scale1, mean1, rstd1, dy1, M1}};
    adaln_bwd_dx_vec<true, 2>(nullptr, out, out16, a, x, in, L, D);
}

// adaLN's column partials, 8 columns a thread in row lanes (column_lanes.cuh):
//   part_shift[s, b, j] = Σ dy,  part_scale[s, b, j] = Σ dy·x̂  over split s of sample b's rows,
// summed into out_shift, out_scale by the kernel's tail (finish_columns) or by sum_splits.
extern "C" __global__ void __launch_bounds__(LANE_THREADS, LANE_BLOCKS_PER_SM)
    adaln_modulate_bwd_params_vec(float* __restrict__ part_shift, float* __restrict__ part_scale,
                                  const bf16* __restrict__ x, const float* __restrict__ mean,
                                  const float* __restrict__ rstd, const bf16* __restrict__ dy, int B, int L, int D,
                                  float* out_shift, float* out_scale, unsigned* tickets, int flags) {
    kernel_prologue();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    const LaneRows rows = lane_rows(L);
    float acc[2][8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[0][k] = acc[1][k] = 0.f;
    if (c < D / 8) {
        for (int l = rows.first; l < rows.end; l += COLUMN_ROWS * rows.step) {
            pack16 px[COLUMN_ROWS], pg[COLUMN_ROWS];
            float mu[COLUMN_ROWS], rs[COLUMN_ROWS];
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++) {
                if (l + r * rows.step < rows.end) {
                    const long long row = (long long)b * L + l + r * rows.step;
                    mu[r] = mean[row];
                    rs[r] = rstd[row];
                    px[r] = load16(x + row * D + 8 * c);
                    pg[r] = load16(dy + row * D + 8 * c);
                }
            }
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++) {
                if (l + r * rows.step < rows.end) {
                    float xv[8], g[8];
                    unpack_bf16x8(px[r], xv);
                    unpack_bf16x8(pg[r], g);
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        acc[0][k] += g[k];
                        acc[1][k] += g[k] * (xv[k] - mu[r]) * rs[r];
                    }
                }
            }
        }
    }
    float* const part[2] = {part_shift, part_scale};
    float* const out[2] = {out_shift, out_scale};
    finish_columns<2>(part, out, acc, B, D, c, tickets, flags);
}

// Column partial sums over the tokens of each sample, split S ways along L:
//   part_shift[s, b, j] = Σ_{l in split s} dy[b, l, j]
//   part_scale[s, b, j] = Σ_{l in split s} dy[b, l, j]·x̂[b, l, j]
// grid: (ceil(D / 128), B, S), block: 128. Reduce with sum_splits.
extern "C" __global__ void adaln_modulate_bwd_params(float* __restrict__ part_shift, float* __restrict__ part_scale,
                                                     const bf16* __restrict__ x, const float* __restrict__ mean,
                                                     const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                                     int B, int L, int D) {
    kernel_prologue();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y, s = blockIdx.z, S = gridDim.z;
    if (j >= D) return;
    const int per = (L + S - 1) / S;
    const int l0 = s * per, l1 = min(L, l0 + per);
    float a_sh = 0.f, a_sc = 0.f;
    for (int l = l0; l < l1; l++) {
        const long long row = (long long)b * L + l;
        float g = bf2f(dy[row * D + j]);
        float xh = (bf2f(x[row * D + j]) - mean[row]) * rstd[row];
        a_sh += g;
        a_sc += g * xh;
    }
    const long long o = ((long long)s * B + b) * D + j;
    part_shift[o] = a_sh;
    part_scale[o] = a_sc;
}

// out[i] = Σ_s part[s·n + i]  (f32 out, or added to `out` when accumulate != 0).
// grid: ceil(n / 32), block: (32, Y), Y ≤ 32. Thread (c, y) sums splits y, y + Y, y + 2Y, … of
// column c, then row y = 0 adds the Y sums in order of y: the order depends on (S, n, Y) only,
// so the result is deterministic. The Y lanes along the splits are what make it fast: with one
// thread per column (the first version) a 64-column weight gradient over 416 splits ran on one
// block as 416 dependent loads, longer than the norm's backward itself.
__device__ __forceinline__ void sum_splits_cols(float* __restrict__ out, const float* __restrict__ part, int S,
                                                long long n, int accumulate, float (*sums)[32]) {
    const long long i = (long long)blockIdx.x * 32 + threadIdx.x;
    const int Y = blockDim.y, y = threadIdx.y;
    float a = 0.f;
    if (i < n)
        for (int s = y; s < S; s += Y) a += part[(long long)s * n + i];
    sums[y][threadIdx.x] = a;
    __syncthreads();
    if (y == 0 && i < n) {
        float t = 0.f;
        for (int k = 0; k < Y; k++) t += sums[k][threadIdx.x];
        out[i] = accumulate ? out[i] + t : t;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    sum_splits(float* __restrict__ out, const float* __restrict__ part, int S, long long n, int accumulate) {
    kernel_prologue();
    STATIC_SMEM(float, sums, [32][32]);
    sum_splits_cols(out, part, S, n, accumulate, sums);
}

// Two independent sum_splits in one launch (a backward's pair of column reductions: adaLN's
// dshift and dscale, the gated residual's dgate and bias gradient): blockIdx.y picks the pair.
// grid: (ceil(max(n0, n1) / 32), 2), block: (32, Y).
extern "C" __global__ void __launch_bounds__(1024)
    sum_splits2(float* __restrict__ out0, const float* __restrict__ part0, int S0, long long n0, int acc0,
                float* __restrict__ out1, const float* __restrict__ part1, int S1, long long n1, int acc1) {
    kernel_prologue();
    STATIC_SMEM(float, sums, [32][32]);
    if (blockIdx.y == 0)
        sum_splits_cols(out0, part0, S0, n0, acc0, sums);
    else
        sum_splits_cols(out1, part1, S1, n1, acc1, sums);
}

// out = x + gate[b]·y, 8 elements per thread when D % 8 == 0 and the buffers are 16-byte aligned
// (else one).
extern "C" __global__ void gated_residual_fwd(bf16* __restrict__ out, const bf16* __restrict__ x,
                                              const bf16* __restrict__ gate, const bf16* __restrict__ y,
                                              long long rows, int L, int D, int M) {
    kernel_prologue();
    const long long n = rows * D;
    if (D % 8 == 0 && M % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(gate) && aligned16(y)) {
        const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (v * 8 >= n) return;
        const long long e = v * 8, row = e / D;
        const int j = (int)(e - row * D);
        float fx[8], fg[8], fy[8], o[8];
        unpack_bf16x8(load16(x + e), fx);
        unpack_bf16x8(load16(gate + (row / L) * M + j), fg);
        unpack_bf16x8(load16(y + e), fy);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = fx[k] + fg[k] * fy[k];
        store16(out + e, pack_bf16x8(o));
    } else {
        // one element per thread, striding: with D % 8 == 0 but a misaligned buffer (a view) the
        // grid was sized for 8 elements per thread
        const long long step = (long long)gridDim.x * blockDim.x;
        for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
            const long long row = e / D;
            const int j = (int)(e - row * D);
            out[e] = f2bf(bf2f(x[e]) + bf2f(gate[(row / L) * M + j]) * bf2f(y[e]));
        }
    }
}

// dy = gate[b]·dz (elementwise; dx is dz itself), 8 elements per thread when D % 8 == 0 and the
// buffers are 16-byte aligned (else one; the launcher sizes the grid for 8 when D % 8 == 0).
extern "C" __global__ void gated_residual_bwd_dy(bf16* __restrict__ dy, const bf16* __restrict__ gate,
                                                 const bf16* __restrict__ dz, long long rows, int L, int D,
                                                 int M) {
    kernel_prologue();
    const long long n = rows * D;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (D % 8 == 0 && M % 8 == 0 && aligned16(dy) && aligned16(gate) && aligned16(dz)) {
        const long long e = t * 8;
        if (e >= n) return;
        const long long row = e / D;
        const int j = (int)(e - row * D);
        float fg[8], fz[8], o[8];
        unpack_bf16x8(load16(gate + (row / L) * M + j), fg);
        unpack_bf16x8(load16(dz + e), fz);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = fg[k] * fz[k];
        store16(dy + e, pack_bf16x8(o));
    } else {
        // one element per thread: a grid sized for 8 per thread covers 1/8 of them, so loop
        const long long step = (long long)gridDim.x * blockDim.x;
        for (long long e = t; e < n; e += step) {
            const long long row = e / D;
            const int j = (int)(e - row * D);
            dy[e] = f2bf(bf2f(gate[(row / L) * M + j]) * bf2f(dz[e]));
        }
    }
}

// The gated residual's backward in one pass (D % 8 == 0, every buffer 16-byte aligned):
//   dy = gate[b]·dz, and per split s of each sample's rows the column partials
//   part_gate[s, b, j] = Σ dz·y (the gate's gradient, summed as colsum_mul_partial does) and
//   part_bias[s, b, j] = Σ dy as stored in bf16 (the bias gradient of the linear layer that made
//   y, which its weight-gradient GEMM's BGRADB epilogue otherwise sums in a kernel of its own).
// dz is read once (the two-kernel path reads it twice). Row lanes (column_lanes.cuh). Summed into
// out_gate ([B, D]) and out_bias (over S·B rows) as finish_columns says.
extern "C" __global__ void __launch_bounds__(LANE_THREADS, LANE_BLOCKS_PER_SM)
    gated_residual_bwd_vec(bf16* __restrict__ dy, float* __restrict__ part_gate, float* __restrict__ part_bias,
                           const bf16* __restrict__ gate, const bf16* __restrict__ y, const bf16* __restrict__ dz,
                           int B, int L, int D, int M, float* out_gate, float* out_bias, unsigned* tickets,
                           int flags) {
    kernel_prologue();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    const LaneRows rows = lane_rows(L);
    float acc[2][8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[0][k] = acc[1][k] = 0.f;
    if (c < D / 8) {
        float g[8];
        unpack_bf16x8(load16(gate + (long long)b * M + 8 * c), g);
        for (int l = rows.first; l < rows.end; l += COLUMN_ROWS * rows.step) {
            pack16 pz[COLUMN_ROWS], py[COLUMN_ROWS];
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++) {
                if (l + r * rows.step < rows.end) {
                    const long long e = ((long long)b * L + l + r * rows.step) * D + 8 * c;
                    pz[r] = load16(dz + e);
                    py[r] = load16(y + e);
                }
            }
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++) {
                if (l + r * rows.step < rows.end) {
                    const long long e = ((long long)b * L + l + r * rows.step) * D + 8 * c;
                    float z[8], yv[8], o[8], rounded[8];
                    unpack_bf16x8(pz[r], z);
                    unpack_bf16x8(py[r], yv);
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        o[k] = g[k] * z[k];
                        acc[0][k] += z[k] * yv[k];
                    }
                    const pack16 p = pack_bf16x8(o);
                    store16(dy + e, p);
                    unpack_bf16x8(p, rounded);
#pragma unroll
                    for (int k = 0; k < 8; k++) acc[1][k] += rounded[k];
                }
            }
        }
    }
    float* const part[2] = {part_gate, part_bias};
    float* const out[2] = {out_gate, out_bias};
    finish_columns<2>(part, out, acc, B, D, c, tickets, flags);
}

// part[s, b, j] = Σ_{l in split s} a[b, l, j]: colsum_mul_partial without c, 8 columns a thread
// (D % 8 == 0, a 16-byte aligned) in row lanes (column_lanes.cuh). A bias
// gradient (Σ over tokens of a layer's output gradient). Summed into out_sum as finish_columns
// says.
extern "C" __global__ void __launch_bounds__(LANE_THREADS, LANE_BLOCKS_PER_SM)
    colsum_partial_vec(float* __restrict__ part, const bf16* __restrict__ a, int B, int L, int D, float* out_sum,
                       unsigned* tickets, int flags) {
    kernel_prologue();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    const LaneRows rows = lane_rows(L);
    float acc[1][8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[0][k] = 0.f;
    if (c < D / 8) {
        for (int l = rows.first; l < rows.end; l += COLUMN_ROWS * rows.step) {
            pack16 pa[COLUMN_ROWS];
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++)
                if (l + r * rows.step < rows.end)
                    pa[r] = load16(a + ((long long)b * L + l + r * rows.step) * D + 8 * c);
#pragma unroll
            for (int r = 0; r < COLUMN_ROWS; r++) {
                if (l + r * rows.step < rows.end) {
                    float v[8];
                    unpack_bf16x8(pa[r], v);
#pragma unroll
                    for (int k = 0; k < 8; k++) acc[0][k] += v[k];
                }
            }
        }
    }
    float* const parts[1] = {part};
    float* const out[1] = {out_sum};
    finish_columns<1>(parts, out, acc, B, D, c, tickets, flags);
}

// part[s, b, j] = Σ_{l in split s} a[b, l, j]·c[b, l, j]  (c may be null: Σ a). The gate
// gradient of the gated residual is colsum_mul_partial(dz, y) reduced by sum_splits.
// grid: (ceil(D / 128), B, S), block: 128.
extern "C" __global__ void colsum_mul_partial(float* __restrict__ part, const bf16* __restrict__ a,
                                              const bf16* __restrict__ c, int B, int L, int D) {
    kernel_prologue();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y, s = blockIdx.z, S = gridDim.z;
    if (j >= D) return;
    const int per = (L + S - 1) / S;
    const int l0 = s * per, l1 = min(L, l0 + per);
    // COLUMN_ROWS rows' loads in flight at once, summed in row order (as adaln_modulate_bwd_params_vec).
    float acc = 0.f;
    for (int l = l0; l < l1; l += COLUMN_ROWS) {
        float va[COLUMN_ROWS], vc[COLUMN_ROWS];
#pragma unroll
        for (int r = 0; r < COLUMN_ROWS; r++) {
            const long long e = ((long long)b * L + l + r) * D + j;
            const bool ok = l + r < l1;
            va[r] = ok ? bf2f(a[e]) : 0.f;
            vc[r] = ok && c ? bf2f(c[e]) : 1.f;
        }
#pragma unroll
        for (int r = 0; r < COLUMN_ROWS; r++)
            if (l + r < l1) acc += c ? va[r] * vc[r] : va[r];
    }
    part[((long long)s * B + b) * D + j] = acc;
}
