// Products with a tiny dimension: a few samples' rows through a linear layer (the MMDiT's adaLN
// modulation layers read one conditioning vector per sample). Memory-bound on the weight or its
// gradient; cuBLASLt runs them far below the copy rate (H200, docs/perf-log.md 2026-11-27:
// [1 × 9216 × 1536] in 14.7 µs, 2.2× a read of the weight; its weight gradient in 67 µs, 2.4× a
// read and write of the f32 gradient). CPU twin: the CPU GEMM (src/kernels/gemm.rs), which the
// tests compare against.
//
//   gemv_small_m         y = x·wᵀ (+ bias) for M ≤ 8 rows of x: one warp per output column
//   weight_grad_small_k  g += aᵀ·b over K ≤ 8 rows, and the bias gradient
//   gemv_small_m_nn_partial  split partials of x·w (w [K, N] read along its rows) for M ≤ 8 rows
//                            of x: a modulation layer's input gradient, summed by the launch's
//                            last block of each column block (or by sum_splits)
#include "common.cuh"

// y[m, n] = Σ_k x[m, k]·w[n, k] + bias[n] (bias may be null), bf16 in and out, f32 sums, M ≤ 8,
// K % 8 == 0, x and w 16-byte aligned. Warp j of a block takes column n = 8·blockIdx.x + j: its
// lanes stride over the row of w in 16-byte packs (the block's 8 rows of w are contiguous), up to
// GEMV_PACKS packs a lane loaded before the first is used — the whole row while K ≤ 2048, so a
// warp waits for memory once (two packs at a time, the first version waited three times at
// K = 1536 and ran at 56% of the copy rate on an H100) — each pack against the same pack of every
// row of x (read from cache), then a warp sum per row. grid: ceil(N / 8), block: 256.
#define GEMV_PACKS 8
extern "C" __global__ void __launch_bounds__(256)
    gemv_small_m(bf16* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w,
                 const bf16* __restrict__ bias, int M, int N, int K) {
    kernel_prologue();
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (n >= N) return;
    float acc[8];
#pragma unroll
    for (int m = 0; m < 8; m++) acc[m] = 0.f;
    const bf16* wr = w + (long long)n * K;
    const int packs = K / 8;
    for (int base = lane; base < packs; base += 32 * GEMV_PACKS) {
        pack16 wp[GEMV_PACKS];
#pragma unroll
        for (int u = 0; u < GEMV_PACKS; u++)
            if (base + 32 * u < packs) wp[u] = load16(wr + 8 * (base + 32 * u));
#pragma unroll
        for (int u = 0; u < GEMV_PACKS; u++) {
            const int p = base + 32 * u;
            if (p < packs) {
                float wv[8];
                unpack_bf16x8(wp[u], wv);
#pragma unroll
                for (int m = 0; m < 8; m++) {
                    if (m < M) {
                        float xv[8];
                        unpack_bf16x8(load16(x + (long long)m * K + 8 * p), xv);
#pragma unroll
                        for (int k = 0; k < 8; k++) acc[m] += xv[k] * wv[k];
                    }
                }
            }
        }
    }
    const float b = bias != nullptr ? bf2f(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < 8; m++) {
        if (m < M) {
            const float v = warp_sum(acc[m]);
            if (lane == 0) y[(long long)m * N + n] = f2bf(v + b);
        }
    }
}

// A linear layer's weight gradient from K ≤ 8 rows (the modulation layers read one conditioning
// vector per sample): g[m, n] += Σ_k a[k, m]·b[k, n] with a = dy [K, M] and b = x [K, N] (bf16),
// and bias[m] += Σ_k a[k, m] when bias is not null; with `overwrite` g = Σ (g unread: its first
// write since it was zeroed; the bias is added to either way). Memory-bound on g (f32, read and written once):
// cuBLASLt took 67 µs at [9216 × 1536 × 1], 2.4× a copy of g's bytes on an H200. N % 8 == 0, b and
// g 16-byte aligned. grid: (ceil(N / 8 / 128), M), block: 128.
extern "C" __global__ void weight_grad_small_k(float* __restrict__ g, float* __restrict__ bias,
                                               const bf16* __restrict__ a, const bf16* __restrict__ b, int K,
                                               int M, int N, int overwrite) {
    kernel_prologue();
    const int m = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    float av[8];
#pragma unroll
    for (int k = 0; k < 8; k++) av[k] = k < K ? bf2f(a[(long long)k * M + m]) : 0.f;
    if (bias != nullptr && c == 0) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) s += av[k];
        bias[m] += s;
    }
    if (c >= N / 8) return;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (k < K) {
            float bv[8];
            unpack_bf16x8(load16(b + (long long)k * N + 8 * c), bv);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += av[k] * bv[j];
        }
    }
    float* gp = g + (long long)m * N + 8 * c;
    float4 g0 = make_float4(0.f, 0.f, 0.f, 0.f), g1 = g0;
    if (!overwrite) {  // the gradient's first write since it was zeroed reads nothing
        g0 = load_f4(gp);
        g1 = load_f4(gp + 4);
    }
    g0.x += acc[0];
    g0.y += acc[1];
    g0.z += acc[2];
    g0.w += acc[3];
    g1.x += acc[4];
    g1.y += acc[5];
    g1.z += acc[6];
    g1.w += acc[7];
    store_f4(gp, g0);
    store_f4(gp + 4, g1);
}

// The input gradient of a modulation layer: y[m, n] = Σ_k x[m, k]·w[k, n] for M ≤ 8 rows of x
// (the output gradient) and w [K, N] row-major (the layer's weight, read along its rows), as
// per-split f32 partial rows, summed (and added into an f32 gradient) by sum_splits. cuBLASLt ran
// this skinny product through its general path. Block (t, s) takes columns 256·t + 8·lane of its
// warps (one 16-byte pack of a row of w a lane) over rows k0 + warp + 8·j of split s (rows
// [s·R, (s + 1)·R)), four rows' loads in flight a lane; the 8 warps' sums meet in shared memory,
// added in warp order, so the result depends on the shape only. N % 8 == 0, w 16-byte aligned.
// grid: (ceil(N / 256), S), block: 256, dynamic shared memory 8·M·256 floats.
#define NN_UNROLL 4
extern "C" __global__ void __launch_bounds__(256)
    gemv_small_m_nn_partial(float* __restrict__ part, const bf16* __restrict__ x, const bf16* __restrict__ w,
                            int M, int N, int K, int R, float* out, int accumulate, unsigned* tickets) {
    kernel_prologue();
    DYNAMIC_SMEM(float, red);  // [8 warps][M][256 columns]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 256 + 8 * lane;  // this lane's first column
    const bool mine = c < N;
    const int k0 = blockIdx.y * R, k1 = min(K, k0 + R);
    float acc[8][8];
#pragma unroll
    for (int m = 0; m < 8; m++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[m][j] = 0.f;
    for (int k = k0 + warp; k < k1; k += 8 * NN_UNROLL) {
        pack16 wp[NN_UNROLL];
#pragma unroll
        for (int u = 0; u < NN_UNROLL; u++) {
            const int r = k + 8 * u;
            if (mine && r < k1) wp[u] = load16(w + (long long)r * N + c);
        }
#pragma unroll
        for (int u = 0; u < NN_UNROLL; u++) {
            const int r = k + 8 * u;
            if (!mine || r >= k1) continue;
            float wv[8];
            unpack_bf16x8(wp[u], wv);
#pragma unroll
            for (int m = 0; m < 8; m++) {
                if (m < M) {
                    const float xv = bf2f(x[(long long)m * K + r]);
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[m][j] += xv * wv[j];
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 8; m++)
        if (m < M)
#pragma unroll
            for (int j = 0; j < 8; j++) red[(warp * M + m) * 256 + 8 * lane + j] = acc[m][j];
    __syncthreads();
    const int col = blockIdx.x * 256 + threadIdx.x;
    if (col < N)
        for (int m = 0; m < M; m++) {
            float s = 0.f;
            for (int v = 0; v < 8; v++) s += red[(v * M + m) * 256 + threadIdx.x];
            part[((long long)blockIdx.y * M + m) * N + col] = s;
        }
    // With tickets, the last of the S blocks of this column block to finish sums their partials
    // in split order into out (added to it when accumulate), instead of a sum_splits launch.
    if (tickets == nullptr || !last_block_to_finish(tickets + blockIdx.x, gridDim.y) || col >= N) return;
    for (int m = 0; m < M; m++) {
        float s = 0.f;
        for (int v = 0; v < (int)gridDim.y; v++) s += load_volatile(part + ((long long)v * M + m) * N + col);
        float* o = out + (long long)m * N + col;
        *o = accumulate ? *o + s : s;
    }
}
