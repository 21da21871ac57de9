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
//
// The partial rows are then summed by the kernel's own last block of each column slice
// (column_tail) when the launcher hands it tickets, else by a sum_splits launch after it: a
// backward ran ~450 of those at 1024 px, each a dependent launch of a few µs for a few hundred
// KB (`ColumnSums` in src/kernels/adaln.rs).
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
    STATIC_SMEM(float, lanes, [2 * 8 * LANE_THREADS]);
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

// Bits of a column kernel's `flags` for its accumulator a (column_tail):
#define COLUMN_ACCUMULATE(a) (1 << (a))  // out[a] += the sums (else out[a] = the sums)
#define COLUMN_WHOLE(a) (1 << (4 + (a)))  // out[a] is one row [D]: every sample's rows summed
                                          // (else [B, D], each sample's own)

// Whether this block is the last of its column slice (blockIdx.x) to finish, the slice's B·S
// blocks counted by tickets[blockIdx.x] (last_block_to_finish). Every thread of the block calls it.
__device__ __forceinline__ bool last_of_column_slice(unsigned* tickets) {
    return last_block_to_finish(tickets + blockIdx.x, gridDim.y * gridDim.z);
}

// The last block of a column slice (last_of_column_slice) sums the slice's partial rows written
// by write_lane_partials into out[a] (see the COLUMN_* flags): lane y adds the rows y, y + Y, …
// of each output row's R rows (per sample: s·B + b over s; whole: every s·B + b in order), 8
// columns of pack c, then the lanes' sums are added in lane order — a fixed order for given
// (S, B, Y), so the result is deterministic. Every thread of the block calls it.
template <int NACC>
__device__ __forceinline__ void column_tail(float* const (&out)[NACC], float* const (&part)[NACC], int flags,
                                            unsigned* tickets, int B, int D, int c) {
    if (!last_of_column_slice(tickets)) return;
    STATIC_SMEM(float, lanes, [8 * LANE_THREADS]);
    const int S = gridDim.z, X = blockDim.x, Y = blockDim.y, x = threadIdx.x, y = threadIdx.y, n = X * Y;
    const bool mine = c < D / 8;
#pragma unroll
    for (int a = 0; a < NACC; a++) {
        const bool whole = (flags & COLUMN_WHOLE(a)) != 0, accumulate = (flags & COLUMN_ACCUMULATE(a)) != 0;
        const int groups = whole ? 1 : B, rows = whole ? S * B : S;
        for (int g = 0; g < groups; g++) {
            float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (mine)
                for (int r = y; r < rows; r += Y) {
                    const long long row = whole ? r : (long long)r * B + g;
                    const float* p = part[a] + row * D + 8 * c;
#pragma unroll
                    for (int k = 0; k < 8; k++) t[k] += load_volatile(p + k);
                }
#pragma unroll
            for (int k = 0; k < 8; k++) lanes[k * n + y * X + x] = t[k];
            __syncthreads();
            if (y == 0 && mine) {
                float* o = out[a] + (long long)g * D + 8 * c;
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    float sum = 0.f;
                    for (int w = 0; w < Y; w++) sum += lanes[k * n + w * X + x];
                    o[k] = accumulate ? o[k] + sum : sum;
                }
            }
            __syncthreads();
        }
    }
}

// A column kernel's end: its partial rows, and with tickets their sums into out (column_tail);
// without (nullptr), a sum_splits launch after the kernel sums them.
template <int NACC>
__device__ __forceinline__ void finish_columns(float* const (&part)[NACC], float* const (&out)[NACC],
                                               const float (&acc)[NACC][8], int B, int D, int c,
                                               unsigned* tickets, int flags) {
    write_lane_partials<NACC>(part, acc, B, D, c);
    if (tickets != nullptr) column_tail<NACC>(out, part, flags, tickets, B, D, c);
}
