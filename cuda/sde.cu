// The few-step sampler's and the losses' per-element SDE math (ALGORITHM.md §3.1, §4.1, §4.2), f32
// data, f32 math, per-sample reductions as f32 partials summed in a fixed order.
// CPU twin: src/kernels/sde.rs (which mirrors src/flow/sde.rs and src/train/losses.rs).
//
//   sde_rho_step:          the ρ-family transition of a batch [B, D], one pass over x, v and z:
//                          x̂0 = x − σ·v, ε̂ = x + (1−σ)·v, μ = (1−σ')·x̂0 + σ'·sqrt(1−ρ²)·ε̂,
//                          s = σ'·ρ, x' = μ + s·z (or a given x', the policy-gradient recompute),
//                          ∂ℓ/∂v̂ = c·(x' − μ)/(D·s²), and per-block partials of Σ (x' − μ)²
//   sde_logprob_finalize:  ℓ = −Σ(x' − μ)²/(2s²D) − log s − ½ log 2π per sample (f64)
//   dmd_abs_partial,       the DMD gradient g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real| per
//   dmd_grad_apply:        sample, non-finite entries → 0, times a caller's scale
//   flow_noise:            x_σ = (1−σ_b)·x0 + σ_b·n and the velocity target n − x0
//   euler_cfg_step:        the sampler's Euler step with classifier-free guidance, writing the
//                          next model input (bf16) beside the f32 state
//   velocity_mse_grad:     the flow-matching loss's gradient dv = scale·(v − target) (bf16) and
//                          per-block partial sums of (v − target)² for the loss
//   x0_from_velocity:      x̂0 = x − σ_b·v from a model's bf16 velocity (CFG-combined when guided)
//   velocity_grad_from_x0: dv = −scale·σ_b·g, a gradient seeded at x̂0 moved onto v (bf16)
//
// Layout [B, D] row-major. The reducing kernels use grid (P, B): block (p, b) owns elements
// [p·per, min(D, (p+1)·per)) of sample b, `per` a multiple of 4 chosen by the launcher from D alone,
// so partial sums never depend on the GPU. 16-byte vectors when D % 4 == 0 and the pointers allow.
//
// Bandwidth (the SD3 shape, 8 × 262144, moves 32–56 MB per call: 10–20 µs on an H100, so every
// serial latency shows): each thread issues a whole step's 16-byte loads before it needs the
// per-sample σ, σ' or norm, whose loads then overlap the data's; the per-sample sums of the P
// partials are read by a warp at once (`warp_sum_parts`, a fixed order) rather than one after
// another by a single thread (one L2 round trip per few partials: an estimated 2–3 µs at P = 64);
// the two-input kernels (dmd_abs_partial, dmd_grad_apply, flow_noise) do one step of 4 vectors
// per array per thread, all 8 loads in flight from the start; and those and sde_rho_step stay
// within 64 registers (launch bounds), so the shape's 8 × 64 blocks of 4096 elements are resident
// at once on 132 SMs (4 per SM): one wave, no tail.
#include "common.cuh"

#define SDE_THREADS 256
// 16-byte vectors per thread per step, per array, all loaded before use: sde_rho_step's 3 inputs
// take 2 steps of 2 per block of 4096 elements (one step of 12 loads would need > 64 registers);
// the two-input kernels take 1 step of 4 (8 loads in flight per thread from its start).
#define SDE_UNROLL 2
#define SDE_WIDE 4

namespace sde {

__device__ __forceinline__ float get(const float4& v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

// Finite and not NaN, without <cmath>'s isfinite (the emulator's g++ and nvcc disagree on it).
__device__ __forceinline__ bool finite(float v) { return fabsf(v) <= 3.402823466e38f; }

// Σ_{p < P} part[p] in f64 by one warp: lane l adds the p ≡ l (mod 32) in increasing p, then a
// fixed xor-shuffle tree, so the order depends on P alone and every lane (and every block that
// sums the same partials) gets the same value, bit for bit (f64 addition commutes). Each lane
// loads 4 partials at once (0 past P, which adds nothing): one L2 round trip per 128 partials
// instead of a serial loop's one per few.
__device__ __forceinline__ double warp_sum_parts(const float* part, int P) {
    double s = 0.0;
    for (int p0 = threadIdx.x & 31; p0 < P; p0 += 128) {
        float q[4];
#pragma unroll
        for (int k = 0; k < 4; k++) q[k] = p0 + 32 * k < P ? load_volatile(part + p0 + 32 * k) : 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) s += (double)q[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
    return s;
}

// Sample b's log-probability from its P partial sums of squares (a warp: every lane calls it,
// lane 0's value is the result): −Σ / (2s²D) − log s − ½ log 2π with s = σ'·ρ, in f64; NaN where
// s ≤ 0 (no density).
__device__ __forceinline__ double logprob_of(const float* part, int P, float sn, float rho, long long D) {
    const double sq = warp_sum_parts(part, P);
    const float stdf = sn > 0.f ? sn * rho : 0.f;
    if (!(stdf > 0.f)) return (double)bits_to_float(0x7fc00000u);
    const double s = (double)stdf;
    return -sq / (2.0 * s * s * (double)D) - log(s) - 0.5 * log(2.0 * 3.14159265358979323846);
}

// The coefficients of one sample's transition.
struct Rho {
    float sigma, keep, one_minus_sn, std, gscale;
    bool det;  // σ' ≤ 0: x' = μ = x̂0, no density
};

__device__ __forceinline__ Rho rho_coeffs(float s, float sn, float rho, long long D) {
    Rho r;
    r.sigma = s;
    r.det = !(sn > 0.f);
    r.keep = r.det ? 0.f : sn * sqrtf(fmaxf(1.f - rho * rho, 0.f));
    r.one_minus_sn = 1.f - sn;
    r.std = r.det ? 0.f : sn * rho;
    // ∂μ/∂v̂ = σ'·sqrt(1−ρ²)·(1−σ) − σ·(1−σ'); the log-prob gradient is 0 where s = 0 (undefined).
    const float c = r.keep * (1.f - s) - s * (1.f - sn);
    r.gscale = r.std > 0.f ? c / ((float)D * r.std * r.std) : 0.f;
    return r;
}

// One element: writes what is asked, returns (x' − μ)².
__device__ __forceinline__ float rho_elem(const Rho& r, float x, float v, float z, float given, bool have_given,
                                          float& x0, float& mean, float& next, float& grad) {
    x0 = x - r.sigma * v;
    const float eps = x + (1.f - r.sigma) * v;
    mean = r.det ? x0 : r.one_minus_sn * x0 + r.keep * eps;
    next = have_given ? given : (r.det ? x0 : mean + r.std * z);
    const float d = next - mean;
    grad = r.gscale * d;
    return d * d;
}

}  // namespace sde

// grid: (P, B), block: SDE_THREADS. Rollout: z given, next_in null, x' = μ + s·z written to
// next_out. Recompute (x' held fixed, as the policy gradient needs): next_in given, z and
// next_out null. x0_out, mean_out, grad_v may be null (not written). σ, σ' per sample ([B]).
// sq_part[b·P + p] = the block's Σ (x' − μ)², and with tickets (`KernelDevice::column_tickets`,
// one a sample) logp[b] from them by the sample's last block. At most 64 registers (launch bounds): 4 blocks
// per SM, so the SD3 shape's 8 × 64 blocks are all resident on an H100's 132 SMs, one wave.
extern "C" __global__ void __launch_bounds__(SDE_THREADS, 4)
    sde_rho_step(float* __restrict__ next_out, float* __restrict__ x0_out, float* __restrict__ mean_out,
                 float* __restrict__ grad_v, float* __restrict__ sq_part, const float* __restrict__ x,
                 const float* __restrict__ v, const float* __restrict__ z, const float* __restrict__ next_in,
                 const float* __restrict__ sigma, const float* __restrict__ sigma_next, float rho, long long D,
                 long long per, double* __restrict__ logp, unsigned* tickets) {
    kernel_prologue();
    using namespace sde;
    STATIC_SMEM(float, scratch, [32]);
    const int b = blockIdx.y, p = blockIdx.x, P = gridDim.x;
    const bool given = next_in != nullptr;
    const float* __restrict__ third = given ? next_in : z;  // z, or the given x'
    const long long lo = (long long)p * per, hi = min(D, lo + per), base = (long long)b * D;
    float sq = 0.f;
    const bool vec = D % 4 == 0 && aligned16(next_out) && aligned16(x0_out) && aligned16(mean_out) &&
                     aligned16(grad_v) && aligned16(x) && aligned16(v) && aligned16(third);
    // Thread t's step covers vectors t + u·T (u < SDE_UNROLL) from s0: coalesced, and the step's
    // 3·SDE_UNROLL loads are all issued before the first is used — the first step's before σ and
    // σ' are read, so those two latencies overlap instead of adding up.
    const long long T4 = 4ll * blockDim.x, end = base + hi;
    long long s0 = base + lo + 4 * threadIdx.x;
    float4 xv[SDE_UNROLL], vv[SDE_UNROLL], zv[SDE_UNROLL];
    if (vec) {
#pragma unroll
        for (int u = 0; u < SDE_UNROLL; u++) {
            const long long i = s0 + u * T4;
            if (i < end) xv[u] = load_f4(x + i), vv[u] = load_f4(v + i), zv[u] = load_f4(third + i);
        }
    }
    const Rho r = rho_coeffs(sigma[b], sigma_next[b], rho, D);
    if (vec) {
        while (s0 < end) {
#pragma unroll
            for (int u = 0; u < SDE_UNROLL; u++) {
                const long long i = s0 + u * T4;
                if (i >= end) continue;
                float o0[4], om[4], on[4], og[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float zk = get(zv[u], k);
                    sq += rho_elem(r, get(xv[u], k), get(vv[u], k), given ? 0.f : zk, given ? zk : 0.f, given,
                                   o0[k], om[k], on[k], og[k]);
                }
                if (next_out) store_f4(next_out + i, make_float4(on[0], on[1], on[2], on[3]));
                if (x0_out) store_f4(x0_out + i, make_float4(o0[0], o0[1], o0[2], o0[3]));
                if (mean_out) store_f4(mean_out + i, make_float4(om[0], om[1], om[2], om[3]));
                if (grad_v) store_f4(grad_v + i, make_float4(og[0], og[1], og[2], og[3]));
            }
            s0 += T4 * SDE_UNROLL;
            if (s0 >= end) break;
#pragma unroll
            for (int u = 0; u < SDE_UNROLL; u++) {
                const long long i = s0 + u * T4;
                if (i < end) xv[u] = load_f4(x + i), vv[u] = load_f4(v + i), zv[u] = load_f4(third + i);
            }
        }
    } else {
        for (long long i = base + lo + threadIdx.x; i < base + hi; i += blockDim.x) {
            float o0, om, on, og;
            sq += rho_elem(r, x[i], v[i], given ? 0.f : z[i], given ? next_in[i] : 0.f, given, o0, om, on, og);
            if (next_out) next_out[i] = on;
            if (x0_out) x0_out[i] = o0;
            if (mean_out) mean_out[i] = om;
            if (grad_v) grad_v[i] = og;
        }
    }
    sq = block_sum(sq, scratch);
    if (threadIdx.x == 0) sq_part[(long long)b * P + p] = sq;
    // With tickets (one a sample), the last of sample b's P blocks to finish forms its
    // log-probability (what sde_logprob_finalize does after the kernel otherwise).
    if (tickets == nullptr || !last_block_to_finish(tickets + b, P) || threadIdx.x >= 32) return;
    const double lp = logprob_of(sq_part + (long long)b * P, P, sigma_next[b], rho, D);
    if (threadIdx.x == 0) logp[b] = lp;
}

// logp[b] = −Σ_p sq_part[b, p] / (2s²D) − log s − ½ log 2π with s = σ'_b·ρ, in f64 (the policy
// ratio exp(ℓ − ℓ_old) needs ~1e-6 absolute accuracy); NaN where s ≤ 0 (no density).
// grid: B, block: 32 (one warp per sample, its partials summed by warp_sum_parts).
extern "C" __global__ void __launch_bounds__(32)
    sde_logprob_finalize(double* __restrict__ logp, const float* __restrict__ sq_part,
                         const float* __restrict__ sigma_next, float rho, int B, int P, long long D) {
    kernel_prologue();
    const int b = blockIdx.x;
    if (b >= B) return;
    const double lp = sde::logprob_of(sq_part + (long long)b * P, P, sigma_next[b], rho, D);
    if (threadIdx.x == 0) logp[b] = lp;
}

// part[b·P + p] = Σ |x − x̂0_real| over block (p, b)'s elements. grid: (P, B), block: SDE_THREADS
// (one wave at the SD3 shape, as sde_rho_step). x is read with the evict-first hint (__ldcs): of
// the two arrays only x̂0_real is read again, by dmd_grad_apply, and it should find it in L2.
extern "C" __global__ void __launch_bounds__(SDE_THREADS, 4)
    dmd_abs_partial(float* __restrict__ part, const float* __restrict__ x, const float* __restrict__ x0_real,
                    long long D, long long per) {
    kernel_prologue();
    using namespace sde;
    STATIC_SMEM(float, scratch, [32]);
    const int b = blockIdx.y, p = blockIdx.x, P = gridDim.x;
    const long long lo = (long long)p * per, hi = min(D, lo + per), base = (long long)b * D;
    float acc = 0.f;
    if (D % 4 == 0 && aligned16(x) && aligned16(x0_real)) {
        const long long T4 = 4ll * blockDim.x, end = base + hi;
        for (long long s0 = base + lo + 4 * threadIdx.x; s0 < end; s0 += T4 * SDE_WIDE) {
            float4 a[SDE_WIDE], r[SDE_WIDE];
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++)
                if (s0 + u * T4 < end) {
                    a[u] = __ldcs(reinterpret_cast<const float4*>(x + s0 + u * T4));
                    r[u] = load_f4(x0_real + s0 + u * T4);
                }
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++)
                if (s0 + u * T4 < end)
                    acc += fabsf(a[u].x - r[u].x) + fabsf(a[u].y - r[u].y) + fabsf(a[u].z - r[u].z) +
                           fabsf(a[u].w - r[u].w);
        }
    } else {
        for (long long i = base + lo + threadIdx.x; i < base + hi; i += blockDim.x) acc += fabsf(x[i] - x0_real[i]);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) part[(long long)b * P + p] = acc;
}

// g = scale · nan_to_num((x̂0_fake − x̂0_real) / norm_b), norm_b = Σ_p part[b, p] / D. Every block
// of sample b sums the same P partials in the same order (warp_sum_parts), so all agree on norm_b.
// The first step's data is loaded (evict-first: the gradient's last use of both) before warp 0
// reads the partials, so the two latencies overlap while the other warps wait at the barrier.
// grid: (P, B) as for dmd_abs_partial, block: SDE_THREADS.
extern "C" __global__ void __launch_bounds__(SDE_THREADS, 4)
    dmd_grad_apply(float* __restrict__ g, const float* __restrict__ x0_real, const float* __restrict__ x0_fake,
                   const float* __restrict__ part, long long D, long long per, float scale) {
    kernel_prologue();
    using namespace sde;
    STATIC_SMEM(float, norm_s, );
    const int b = blockIdx.y, p = blockIdx.x, P = gridDim.x;
    const long long lo = (long long)p * per, hi = min(D, lo + per), base = (long long)b * D;
    const bool vec = D % 4 == 0 && aligned16(g) && aligned16(x0_real) && aligned16(x0_fake);
    const long long T4 = 4ll * blockDim.x, end = base + hi;
    long long s0 = base + lo + 4 * threadIdx.x;
    float4 r[SDE_WIDE], f[SDE_WIDE];
    if (vec) {
#pragma unroll
        for (int u = 0; u < SDE_WIDE; u++)
            if (s0 + u * T4 < end) {
                r[u] = __ldcs(reinterpret_cast<const float4*>(x0_real + s0 + u * T4));
                f[u] = __ldcs(reinterpret_cast<const float4*>(x0_fake + s0 + u * T4));
            }
    }
    if (threadIdx.x < 32) {
        const double s = warp_sum_parts(part + (long long)b * P, P);
        if (threadIdx.x == 0) norm_s = (float)(s / (double)D);
    }
    __syncthreads();
    const float norm = norm_s;
    if (vec) {
        while (s0 < end) {
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++) {
                const long long i = s0 + u * T4;
                if (i >= end) continue;
                float o[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float q = (get(f[u], k) - get(r[u], k)) / norm;
                    o[k] = finite(q) ? scale * q : 0.f;
                }
                store_f4(g + i, make_float4(o[0], o[1], o[2], o[3]));
            }
            s0 += T4 * SDE_WIDE;
            if (s0 >= end) break;
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++)
                if (s0 + u * T4 < end) {
                    r[u] = __ldcs(reinterpret_cast<const float4*>(x0_real + s0 + u * T4));
                    f[u] = __ldcs(reinterpret_cast<const float4*>(x0_fake + s0 + u * T4));
                }
        }
    } else {
        for (long long i = base + lo + threadIdx.x; i < base + hi; i += blockDim.x) {
            const float q = (x0_fake[i] - x0_real[i]) / norm;
            g[i] = finite(q) ? scale * q : 0.f;
        }
    }
}

// x_σ = (1 − σ_b)·x0 + σ_b·noise; target = noise − x0 (not written when null).
// grid: (P, B) with any P (blocks stride over their sample), block: SDE_THREADS. The launcher
// uses P = ceil(D / (4·SDE_THREADS·SDE_WIDE)) (4096 elements per block): one step per thread, so
// each thread's 8 loads are issued at once (σ_b read after them, its latency hidden) and none
// waits on a previous step; at most 64 registers (launch bounds) keep 4 blocks per SM, the SD3
// shape's 8 × 64 blocks resident in one wave on 132 SMs, every load in flight from the start.
extern "C" __global__ void __launch_bounds__(SDE_THREADS, 4)
    flow_noise(float* __restrict__ xt, float* __restrict__ target, const float* __restrict__ x0,
               const float* __restrict__ noise, const float* __restrict__ sigma, long long D) {
    kernel_prologue();
    using namespace sde;
    const int b = blockIdx.y;
    const long long base = (long long)b * D;
    if (D % 4 == 0 && aligned16(xt) && aligned16(target) && aligned16(x0) && aligned16(noise)) {
        // Block q's step covers vectors [q·T·U, (q+1)·T·U) of the sample, thread t those at
        // t + u·T: coalesced, with all 2·SDE_WIDE loads issued before the first is used — the
        // first step's before σ_b is read, so the two latencies overlap.
        const long long T4 = 4ll * blockDim.x, end = base + D;
        long long s0 = base + 4 * ((long long)blockIdx.x * blockDim.x * SDE_WIDE + threadIdx.x);
        float4 a[SDE_WIDE], n[SDE_WIDE];
#pragma unroll
        for (int u = 0; u < SDE_WIDE; u++)
            if (s0 + u * T4 < end) a[u] = load_f4(x0 + s0 + u * T4), n[u] = load_f4(noise + s0 + u * T4);
        const float s = sigma[b], keep = 1.f - s;
        while (true) {
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++) {
                const long long i = s0 + u * T4;
                if (i >= end) continue;
                store_f4(xt + i, make_float4(keep * a[u].x + s * n[u].x, keep * a[u].y + s * n[u].y,
                                        keep * a[u].z + s * n[u].z, keep * a[u].w + s * n[u].w));
                if (target)
                    store_f4(target + i, make_float4(n[u].x - a[u].x, n[u].y - a[u].y, n[u].z - a[u].z, n[u].w - a[u].w));
            }
            // Only grids smaller than the launcher's (one step per thread) come round again.
            s0 += T4 * SDE_WIDE * gridDim.x;
            if (s0 >= end) break;
#pragma unroll
            for (int u = 0; u < SDE_WIDE; u++)
                if (s0 + u * T4 < end) a[u] = load_f4(x0 + s0 + u * T4), n[u] = load_f4(noise + s0 + u * T4);
        }
    } else {
        const float s = sigma[b], keep = 1.f - s;
        const long long step = (long long)gridDim.x * blockDim.x;
        for (long long i = base + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < base + D; i += step) {
            xt[i] = keep * x0[i] + s * noise[i];
            if (target) target[i] = noise[i] - x0[i];
        }
    }
}

// x += dt·g with g = u + w·(c − u) (guided: v is [2, n], the conditional half first) or g = v, then
// the next model input bf16(x) into x_model (both halves when guided: the conditional and the
// unconditional rows of the next call see the same state). Mirrors flow::cfg and flow::euler_step.
// grid: ceil(n / SDE_THREADS) (any grid is correct), block: SDE_THREADS.
extern "C" __global__ void __launch_bounds__(SDE_THREADS)
    euler_cfg_step(float* __restrict__ x, bf16* __restrict__ x_model, const bf16* __restrict__ v, long long n,
                   int guided, float w, float dt) {
    kernel_prologue();
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float g = bf2f(v[i]);
        if (guided) {
            const float u = bf2f(v[n + i]);
            g = u + w * (g - u);
        }
        const float xi = x[i] + dt * g;
        x[i] = xi;
        const bf16 xb = f2bf(xi);
        x_model[i] = xb;
        if (guided) x_model[n + i] = xb;
    }
}

// dv = scale·(v − target) (the MSE's gradient with scale = 2/N), and part[block] = Σ (v − target)²
// over the elements this block visited (the host sums the few partials in a fixed order).
// grid: any (the launcher uses ≤ 256 blocks), block: SDE_THREADS; part holds gridDim.x floats.
extern "C" __global__ void __launch_bounds__(SDE_THREADS)
    velocity_mse_grad(bf16* __restrict__ dv, float* __restrict__ part, const bf16* __restrict__ v,
                      const float* __restrict__ target, long long n, float scale) {
    kernel_prologue();
    STATIC_SMEM(float, scratch, [32]);
    const long long step = (long long)gridDim.x * blockDim.x;
    float sq = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const float e = bf2f(v[i]) - target[i];
        sq = fmaf(e, e, sq);
        dv[i] = f2bf(scale * e);
    }
    sq = block_sum(sq, scratch);
    if (threadIdx.x == 0) part[blockIdx.x] = sq;
}

// x0 = x − σ_b·g with g = v, or (guided: v is [2, B·d], the conditional rows first)
// g = u + w·(c − u). x, x0 f32 [B, d]; sigma f32 [B].
// grid: ceil(B·d / SDE_THREADS) (any grid is correct), block: SDE_THREADS.
extern "C" __global__ void __launch_bounds__(SDE_THREADS)
    x0_from_velocity(float* __restrict__ x0, const float* __restrict__ x, const bf16* __restrict__ v,
                     const float* __restrict__ sigma, long long d, int B, int guided, float w) {
    kernel_prologue();
    const long long n = d * B, step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float g = bf2f(v[i]);
        if (guided) {
            const float u = bf2f(v[n + i]);
            g = u + w * (g - u);
        }
        x0[i] = x[i] - sigma[i / d] * g;
    }
}

// dv = −scale·σ_b·g (bf16): the gradient of x̂0 = x − σ·v with respect to v, applied to g.
// grid: ceil(B·d / SDE_THREADS) (any grid is correct), block: SDE_THREADS.
extern "C" __global__ void __launch_bounds__(SDE_THREADS)
    velocity_grad_from_x0(bf16* __restrict__ dv, const float* __restrict__ g, const float* __restrict__ sigma,
                          long long d, int B, float scale) {
    kernel_prologue();
    const long long n = d * B, step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
        dv[i] = f2bf(-scale * sigma[i / d] * g[i]);
}
