// Per-head RMSNorm with a learned weight (SD3.5's QK normalisation, MMDIT.md), bf16 x / y / dy /
// dx and weight, f32 math, f32 statistics and weight gradient.
// CPU twin: src/kernels/qknorm.rs (rms_norm_fwd, rms_norm_bwd).
//
//   rms_norm_fwd:  y = x·rstd·w, rstd = rsqrt(mean(x²) + eps) over each row of D (the head dim),
//                  saving rstd per row
//   rms_norm_bwd:  dx = rstd·(dy·w − x·rstd·mean(dy·w·x̂)) per row, and the weight gradient
//                  Σ_rows dy·x̂ as one f32 partial row per block (fixed grid, fixed order, so the
//                  result is deterministic), summed by the launch's last block (rms_bwd_tail) or
//                  by sum_splits (adaln.cu)
//   rms_norm_fwd2, rms_norm_bwd2: two of the above of one shape in one launch (q's and k's)
//   rms_norm_bwd2_dq32: rms_norm_bwd2 with q's dy read from the attention backward's f32 dQ
//                  accumulator (× its scale, rounded to bf16 as joint_attn_dq_convert would):
//                  the MMDiT's q gradient without that conversion pass
//
// x (and in the backward dx) may be read and written in place inside a wider tensor: rows are
// (token, head) pairs at x_row(row) = (row / H)·ld + (row % H)·D, so the MMDiT normalises q and k
// straight out of its fused qkv projection and writes their gradients straight into the fused
// gradient (no column copies). y, dy and rstd are always contiguous [rows, D] / [rows].
//
// A row belongs to a group of G lanes of one warp (G = the power of two ≥ D/8, at most 32), so at
// head dim 64 a warp normalises four rows and every lane moves 16 bytes per access instead of a
// warp-per-row layout leaving 24 of 32 lanes idle. For D % 8 == 0 each lane keeps its slice of
// the row in registers (forward D ≤ 512, backward D ≤ 256); other widths (odd head dims) take a
// scalar path that re-reads the row from cache.
#include "common.cuh"

#include <type_traits>

#define QK_THREADS 256
#define QK_MAX_VPL 2  // 16-byte vectors per lane kept in registers (forward): D ≤ 32·8·2 = 512
#define QK_ROWS 2     // rows per lane group of the forward, loaded together (memory-level parallelism)
#define QK_BWD_ROWS 2 // rows per lane group per step of the backward

namespace qknorm {

// Element offset of row `row` of x (and dx): rows are (token, head) pairs, H heads of D per token
// and `ld` elements from one token to the next — ld = H·D for a contiguous [rows, D] tensor, 3·H·D
// to read q or k in place from a fused qkv projection [tokens, 3·H·D].
__device__ __forceinline__ long long x_row(long long row, int H, long long ld, int D) {
    return (row / H) * ld + (row % H) * D;
}

// Sum over an aligned group of G lanes (G a power of two ≤ 32). Every lane of the warp must call
// it, including lanes whose row is past the end (they contribute zeros).
__device__ __forceinline__ float group_sum(float v, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// The register path of rms_norm_fwd: QK_ROWS rows per group (rows row0 + k·stride), every x
// vector of all of them (and the lane's weight slice) loaded before the first is used.
template <int VPL>
__device__ __forceinline__ void fwd_rows_vec(bf16* __restrict__ y, float* __restrict__ rstd,
                                             const bf16* __restrict__ x, const bf16* __restrict__ w,
                                             long long row0, long long stride, long long rows, int D,
                                             float eps, int G, int gl, int H, long long ld) {
    const int nvec = D / 8;
    pack16 px[QK_ROWS][VPL], pw[VPL];
#pragma unroll
    for (int i = 0; i < VPL; i++)
        if (gl + G * i < nvec) pw[i] = load16(w + 8 * (gl + G * i));
#pragma unroll
    for (int k = 0; k < QK_ROWS; k++) {
        const long long row = row0 + k * stride;
#pragma unroll
        for (int i = 0; i < VPL; i++) {
            const int c = gl + G * i;
            if (row < rows && c < nvec) px[k][i] = load16(x + x_row(row, H, ld, D) + 8 * c);
        }
    }
    float sq[QK_ROWS];
#pragma unroll
    for (int k = 0; k < QK_ROWS; k++) {
        const long long row = row0 + k * stride;
        sq[k] = 0.f;
#pragma unroll
        for (int i = 0; i < VPL; i++) {
            const int c = gl + G * i;
            if (row < rows && c < nvec) {
                float v[8];
                unpack_bf16x8(px[k][i], v);
#pragma unroll
                for (int e = 0; e < 8; e++) sq[k] += v[e] * v[e];
            }
        }
    }
    // The rows' group sums interleaved: independent shuffles in flight together.
    for (int o = G >> 1; o > 0; o >>= 1)
#pragma unroll
        for (int k = 0; k < QK_ROWS; k++) sq[k] += __shfl_xor_sync(FULL_MASK, sq[k], o);
#pragma unroll
    for (int k = 0; k < QK_ROWS; k++) {
        const long long row = row0 + k * stride;
        if (row >= rows) continue;
        const float rs = rsqrtf(sq[k] / D + eps);
#pragma unroll
        for (int i = 0; i < VPL; i++) {
            const int c = gl + G * i;
            if (c < nvec) {
                float v[8], fw[8], o[8];
                unpack_bf16x8(px[k][i], v);
                unpack_bf16x8(pw[i], fw);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = v[e] * rs * fw[e];
                store16(y + row * D + 8 * c, pack_bf16x8(o));
            }
        }
        if (gl == 0) rstd[row] = rs;
    }
}

__device__ __forceinline__ void fwd_row_scalar(bf16* __restrict__ y, float* __restrict__ rstd,
                                               const bf16* __restrict__ x, const bf16* __restrict__ w,
                                               long long row, bool valid, int D, float eps, int G, int gl,
                                               int H, long long ld) {
    const bf16* xr = x + (valid ? x_row(row, H, ld, D) : 0);
    float sq = 0.f;
    if (valid)
        for (int j = gl; j < D; j += G) {
            const float v = bf2f(xr[j]);
            sq += v * v;
        }
    const float rs = rsqrtf(group_sum(sq, G) / D + eps);
    if (!valid) return;
    for (int j = gl; j < D; j += G) y[row * D + j] = f2bf(bf2f(xr[j]) * rs * bf2f(w[j]));
    if (gl == 0) rstd[row] = rs;
}

// Whether a row of D takes the register path with G lanes, and with how many vectors per lane.
__device__ __forceinline__ int vectors_per_lane(int D, int G, bool aligned) {
    if (D % 8 != 0 || !aligned) return 0;
    const int vpl = (D / 8 + G - 1) / G;
    return vpl <= QK_MAX_VPL ? vpl : 0;
}


// Where the backward's dy comes from: a bf16 tensor, or the attention backward's f32 dQ
// accumulator (joint_attn_bwd_*: unscaled, [rows, D] like dy) times `scale`, rounded to bf16 as
// joint_attn_dq_convert rounds it — the same dy values bit for bit, without that kernel's pass
// (it read the accumulator and wrote a bf16 dQ that this kernel then read back).
// `load` issues a row slice's loads; `settle`, called once every load of a step is issued,
// turns what arrived into a bf16 pack (so the loads of all rows of a step are in flight together).
struct DyBf16 {
    const bf16* p;
    using Raw = pack16;
    __device__ __forceinline__ Raw load(long long e) const { return load16(p + e); }
    __device__ __forceinline__ pack16 settle(const Raw& r) const { return r; }
    __device__ __forceinline__ float at(long long e) const { return bf2f(p[e]); }
    __device__ __forceinline__ bool aligned() const { return aligned16(p); }
};
struct DyScaledF32 {
    const float* p;
    float scale;
    struct Raw {
        pack16 lo, hi;
    };
    __device__ __forceinline__ Raw load(long long e) const { return {load16(p + e), load16(p + e + 4)}; }
    __device__ __forceinline__ pack16 settle(const Raw& r) const {
        float f[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            f[k] = bits_to_float(r.lo.w[k]) * scale;
            f[4 + k] = bits_to_float(r.hi.w[k]) * scale;
        }
        return pack_bf16x8(f);
    }
    __device__ __forceinline__ float at(long long e) const { return bf2f(f2bf(p[e] * scale)); }
    __device__ __forceinline__ bool aligned() const { return aligned16(p); }
};

// The register path of rms_norm_bwd: columns 8·(gl + G·i) .. +8 of every row belong to this lane,
// so its weight slice and its Σ dy·x̂ accumulators stay in registers for the whole loop.
template <int VPL, typename DY>
__device__ __forceinline__ void bwd_rows_vec(bf16* __restrict__ dx, float* __restrict__ my,
                                             const bf16* __restrict__ x, const bf16* __restrict__ w,
                                             const float* __restrict__ rstd, const DY dy,
                                             long long rows, int D, int G, int gl, int grp, int groups, int H,
                                             long long ld) {
    const int nvec = D / 8;
    const long long stride = (long long)gridDim.x * groups * QK_BWD_ROWS;
    float wv[VPL][8], dw[VPL][8];
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        const int c = gl + G * i;
#pragma unroll
        for (int k = 0; k < 8; k++) dw[i][k] = wv[i][k] = 0.f;
        if (c < nvec) unpack_bf16x8(load16(w + 8 * c), wv[i]);
    }
    // A step takes QK_BWD_ROWS rows per group (r0 + grp + k·groups), all their x, dy and rstd
    // loaded before the first is used. The loop bound depends on the block only, so all groups
    // of a warp iterate together.
    for (long long r0 = (long long)blockIdx.x * groups * QK_BWD_ROWS; r0 < rows; r0 += stride) {
        // a bf16 dy is loaded straight into pg (no copy for the compiler to keep apart)
        constexpr bool settles = !std::is_same<typename DY::Raw, pack16>::value;
        pack16 px[QK_BWD_ROWS][VPL], pg[QK_BWD_ROWS][VPL];
        typename DY::Raw raw[QK_BWD_ROWS][settles ? VPL : 1];
        float rs[QK_BWD_ROWS], dot[QK_BWD_ROWS];
#pragma unroll
        for (int k = 0; k < QK_BWD_ROWS; k++) {
            const long long row = r0 + grp + (long long)k * groups;
            rs[k] = row < rows ? rstd[row] : 0.f;
#pragma unroll
            for (int i = 0; i < VPL; i++) {
                const int c = gl + G * i;
                if (row < rows && c < nvec) {
                    px[k][i] = load16(x + x_row(row, H, ld, D) + 8 * c);
                    if constexpr (settles)
                        raw[k][i] = dy.load(row * D + 8 * c);
                    else
                        pg[k][i] = dy.settle(dy.load(row * D + 8 * c));
                }
            }
        }
        if constexpr (settles) {
#pragma unroll
            for (int k = 0; k < QK_BWD_ROWS; k++)
#pragma unroll
                for (int i = 0; i < VPL; i++)
                    if (r0 + grp + (long long)k * groups < rows && gl + G * i < nvec)
                        pg[k][i] = dy.settle(raw[k][i]);
        }
#pragma unroll
        for (int k = 0; k < QK_BWD_ROWS; k++) {
            const long long row = r0 + grp + (long long)k * groups;
            dot[k] = 0.f;
#pragma unroll
            for (int i = 0; i < VPL; i++) {
                const int c = gl + G * i;
                if (row < rows && c < nvec) {
                    float xv[8], gv[8];
                    unpack_bf16x8(px[k][i], xv);
                    unpack_bf16x8(pg[k][i], gv);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const float xh = xv[e] * rs[k];
                        dw[i][e] += gv[e] * xh;
                        dot[k] += gv[e] * wv[i][e] * xh;
                    }
                }
            }
        }
        for (int o = G >> 1; o > 0; o >>= 1)
#pragma unroll
            for (int k = 0; k < QK_BWD_ROWS; k++) dot[k] += __shfl_xor_sync(FULL_MASK, dot[k], o);
#pragma unroll
        for (int k = 0; k < QK_BWD_ROWS; k++) {
            const long long row = r0 + grp + (long long)k * groups;
            if (row >= rows) continue;
            const float m = dot[k] / D;
#pragma unroll
            for (int i = 0; i < VPL; i++) {
                const int c = gl + G * i;
                if (c < nvec) {
                    float xv[8], gv[8], o[8];
                    unpack_bf16x8(px[k][i], xv);
                    unpack_bf16x8(pg[k][i], gv);
#pragma unroll
                    for (int e = 0; e < 8; e++) o[e] = rs[k] * (gv[e] * wv[i][e] - xv[e] * rs[k] * m);
                    store16(dx + x_row(row, H, ld, D) + 8 * c, pack_bf16x8(o));
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < VPL; i++) {
        const int c = gl + G * i;
        if (c < nvec)
#pragma unroll
            for (int k = 0; k < 8; k++) my[8 * c + k] = dw[i][k];
    }
}

}  // namespace qknorm

// grid: ceil(rows / (QK_ROWS·QK_THREADS / G)), block: QK_THREADS; G as chosen by the launcher (a
// power of two ≤ 32; 32 when D % 8 != 0). Block b's group j takes rows b·QK_ROWS·groups + j +
// k·groups, k < QK_ROWS (so each warp access covers consecutive rows).
namespace qknorm {
__device__ __forceinline__ void rms_fwd(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x,
                                        const bf16* __restrict__ w, long long rows, int D, float eps, int G, int H,
                                        long long ld) {
    const int gl = threadIdx.x % G, groups = blockDim.x / G;
    const long long row0 = (long long)blockIdx.x * groups * QK_ROWS + threadIdx.x / G;
    // Past-the-end groups still join their warp's shuffles.
    const int vpl = vectors_per_lane(D, G, aligned16(x) && aligned16(y) && aligned16(w) && ld % 8 == 0);
    if (vpl == 1)
        fwd_rows_vec<1>(y, rstd, x, w, row0, groups, rows, D, eps, G, gl, H, ld);
    else if (vpl == 2)
        fwd_rows_vec<2>(y, rstd, x, w, row0, groups, rows, D, eps, G, gl, H, ld);
    else
        for (int k = 0; k < QK_ROWS; k++) {
            const long long row = row0 + (long long)k * groups;
            fwd_row_scalar(y, rstd, x, w, row, row < rows, D, eps, G, gl, H, ld);
        }
}
}  // namespace qknorm

extern "C" __global__ void __launch_bounds__(QK_THREADS)
    rms_norm_fwd(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x,
                 const bf16* __restrict__ w, long long rows, int D, float eps, int G, int H, long long ld) {
    kernel_prologue();
    qknorm::rms_fwd(y, rstd, x, w, rows, D, eps, G, H, ld);
}

// Two rms_norm_fwd of the same shape in one launch (q's and k's, each with its weight, read from
// the fused qkv projection): blockIdx.y picks the pair. grid: (as rms_norm_fwd, 2).
extern "C" __global__ void __launch_bounds__(QK_THREADS)
    rms_norm_fwd2(bf16* __restrict__ y0, float* __restrict__ rstd0, const bf16* __restrict__ x0,
                  const bf16* __restrict__ w0, bf16* __restrict__ y1, float* __restrict__ rstd1,
                  const bf16* __restrict__ x1, const bf16* __restrict__ w1, long long rows, int D, float eps, int G,
                  int H, long long ld) {
    kernel_prologue();
    if (blockIdx.y == 0)
        qknorm::rms_fwd(y0, rstd0, x0, w0, rows, D, eps, G, H, ld);
    else
        qknorm::rms_fwd(y1, rstd1, x1, w1, rows, D, eps, G, H, ld);
}

// Fused backward: dx of every row and the per-block partial weight gradient.
// grid: P blocks (the launcher picks P from the shape alone, so the reduction order never depends
// on the GPU), block: QK_THREADS, dynamic shared memory (QK_THREADS / G)·D floats. Block p takes
// the steps p, p + P, p + 2P, ... of QK_BWD_ROWS·QK_THREADS / G rows each; dw_part[p·D + j] = the
// block's Σ dy·x̂ over column j.
namespace qknorm {
template <typename DY>
__device__ __forceinline__ void rms_bwd(bf16* __restrict__ dx, float* __restrict__ dw_part, const bf16* __restrict__ x,
                                        const bf16* __restrict__ w, const float* __restrict__ rstd, const DY dy,
                                        long long rows, int D, int G, int H, long long ld) {
    DYNAMIC_SMEM(float, acc);  // [groups][D]: each group's running Σ dy·x̂
    const int groups = blockDim.x / G, grp = threadIdx.x / G, gl = threadIdx.x % G;
    float* my = acc + (long long)grp * D;
    const int vpl =
        vectors_per_lane(D, G, aligned16(x) && aligned16(w) && dy.aligned() && aligned16(dx) && ld % 8 == 0);
    const long long stride = (long long)gridDim.x * groups * QK_BWD_ROWS;

    // Only one vector per lane in the backward (D ≤ 256, every head dim in use): the second
    // (D ≤ 512) would take the kernel from 60 to 112 registers and halve its occupancy.
    if (vpl == 1) {
        bwd_rows_vec<1>(dx, my, x, w, rstd, dy, rows, D, G, gl, grp, groups, H, ld);
    } else {
        // Scalar path: column j of the group's accumulator row belongs to lane j % G alone.
        for (int j = gl; j < D; j += G) my[j] = 0.f;
        for (long long r1 = (long long)blockIdx.x * groups * QK_BWD_ROWS; r1 < rows; r1 += stride)
        for (int k = 0; k < QK_BWD_ROWS; k++) {
            const long long row = r1 + grp + (long long)k * groups;
            const bool valid = row < rows;
            const float rs = valid ? rstd[row] : 0.f;
            const long long xo = valid ? x_row(row, H, ld, D) : 0;
            float dot = 0.f;
            if (valid)
                for (int j = gl; j < D; j += G) {
                    const float xh = bf2f(x[xo + j]) * rs, g = dy.at(row * D + j);
                    my[j] += g * xh;
                    dot += g * bf2f(w[j]) * xh;
                }
            const float m = group_sum(dot, G) / D;
            if (!valid) continue;
            for (int j = gl; j < D; j += G) {
                const float xv = bf2f(x[xo + j]);
                dx[xo + j] = f2bf(rs * (dy.at(row * D + j) * bf2f(w[j]) - xv * rs * m));
            }
        }
    }
    __syncthreads();
    // The block's partial: the groups' accumulators summed in group order.
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float s = 0.f;
        for (int g = 0; g < groups; g++) s += acc[(long long)g * D + j];
        dw_part[(long long)blockIdx.x * D + j] = s;
    }
}

// With a ticket, the last of the launch's P = gridDim.x blocks (of this blockIdx.y) to finish sums
// the partial rows into dw (added to it when accumulate), instead of a sum_splits launch after the
// kernel: thread (j, y) of Y = max(1, blockDim.x / D) lanes adds rows y, y + Y, … of column j, then
// the lanes' sums are added in lane order — a fixed order for a given (P, D). Every thread of the
// block calls it.
__device__ __forceinline__ void rms_bwd_tail(float* dw, const float* dw_part, int D, int accumulate,
                                             unsigned* ticket) {
    if (ticket == nullptr || !last_block_to_finish(ticket, gridDim.x)) return;
    STATIC_SMEM(float, lanes, [QK_THREADS]);
    const int P = gridDim.x, Y = max(1, (int)blockDim.x / D), cols = (int)blockDim.x / Y;
    const int x = (int)threadIdx.x % cols, y = (int)threadIdx.x / cols;
    for (int j0 = 0; j0 < D; j0 += cols) {
        const int j = j0 + x;
        float t = 0.f;
        if (y < Y && j < D)
            for (int p = y; p < P; p += Y) t += load_volatile(dw_part + (long long)p * D + j);
        lanes[threadIdx.x] = t;
        __syncthreads();
        if (y == 0 && j < D) {
            float s = 0.f;
            for (int w = 0; w < Y; w++) s += lanes[w * cols + x];
            dw[j] = accumulate ? dw[j] + s : s;
        }
        __syncthreads();
    }
}
}  // namespace qknorm

extern "C" __global__ void __launch_bounds__(QK_THREADS)
    rms_norm_bwd(bf16* __restrict__ dx, float* __restrict__ dw_part, const bf16* __restrict__ x,
                 const bf16* __restrict__ w, const float* __restrict__ rstd, const bf16* __restrict__ dy,
                 long long rows, int D, int G, int H, long long ld, float* dw, int accumulate,
                 unsigned* tickets) {
    kernel_prologue();
    qknorm::rms_bwd(dx, dw_part, x, w, rstd, qknorm::DyBf16{dy}, rows, D, G, H, ld);
    qknorm::rms_bwd_tail(dw, dw_part, D, accumulate, tickets);
}

// Two rms_norm_bwd of the same shape in one launch (q's and k's): blockIdx.y picks the pair; pair
// y's partials go to dw_part + y·gridDim.x·D, and with tickets (two) their sums to dw<y>.
// grid: (P, 2).
extern "C" __global__ void __launch_bounds__(QK_THREADS)
    rms_norm_bwd2(bf16* __restrict__ dx0, const bf16* __restrict__ x0, const bf16* __restrict__ w0,
                  const float* __restrict__ rstd0, const bf16* __restrict__ dy0, bf16* __restrict__ dx1,
                  const bf16* __restrict__ x1, const bf16* __restrict__ w1, const float* __restrict__ rstd1,
                  const bf16* __restrict__ dy1, float* __restrict__ dw_part, long long rows, int D, int G, int H,
                  long long ld, float* dw0, int acc0, float* dw1, int acc1, unsigned* tickets) {
    kernel_prologue();
    float* part = dw_part + (long long)blockIdx.y * gridDim.x * D;
    if (blockIdx.y == 0)
        qknorm::rms_bwd(dx0, part, x0, w0, rstd0, qknorm::DyBf16{dy0}, rows, D, G, H, ld);
    else
        qknorm::rms_bwd(dx1, part, x1, w1, rstd1, qknorm::DyBf16{dy1}, rows, D, G, H, ld);
    qknorm::rms_bwd_tail(blockIdx.y == 0 ? dw0 : dw1, part, D, blockIdx.y == 0 ? acc0 : acc1,
                         tickets == nullptr ? nullptr : tickets + blockIdx.y);
}

// rms_norm_bwd2 with pair 0's dy the attention backward's f32 dQ accumulator `dq_acc` times
// `dq_scale` (DyScaledF32): the MMDiT's q gradient straight from the attention, without
// joint_attn_dq_convert. Same grid and results.
extern "C" __global__ void __launch_bounds__(QK_THREADS)
    rms_norm_bwd2_dq32(bf16* __restrict__ dx0, const bf16* __restrict__ x0, const bf16* __restrict__ w0,
                       const float* __restrict__ rstd0, const float* __restrict__ dq_acc, float dq_scale,
                       bf16* __restrict__ dx1, const bf16* __restrict__ x1, const bf16* __restrict__ w1,
                       const float* __restrict__ rstd1, const bf16* __restrict__ dy1, float* __restrict__ dw_part,
                       long long rows, int D, int G, int H, long long ld, float* dw0, int acc0, float* dw1, int acc1,
                       unsigned* tickets) {
    kernel_prologue();
    float* part = dw_part + (long long)blockIdx.y * gridDim.x * D;
    if (blockIdx.y == 0)
        qknorm::rms_bwd(dx0, part, x0, w0, rstd0, qknorm::DyScaledF32{dq_acc, dq_scale}, rows, D, G, H, ld);
    else
        qknorm::rms_bwd(dx1, part, x1, w1, rstd1, qknorm::DyBf16{dy1}, rows, D, G, H, ld);
    qknorm::rms_bwd_tail(blockIdx.y == 0 ? dw0 : dw1, part, D, blockIdx.y == 0 ? acc0 : acc1,
                         tickets == nullptr ? nullptr : tickets + blockIdx.y);
}
