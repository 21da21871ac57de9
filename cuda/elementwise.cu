// Pointwise kernels, bf16 in and out with f32 math: GELU (tanh approximation, what SD3 uses) and
// SiLU with their derivatives, the f32 ↔ bf16 casts, and a plain byte copy (the bandwidth
// ceiling the benchmarks compare against).
// CPU twin: src/kernels/elementwise.rs (Activation::{GeluTanh, Silu}, activation_fwd/_bwd; the
// casts mirror half::bf16's round-to-nearest-even).
//
//   gelu_tanh_fwd / silu_fwd:  y = f(x)
//   gelu_tanh_bwd / silu_bwd:  dx = dy·f'(x)
//   gelu_tanh_bwd_colsum:      the same over [M, N] rows, with the column partials of dx (an MLP's
//                              fc1 bias gradient) in the same pass
//   cast_f32_to_bf16, cast_bf16_to_f32, copy_bytes
//
// Every kernel is a grid-stride loop (any grid is correct; the launchers use EW_UNROLL 16-byte
// vectors per thread for the activations, one for the casts and the copy) over 16-byte vectors when the pointers allow, then a scalar tail of < 8 elements.
// The activations use the sigmoid forms of the CPU twin's fast_tanh / fast_sigmoid formulas
// (mathematically equal; through __expf / __fdividef, which saturate to 0 or inf without NaN),
// so the two differ by a few f32 ulps, far inside one bf16 rounding.
#include "column_lanes.cuh"

#define EW_THREADS 256
#define EW_UNROLL 4  // 16-byte vectors per thread per step of the activations, all loaded first

namespace elementwise {

#define SQRT_2_OVER_PI 0.7978845608f
#define GELU_C 0.044715f

// GELU-tanh through 0.5·(1 + tanh u) = σ(2u) and 1 − tanh²u = 4·σ(2u)·(1 − σ(2u)), the sigmoid
// as 1/(1 + e^{−2u}) with __expf (ex2.approx) and __fdividef (rcp.approx): two special-function
// instructions and a few FMAs per element instead of expf's range reduction and an IEEE divide.
// Limits: e^{−2u} = inf (or > 2¹²⁶, where __fdividef returns 0) gives σ = 0, e^{−2u} = 0 gives 1,
// so ±large x saturate without NaN, as the CPU twin's fast_tanh does.
struct Gelu {
    // −2u = x·(−2k − 2kC·x²), k = sqrt(2/π)
    static __device__ __forceinline__ float sig2u(float x) {
        const float m2u = x * fmaf(x * x, -2.f * SQRT_2_OVER_PI * GELU_C, -2.f * SQRT_2_OVER_PI);
        return __fdividef(1.f, 1.f + __expf(m2u));
    }
    static __device__ __forceinline__ float f(float x) {
        const float m2u = x * fmaf(x * x, -2.f * SQRT_2_OVER_PI * GELU_C, -2.f * SQRT_2_OVER_PI);
        return __fdividef(x, 1.f + __expf(m2u));
    }
    // d = σ(2u)·(1 + 2k·x·(1 − σ(2u))·(1 + 3C·x²))
    static __device__ __forceinline__ float d(float x) {
        const float x2 = x * x;
        const float s = sig2u(x);
        const float k = 2.f * SQRT_2_OVER_PI * x * fmaf(x2, 3.f * GELU_C, 1.f);
        return s * fmaf(k, 1.f - s, 1.f);
    }
};

struct Silu {
    // σ(x) = 1/(1 + e^{−x}); e^{−x} = inf for very negative x gives σ = 0, as it should.
    static __device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }
    static __device__ __forceinline__ float f(float x) { return __fdividef(x, 1.f + __expf(-x)); }
    static __device__ __forceinline__ float d(float x) {
        const float s = sigmoid(x);
        return s * fmaf(x, 1.f - s, 1.f);
    }
};

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long thread_count() { return (long long)gridDim.x * blockDim.x; }

// 8 floats to bf16 (round to nearest even), two per conversion instruction.
__device__ __forceinline__ pack16 pack8(const float f[8]) {
    pack16 p;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        p.w[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    return p;
}

// Block b's step covers vectors [b·U·T, (b+1)·U·T) (T = blockDim.x, U = EW_UNROLL), thread t the
// vectors at + t + u·T: each warp access is coalesced, and every load of a step is issued before
// the first result is computed. Grid-stride over steps, so any grid is correct.
template <class Op>
__device__ __forceinline__ void act_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    long long done = 0;
    if (aligned16(x) && aligned16(y)) {
        const long long nv = n / 8, T = blockDim.x, chunk = T * EW_UNROLL;
        for (long long s = (long long)blockIdx.x * chunk + threadIdx.x; s < nv; s += (long long)gridDim.x * chunk) {
            pack16 px[EW_UNROLL];
#pragma unroll
            for (int u = 0; u < EW_UNROLL; u++)
                if (s + u * T < nv) px[u] = load16(x + 8 * (s + u * T));
#pragma unroll
            for (int u = 0; u < EW_UNROLL; u++)
                if (s + u * T < nv) {
                    float f[8];
                    unpack_bf16x8(px[u], f);
#pragma unroll
                    for (int k = 0; k < 8; k++) f[k] = Op::f(f[k]);
                    store16(y + 8 * (s + u * T), pack8(f));
                }
        }
        done = nv * 8;
    }
    for (long long i = done + thread_index(); i < n; i += thread_count()) y[i] = f2bf(Op::f(bf2f(x[i])));
}

template <class Op>
__device__ __forceinline__ void act_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                        const bf16* __restrict__ dy, long long n) {
    long long done = 0;
    if (aligned16(x) && aligned16(dy) && aligned16(dx)) {
        const long long nv = n / 8, T = blockDim.x, chunk = T * EW_UNROLL;
        for (long long s = (long long)blockIdx.x * chunk + threadIdx.x; s < nv; s += (long long)gridDim.x * chunk) {
            pack16 px[EW_UNROLL], pg[EW_UNROLL];
#pragma unroll
            for (int u = 0; u < EW_UNROLL; u++)
                if (s + u * T < nv) {
                    px[u] = load16(x + 8 * (s + u * T));
                    pg[u] = load16(dy + 8 * (s + u * T));
                }
#pragma unroll
            for (int u = 0; u < EW_UNROLL; u++)
                if (s + u * T < nv) {
                    float f[8], g[8];
                    unpack_bf16x8(px[u], f);
                    unpack_bf16x8(pg[u], g);
#pragma unroll
                    for (int k = 0; k < 8; k++) f[k] = g[k] * Op::d(f[k]);
                    store16(dx + 8 * (s + u * T), pack8(f));
                }
        }
        done = nv * 8;
    }
    for (long long i = done + thread_index(); i < n; i += thread_count())
        dx[i] = f2bf(bf2f(dy[i]) * Op::d(bf2f(x[i])));
}

}  // namespace elementwise

// Activations — grid: ceil(n / 8 / (EW_THREADS·EW_UNROLL)) (any grid is correct), block: EW_THREADS.
extern "C" __global__ void __launch_bounds__(EW_THREADS) gelu_tanh_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    kernel_prologue();
    elementwise::act_fwd<elementwise::Gelu>(y, x, n);
}
extern "C" __global__ void __launch_bounds__(EW_THREADS) gelu_tanh_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                         const bf16* __restrict__ dy, long long n) {
    kernel_prologue();
    elementwise::act_bwd<elementwise::Gelu>(dx, x, dy, n);
}
extern "C" __global__ void __launch_bounds__(EW_THREADS) silu_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    kernel_prologue();
    elementwise::act_fwd<elementwise::Silu>(y, x, n);
}
extern "C" __global__ void __launch_bounds__(EW_THREADS) silu_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                    const bf16* __restrict__ dy, long long n) {
    kernel_prologue();
    elementwise::act_bwd<elementwise::Silu>(dx, x, dy, n);
}

// The MLP's GELU backward with fc1's bias gradient, in one pass (N % 8 == 0, 16-byte aligned
// buffers): dx = dy·GELU′(x) over the [M, N] rows and, per split s of the rows, the column partials
// part[s, j] = Σ dx as stored in bf16, summed into out_sum as finish_columns says. dy and x are
// read once and dx written once; the separate column sum would read dx again. Row lanes
// (column_lanes.cuh) with one sample: grid (ceil(N / 8 / X), 1, S), block (X, Y).
extern "C" __global__ void __launch_bounds__(LANE_THREADS, LANE_BLOCKS_PER_SM)
    gelu_tanh_bwd_colsum(bf16* __restrict__ dx, float* __restrict__ part, const bf16* __restrict__ x,
                         const bf16* __restrict__ dy, int M, int N, float* out_sum, unsigned* tickets,
                         int flags) {
    kernel_prologue();
    using namespace elementwise;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const LaneRows rows = lane_rows(M);
    float acc[1][8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[0][k] = 0.f;
    if (c < N / 8) {
        for (int r = rows.first; r < rows.end; r += COLUMN_ROWS * rows.step) {
            pack16 px[COLUMN_ROWS], pg[COLUMN_ROWS];
#pragma unroll
            for (int u = 0; u < COLUMN_ROWS; u++)
                if (r + u * rows.step < rows.end) {
                    const long long e = (long long)(r + u * rows.step) * N + 8 * c;
                    px[u] = load16(x + e);
                    pg[u] = load16(dy + e);
                }
#pragma unroll
            for (int u = 0; u < COLUMN_ROWS; u++)
                if (r + u * rows.step < rows.end) {
                    float f[8], g[8], rounded[8];
                    unpack_bf16x8(px[u], f);
                    unpack_bf16x8(pg[u], g);
#pragma unroll
                    for (int k = 0; k < 8; k++) f[k] = g[k] * Gelu::d(f[k]);
                    const pack16 p = pack8(f);
                    store16(dx + (long long)(r + u * rows.step) * N + 8 * c, p);
                    unpack_bf16x8(p, rounded);
#pragma unroll
                    for (int k = 0; k < 8; k++) acc[0][k] += rounded[k];
                }
        }
    }
    float* const parts[1] = {part};
    float* const out[1] = {out_sum};
    finish_columns<1>(parts, out, acc, 1, N, c, tickets, flags);
}

// Casts — grid: ceil(n / 8 / EW_THREADS) (any grid is correct), block: EW_THREADS.
// out = bf16(in), round to nearest even; 8 elements (two 16-byte loads, one store) per step.
extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, long long n) {
    kernel_prologue();
    using namespace elementwise;
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(in) && aligned16(out)) {
        const long long nv = n / 8;
        for (long long i = t0; i < nv; i += step) {
            const pack16 a = load16(in + 8 * i), b = load16(in + 8 * i + 4);
            float f[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                f[k] = bits_to_float(a.w[k]);
                f[4 + k] = bits_to_float(b.w[k]);
            }
            store16(out + 8 * i, pack_bf16x8(f));
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) out[i] = f2bf(in[i]);
}

// out = f32(in), exact; 8 elements (one 16-byte load, two stores) per step.
extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ in, long long n) {
    kernel_prologue();
    using namespace elementwise;
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(in) && aligned16(out)) {
        const long long nv = n / 8;
        for (long long i = t0; i < nv; i += step) {
            float f[8];
            unpack_bf16x8(load16(in + 8 * i), f);
            float4 a = make_float4(f[0], f[1], f[2], f[3]), b = make_float4(f[4], f[5], f[6], f[7]);
            store_f4(out + 8 * i, a);
            store_f4(out + 8 * i + 4, b);
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) out[i] = bf2f(in[i]);
}

// dst[0..n) = src[0..n) in bytes: 16 bytes per step, then a byte tail. The bandwidth ceiling.
// grid: ceil(n / 16 / EW_THREADS), block: EW_THREADS.
extern "C" __global__ void copy_bytes(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                                      long long n) {
    kernel_prologue();
    using namespace elementwise;
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(src) && aligned16(dst)) {
        const long long nv = n / 16;
        for (long long i = t0; i < nv; i += step) store16(dst + 16 * i, load16(src + 16 * i));
        done = nv * 16;
    }
    for (long long i = done + t0; i < n; i += step) dst[i] = src[i];
}
