// The optimiser over flat f32 master weights: a fused AdamW step that also writes the bf16 copy
// the forward uses and the EMA of the weights, and the global gradient L2 norm with its clip
// factor. All state f32, as src/optim/mod.rs.
// CPU twin: src/kernels/optim.rs (which mirrors src/optim/mod.rs: AdamW::step, clip_grad_norm,
// Ema::update).
//
//   grad_sq_partial:     part[p] = Σ g² over block p's grid-stride share (f64 accumulation)
//   grad_norm_finalize:  clip[0] = ‖g‖ = sqrt(Σ_p part[p]) (fixed order), clip[1] = the clip
//                        factor max_norm/(‖g‖ + 1e-6) when ‖g‖ > max_norm > 0, else 1
//   adamw_step:          with ĝ = g·clip[1]:  m ← β1·m + (1−β1)·ĝ,  v ← β2·v + (1−β2)·ĝ²,
//                        w ← w − lr·((m/bc1)/(sqrt(v/bc2) + eps) + wd·w)  (wd for i < n_decay,
//                        0 after: the flat layout puts the decayed matrices first),
//                        w_bf16 ← bf16(w),  ema ← d·ema + (1−d)·w
//   adamw_step_bf16m:    the same with m and v stored in bf16 (2 bytes each instead of 4: the
//                        SD3.5-medium AdvDMD state's path to 80 GB, docs/memory-plan.md), the
//                        arithmetic in f32, the stores stochastically rounded — 16 random bits
//                        (a hash of the element index and the step's seed) added below bf16's
//                        mantissa, then truncated — so v ← β2·v + (1−β2)·ĝ² with β2 = 0.999
//                        still decays on average (round-to-nearest would freeze it: the step's
//                        change is under half an ulp)
//
// The per-step scalars live in device memory, not in kernel arguments, so that one recorded CUDA
// graph replays every step (a graph freezes its kernels' arguments at capture): the host writes
// them before each launch or replay (src/optim/device.rs `DeviceAdamW::stage`), and the kernels
// read
//   sched = [lr, bc1, bc2, seed]  (f32[4]; bc1 = 1 − β1^t, bc2 = 1 − β2^t computed in f32 on the
//                                  host as the CPU twin does; seed: the bf16-moment rounding's u32,
//                                  its bits stored as the 4th f32, ignored with f32 moments)
//   clip  = [norm, factor]        (grad_norm_finalize's, over one or several gradients; or null)
// β1, β2, eps, weight decay and the EMA decay are constant over a run: kernel arguments.
//
// Both AdamW kernels move 8 elements per thread per step (two 16-byte loads and stores of each
// f32 array, one 16-byte load and store of each bf16 moment, one 16-byte store of the bf16 copy),
// then a scalar tail; every optional output may be null. The launcher gives every thread one step.
#include "common.cuh"

#define OPT_THREADS 256

namespace optim {

__device__ __forceinline__ void to_array(float4 v, float* f) {
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}

struct Hyper {
    float lr, beta1, beta2, eps, wd, bc1, bc2, ema_decay, gscale;
};

// One element, in the CPU twin's operation order.
__device__ __forceinline__ void adamw_elem(const Hyper& h, bool decay, float g, float& w, float& m, float& v) {
    g = g * h.gscale;
    m = h.beta1 * m + (1.f - h.beta1) * g;
    v = h.beta2 * v + (1.f - h.beta2) * g * g;
    const float update = (m / h.bc1) / (sqrtf(v / h.bc2) + h.eps);
    w -= h.lr * (update + (decay ? h.wd : 0.f) * w);
}

// Sum over the block (blockDim.x a power of two ≤ 1024) in f64, tree order fixed; thread 0 gets it.
__device__ __forceinline__ double block_sum_f64(double v, double* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    return red[0];
}

}  // namespace optim

// grid: P (the launcher picks it from n alone: the sum's order then never depends on the GPU),
// block: OPT_THREADS.
extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    grad_sq_partial(double* __restrict__ part, const float* __restrict__ g, long long n) {
    kernel_prologue();
    using namespace optim;
    STATIC_SMEM(double, red, [OPT_THREADS]);
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    long long done = 0;
    if (aligned16(g)) {
        const long long nv = n / 4;
        for (long long k = t0; k < nv; k += step) {
            const float4 a = load_f4(g + 4 * k);
            acc += (double)a.x * a.x + (double)a.y * a.y + (double)a.z * a.z + (double)a.w * a.w;
        }
        done = nv * 4;
    }
    for (long long i = done + t0; i < n; i += step) acc += (double)g[i] * g[i];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// grid: 1, block: OPT_THREADS.
extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    grad_norm_finalize(float* __restrict__ clip, const double* __restrict__ part, int P, float max_norm) {
    kernel_prologue();
    using namespace optim;
    STATIC_SMEM(double, red, [OPT_THREADS]);
    double acc = 0.0;
    for (int p = threadIdx.x; p < P; p += blockDim.x) acc += part[p];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) {
        const float norm = (float)sqrt(acc);
        clip[0] = norm;
        clip[1] = max_norm > 0.f && norm > max_norm ? max_norm / (norm + 1e-6f) : 1.f;
    }
}

namespace optim {

__device__ __forceinline__ uint32_t float_bits(float f) {
#ifdef ADVDMD_EMU
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#else
    return __float_as_uint(f);
#endif
}

// A 32-bit hash of (element, seed): the stochastic rounding's random bits (CPU twin:
// src/kernels/optim.rs `sr_hash`), in parts so that 8 neighbouring elements can share sr_pre.
__device__ __forceinline__ uint32_t sr_mix(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}
// The part of the hash's input from i's high word and the seed.
__device__ __forceinline__ uint32_t sr_pre(long long i, uint32_t seed) {
    return (uint32_t)(i >> 32) * 0x85EBCA77u ^ seed;
}
__device__ __forceinline__ uint32_t sr_hash(long long i, uint32_t seed) {
    return sr_mix((uint32_t)i * 0x9E3779B1u ^ sr_pre(i, seed));
}

// The bits of x rounded to bf16 stochastically with the 16 random bits r (the twin's `bf16_sr`):
// r added below bf16's mantissa, then truncated. A finite x cannot carry into a NaN pattern (at
// most into ±inf, which the twin gives too), so the truncation is the bf16 itself.
__device__ __forceinline__ uint32_t bf16_sr_bits(float x, uint32_t r) {
    const uint32_t u = float_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) {  // inf, nan: unchanged
        bf16 b = f2bf(x);
        return *reinterpret_cast<uint16_t*>(&b);
    }
    return (u + (r & 0xffffu)) >> 16;
}

// Moments in f32: plain loads and stores.
__device__ __forceinline__ void load8(const float* p, float f[8]) { to_array(load_f4(p), f), to_array(load_f4(p + 4), f + 4); }
__device__ __forceinline__ void store_moments8(float* m, float* v, const float fm[8], const float fv[8], long long,
                                               uint32_t) {
    store_f4(m, make_float4(fm[0], fm[1], fm[2], fm[3]));
    store_f4(m + 4, make_float4(fm[4], fm[5], fm[6], fm[7]));
    store_f4(v, make_float4(fv[0], fv[1], fv[2], fv[3]));
    store_f4(v + 4, make_float4(fv[4], fv[5], fv[6], fv[7]));
}
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ void store_moments1(float* m, float* v, float fm, float fv, long long, uint32_t) {
    *m = fm, *v = fv;
}

// Moments in bf16: 16-byte loads, and 16-byte stores of the 8 values rounded stochastically — m
// with the low 16 bits of element i's hash, v with the high 16, each hash computed once for both.
// Eight 2-byte stores per moment (the first version: 64% of the copy rate on an H100, against 95%
// with f32 moments) send L2 eight partial-sector writes where one 16-byte store sends one.
// i is a multiple of 8, so i + j (j < 8) shares i's high word: sr_pre once per 8 elements gives
// the bits of sr_hash(i + j).
__device__ __forceinline__ void load8(const bf16* p, float f[8]) { unpack_bf16x8(load16(p), f); }
__device__ __forceinline__ void store_moments8(bf16* m, bf16* v, const float fm[8], const float fv[8], long long i,
                                               uint32_t seed) {
    const uint32_t pre = sr_pre(i, seed), lo = (uint32_t)i;
    pack16 pm, pv;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const uint32_t h0 = sr_mix((lo + 2 * k) * 0x9E3779B1u ^ pre);
        const uint32_t h1 = sr_mix((lo + 2 * k + 1) * 0x9E3779B1u ^ pre);
        pm.w[k] = bf16_sr_bits(fm[2 * k], h0) | bf16_sr_bits(fm[2 * k + 1], h1) << 16;
        pv.w[k] = bf16_sr_bits(fv[2 * k], h0 >> 16) | bf16_sr_bits(fv[2 * k + 1], h1 >> 16) << 16;
    }
    store16(m, pm);
    store16(v, pv);
}
__device__ __forceinline__ float load1(const bf16* p) { return bf2f(*p); }
__device__ __forceinline__ void store_moments1(bf16* m, bf16* v, float fm, float fv, long long i, uint32_t seed) {
    const uint32_t h = sr_hash(i, seed);
    const uint16_t bm = (uint16_t)bf16_sr_bits(fm, h), bv = (uint16_t)bf16_sr_bits(fv, h >> 16);
    *reinterpret_cast<uint16_t*>(m) = bm;
    *reinterpret_cast<uint16_t*>(v) = bv;
}

template <typename M>
__device__ __forceinline__ void adamw_body(float* __restrict__ w, bf16* __restrict__ w_bf16, M* __restrict__ m,
                                           M* __restrict__ v, float* __restrict__ ema, const float* __restrict__ g,
                                           long long n, long long n_decay, const Hyper h, uint32_t seed) {
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(w) && aligned16(w_bf16) && aligned16(m) && aligned16(v) && aligned16(ema) && aligned16(g)) {
        const long long nv = n / 8;
        for (long long k = t0; k < nv; k += step) {
            const long long i = 8 * k;
            float fw[8], fm[8], fv[8], fg[8];
            to_array(load_f4(w + i), fw), to_array(load_f4(w + i + 4), fw + 4);
            load8(m + i, fm), load8(v + i, fv);
            to_array(load_f4(g + i), fg), to_array(load_f4(g + i + 4), fg + 4);
#pragma unroll
            for (int j = 0; j < 8; j++) adamw_elem(h, i + j < n_decay, fg[j], fw[j], fm[j], fv[j]);
            store_f4(w + i, make_float4(fw[0], fw[1], fw[2], fw[3]));
            store_f4(w + i + 4, make_float4(fw[4], fw[5], fw[6], fw[7]));
            store_moments8(m + i, v + i, fm, fv, i, seed);
            if (w_bf16) store16(w_bf16 + i, pack_bf16x8(fw));
            if (ema) {
                float fe[8];
                to_array(load_f4(ema + i), fe), to_array(load_f4(ema + i + 4), fe + 4);
#pragma unroll
                for (int j = 0; j < 8; j++) fe[j] = h.ema_decay * fe[j] + (1.f - h.ema_decay) * fw[j];
                store_f4(ema + i, make_float4(fe[0], fe[1], fe[2], fe[3]));
                store_f4(ema + i + 4, make_float4(fe[4], fe[5], fe[6], fe[7]));
            }
        }
        done = nv * 8;
    }
    for (long long i = done + t0; i < n; i += step) {
        float fw = w[i], fm = load1(m + i), fv = load1(v + i);
        adamw_elem(h, i < n_decay, g[i], fw, fm, fv);
        w[i] = fw;
        store_moments1(m + i, v + i, fm, fv, i, seed);
        if (w_bf16) w_bf16[i] = f2bf(fw);
        if (ema) ema[i] = h.ema_decay * ema[i] + (1.f - h.ema_decay) * fw;
    }
}

}  // namespace optim

// grid: ceil(n / 8 / OPT_THREADS) (any grid is correct), block: OPT_THREADS. clip: null (no
// clipping) or the [norm, factor] pair written by grad_norm_finalize. sched: the step's
// [lr, bc1, bc2, seed bits] with bc1 = 1 − β1^t and bc2 = 1 − β2^t in f32 as the CPU computes them,
// read from device memory so that a graph replayed step after step reads each step's own. (The
// three scalars in registers instead of the parameter bank pushed ptxas's 64-register choice into a
// 56-byte spill; min-blocks 1 lets it take 72: 3 blocks of 256 per SM instead of 4.)
extern "C" __global__ void __launch_bounds__(OPT_THREADS, 1)
    adamw_step(float* __restrict__ w, bf16* __restrict__ w_bf16, float* __restrict__ m, float* __restrict__ v,
               float* __restrict__ ema, const float* __restrict__ g, const float* __restrict__ clip,
               const float* __restrict__ sched, long long n, long long n_decay, float beta1, float beta2, float eps,
               float weight_decay, float ema_decay) {
    kernel_prologue();
    const optim::Hyper h{sched[0], beta1, beta2, eps, weight_decay, sched[1], sched[2], ema_decay, clip ? clip[1] : 1.f};
    optim::adamw_body(w, w_bf16, m, v, ema, g, n, n_decay, h, 0u);
}

// As adamw_step, with bf16 moments rounded with the step's seed (sched[3]'s bits).
extern "C" __global__ void __launch_bounds__(OPT_THREADS)
    adamw_step_bf16m(float* __restrict__ w, bf16* __restrict__ w_bf16, bf16* __restrict__ m, bf16* __restrict__ v,
                     float* __restrict__ ema, const float* __restrict__ g, const float* __restrict__ clip,
                     const float* __restrict__ sched, long long n, long long n_decay, float beta1, float beta2,
                     float eps, float weight_decay, float ema_decay) {
    kernel_prologue();
    const optim::Hyper h{sched[0], beta1, beta2, eps, weight_decay, sched[1], sched[2], ema_decay, clip ? clip[1] : 1.f};
    optim::adamw_body(w, w_bf16, m, v, ema, g, n, n_decay, h, optim::float_bits(sched[3]));
}
