// Pointwise kernels, bf16 in and out with f32 math: GELU (tanh approximation, what SD3 uses) and
// SiLU with their derivatives, the f32 ↔ bf16 casts, and a plain byte copy (the bandwidth
// ceiling the benchmarks compare against).
// CPU twin: src/kernels/elementwise.rs (Activation::{GeluTanh, Silu}, activation_fwd/_bwd; the
// casts mirror half::bf16's round-to-nearest-even).
//
//   gelu_tanh_fwd / silu_fwd:  y = f(x)
//   gelu_tanh_bwd / silu_bwd:  dx = dy·f'(x)
//   cast_f32_to_bf16, cast_bf16_to_f32, copy_bytes
//
// Every kernel is a grid-stride loop (any grid is correct; the launchers use one 16-byte vector
// per thread) over 16-byte vectors when the pointers allow, then a scalar tail of < 8 elements.
// tanh and the sigmoid use the same e^x formulations as the CPU twin's fast_tanh / fast_sigmoid
// (through expf, which saturates to 0 or inf without NaN), so the two differ by rounding only.
#include "common.cuh"

#define EW_THREADS 256

namespace elementwise {

#define SQRT_2_OVER_PI 0.7978845608f
#define GELU_C 0.044715f

// tanh(u) = 1 − 2/(e^{2u} + 1): exact limits ±1 for large |u|, no NaN.
__device__ __forceinline__ float tanh_exp(float u) { return 1.f - 2.f / (expf(2.f * u) + 1.f); }

struct Gelu {
    static __device__ __forceinline__ float f(float x) {
        return 0.5f * x * (1.f + tanh_exp(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
    }
    static __device__ __forceinline__ float d(float x) {
        const float t = tanh_exp(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * SQRT_2_OVER_PI * (1.f + 3.f * GELU_C * x * x);
    }
};

struct Silu {
    // σ(x) = 1/(1 + e^{−x}); e^{−x} = inf for very negative x gives σ = 0, as it should.
    static __device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
    static __device__ __forceinline__ float f(float x) { return x * sigmoid(x); }
    static __device__ __forceinline__ float d(float x) {
        const float s = sigmoid(x);
        return s * (1.f + x * (1.f - s));
    }
};

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long thread_count() { return (long long)gridDim.x * blockDim.x; }

template <class Op>
__device__ __forceinline__ void act_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(x) && aligned16(y)) {
        const long long nv = n / 8;
        for (long long i = t0; i < nv; i += step) {
            float f[8];
            unpack_bf16x8(load16(x + 8 * i), f);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = Op::f(f[k]);
            store16(y + 8 * i, pack_bf16x8(f));
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) y[i] = f2bf(Op::f(bf2f(x[i])));
}

template <class Op>
__device__ __forceinline__ void act_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                        const bf16* __restrict__ dy, long long n) {
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(x) && aligned16(dy) && aligned16(dx)) {
        const long long nv = n / 8;
        for (long long i = t0; i < nv; i += step) {
            float f[8], g[8];
            unpack_bf16x8(load16(x + 8 * i), f);
            unpack_bf16x8(load16(dy + 8 * i), g);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = g[k] * Op::d(f[k]);
            store16(dx + 8 * i, pack_bf16x8(f));
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) dx[i] = f2bf(bf2f(dy[i]) * Op::d(bf2f(x[i])));
}

}  // namespace elementwise

// grid: ceil(n / 8 / EW_THREADS) (any grid is correct), block: EW_THREADS — for every kernel here.
extern "C" __global__ void gelu_tanh_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    elementwise::act_fwd<elementwise::Gelu>(y, x, n);
}
extern "C" __global__ void gelu_tanh_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                         const bf16* __restrict__ dy, long long n) {
    elementwise::act_bwd<elementwise::Gelu>(dx, x, dy, n);
}
extern "C" __global__ void silu_fwd(bf16* __restrict__ y, const bf16* __restrict__ x, long long n) {
    elementwise::act_fwd<elementwise::Silu>(y, x, n);
}
extern "C" __global__ void silu_bwd(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                    const bf16* __restrict__ dy, long long n) {
    elementwise::act_bwd<elementwise::Silu>(dx, x, dy, n);
}

// out = bf16(in), round to nearest even; 8 elements (two 16-byte loads, one store) per step.
extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, long long n) {
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
    using namespace elementwise;
    const long long t0 = thread_index(), step = thread_count();
    long long done = 0;
    if (aligned16(in) && aligned16(out)) {
        const long long nv = n / 8;
        for (long long i = t0; i < nv; i += step) {
            float f[8];
            unpack_bf16x8(load16(in + 8 * i), f);
            float4 a = make_float4(f[0], f[1], f[2], f[3]), b = make_float4(f[4], f[5], f[6], f[7]);
            *reinterpret_cast<float4*>(out + 8 * i) = a;
            *reinterpret_cast<float4*>(out + 8 * i + 4) = b;
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) out[i] = bf2f(in[i]);
}

// dst[0..n) = src[0..n) in bytes: 16 bytes per step, then a byte tail. The bandwidth ceiling.
// grid: ceil(n / 16 / EW_THREADS), block: EW_THREADS.
extern "C" __global__ void copy_bytes(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                                      long long n) {
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
