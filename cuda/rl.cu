// The AdvDMD trainer's per-sample arithmetic between model calls (ALGORITHM.md §4.3–§4.5), on the
// device so that one iteration reads nothing back before its end (and can be replayed from a CUDA
// graph): the discriminator losses' logit gradients, the rewards' returns-to-go with their
// group-normalised advantages, and the clipped policy objective's gradient. A few hundred numbers
// each: simple loops, sums in the CPU twin's order (f64 where it uses f64), so the results are the
// twin's bit for bit except where `exp` may differ in the last place. To keep them so: products
// that feed a sum go through `mul_rn` (nvcc would otherwise contract `s += d·d` into an FMA, one
// rounding instead of the twin's two), sums that mirror Rust's `Iterator::sum` start at −0.0 as it
// does (the sign of an all-zero sum), and clamps are Rust's `clamp` (NaN stays NaN; fminf/fmaxf
// would replace it by a bound and hide a diverged discriminator).
// CPU twin: src/kernels/rl.rs (which mirrors src/train/losses.rs: returns_to_go, group_advantages,
// ppo_loss).
//
//   rl_logit_grads:  dl[i] = scale·sign·sigmoid(sign·l[i]), the gradient of scale·softplus(sign·l)
//   rl_advantages:   r = clamp(logits, ±reward_clip) (state-major [K][n]), R_t = Σ_{j ≥ t} r_j for
//                    the K−1 transitions, adv[t][i] = clamp((R_t,i − mean_g)/(std_g + 1e-4), ±adv_clip)
//                    within each group g of `group` consecutive samples (population std)
//   rl_ppo_grad:     ratio r = exp(ℓ − ℓ_old); coef[i] = share·(−A·r/N where −A·r ≥ −A·clip(r, 1±ε),
//                    else 0); loss[0] = Σ_i max(−A·r, −A·clip(r, 1±ε))/N
#include "common.cuh"

namespace rl {

// The two-branch form of src/kernels/elementwise.rs `sigmoid` (no overflow at either end).
__device__ __forceinline__ float sigmoid(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    const float e = expf(x);
    return e / (1.f + e);
}

// Rust's `f32::clamp` / `f64::clamp` (lo ≤ hi, checked by the launchers): NaN passes through.
__device__ __forceinline__ float clamp(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}
__device__ __forceinline__ double clamp(double x, double lo, double hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

// a·b rounded on its own, never fused into a following add.
__device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef ADVDMD_EMU
    return a * b;
#else
    return __dmul_rn(a, b);
#endif
}

// The start of Rust's f64 `sum()`: −0.0 (the identity of addition; an empty or all −0.0 sum
// stays −0.0).
#define RL_SUM0 (-0.0)

}  // namespace rl

// grid-stride over n.
extern "C" __global__ void rl_logit_grads(float* __restrict__ dl, const float* __restrict__ logits, int n, float sign,
                                          float scale) {
    kernel_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dl[i] = scale * sign * rl::sigmoid(sign * logits[i]);
}

// One thread per (transition t, group): the group's returns, their mean and std, its advantages.
// grid-stride over (K − 1)·(n / group).
extern "C" __global__ void rl_advantages(float* __restrict__ adv, const float* __restrict__ logits, int n, int k,
                                         int group, float reward_clip, float adv_clip) {
    kernel_prologue();
    const int groups = n / group, pairs = (k - 1) * groups;
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += gridDim.x * blockDim.x) {
        const int t = p / groups, g0 = (p % groups) * group;
        // R_t,i = Σ_{j=t}^{k−1} r_{i,j} in f64, rounded to f32 (returns_to_go)
        auto ret = [&](int i) {
            double s = RL_SUM0;
            for (int j = t; j < k; j++) s += (double)rl::clamp(logits[(long long)j * n + i], -reward_clip, reward_clip);
            return (float)s;
        };
        double mean = RL_SUM0;
        for (int i = g0; i < g0 + group; i++) mean += (double)ret(i);
        mean /= (double)group;
        double var = RL_SUM0;
        for (int i = g0; i < g0 + group; i++) {
            const double d = (double)ret(i) - mean;
            var += rl::mul_rn(d, d);
        }
        const double std_ = sqrt(var / (double)group);
        for (int i = g0; i < g0 + group; i++) {
            const float a = (float)(((double)ret(i) - mean) / (std_ + 1e-4));
            adv[(long long)t * n + i] = rl::clamp(a, -adv_clip, adv_clip);
        }
    }
}

// grid: 1, block: 256 (any): the coefficients in parallel, the loss by thread 0 in sample order.
extern "C" __global__ void rl_ppo_grad(float* __restrict__ coef, double* __restrict__ loss, const double* __restrict__ logp,
                                       const double* __restrict__ logp_old, const float* __restrict__ adv, int n,
                                       double eps, double share) {
    kernel_prologue();
    const double N = n > 0 ? (double)n : 1.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double a = (double)adv[i], r = exp(logp[i] - logp_old[i]);
        const double unclipped = -a * r, clipped = -a * rl::clamp(r, 1.0 - eps, 1.0 + eps);
        coef[i] = (float)((unclipped >= clipped ? -a * r / N : 0.0) * share);
    }
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < n; i++) {
            const double a = (double)adv[i], r = exp(logp[i] - logp_old[i]);
            // f64::max is fmax (a NaN operand yields the other); the loss starts at +0.0 as ppo_loss's
            s += fmax(-a * r, -a * rl::clamp(r, 1.0 - eps, 1.0 + eps)) / N;
        }
        loss[0] = s;
    }
}
