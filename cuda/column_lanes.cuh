// Column sums over rows in "row lanes": the layout of the 16-byte column kernels (8 columns, one
// pack, a thread) that reduce a [B, L, D] tensor over L — adaln.cu's adaln_modulate_bwd_params_vec,
// gated_residual_bwd_vec, colsum_partial_vec and elementwise.cu's gelu_tanh_bwd_colsum.
//
// Block (X, Y): threadIdx.x a pack of 8 columns (blockIdx.x·X + x), threadIdx.y a row lane; grid
// (packs / X, B, S). Lane y walks rows l0 + y, l0 + y + Y, … of split blockIdx.z of sample
// blockIdx.y, COLUMN_ROWS of its rows' loads in flight and summed in row order; then the Y lanes'
// sums are added in lane order (write_lane_partials) and the block writes one partial row
// part[(s·B + b)·D + j]: deterministic for a given (S, Y). Lanes let a split span ≥ 32 rows, so
// the f32 partials written and re-read by sum_splits stay a few percent of the input, while as
// many threads as before keep loads in flight (with one lane and 256 splits, at 2 × 1024 tokens
// the partials were as large as the bf16 input). Y = 1 is the one-lane layout
// (`ColumnLayout::OneLane` in src/kernels/adaln.rs, kept for the kernels bench's A/B).
#pragma once
#include "common.cuh"

#define COLUMN_ROWS 4
#define LANE_THREADS 256
// Blocks an SM keeps resident (≤ 85 registers a thread); the launcher sizes grids to at most this
// many blocks an SM: one wave, 24 warps an SM each with COLUMN_ROWS 16-byte loads an operand in
// flight.
#define LANE_BLOCKS_PER_SM 3

// The rows of this block's split that this lane walks: first, first + step, … < end.
struct LaneRows {
    int first, end, step;
};

__device__ __forceinline__ LaneRows lane_rows(int L) {
    const int S = gridDim.z;
    const int per = (L + S - 1) / S;
    const int l0 = (int)blockIdx.z * per;
    return {l0 + (int)threadIdx.y, min(L, l0 + per), (int)blockDim.y};
}

// Adds the lanes' sums acc[a][0..8) of pack c in lane order and writes them to
// part[a][(s·B + b)·D + 8c + k]. Every thread of the block must call it (a barrier when Y > 1);
// threads past the row (c ≥ D/8) bring zeros and write nothing.
template <int NACC>
__device__ __forceinline__ void write_lane_partials(float* const (&part)[NACC], const float (&acc)[NACC][8], int B,
                                                    int D, int c) {
    const long long o = ((long long)blockIdx.z * B + blockIdx.y) * D + 8 * c;
    const bool mine = c < D / 8;
    const int X = blockDim.x, Y = blockDim.y, x = threadIdx.x, y = threadIdx.y;
    if (Y == 1) {
        if (mine)
#pragma unroll
            for (int a = 0; a < NACC; a++)
#pragma unroll
                for (int k = 0; k < 8; k++) part[a][o + k] = acc[a][k];
        return;
    }
    // [a][k][y][x]: a warp's 32 lanes touch 32 consecutive words
    __shared__ float lanes[2 * 8 * LANE_THREADS];
    const int n = X * Y;
#pragma unroll
    for (int a = 0; a < NACC; a++)
#pragma unroll
        for (int k = 0; k < 8; k++) lanes[(a * 8 + k) * n + y * X + x] = acc[a][k];
    __syncthreads();
    if (y != 0 || !mine) return;
#pragma unroll
    for (int a = 0; a < NACC; a++)
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float t = 0.f;
            for (int w = 0; w < Y; w++) t += lanes[(a * 8 + k) * n + w * X + x];
            part[a][o + k] = t;
        }
}
