// Shared by the joint-attention kernel files (attention.cu: mma.sync, any sm_90;
// attention_hopper.cu: wgmma, sm_90a): the key/query tiling of the two streams, the operand
// offsets, and the exponent helpers. attention.cu's top comment describes the operands.
#pragma once
#include "common.cuh"

#define ATTN_TILE 64          // rows per key tile (both passes) and per query tile (backward)

namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int T = ATTN_TILE>
__device__ __forceinline__ int ntiles(int len) { return (len + T - 1) / T; }

// Tile `t` (of T rows) of the concatenation [a; b]: its stream (0 = a, 1 = b), first row within
// the stream, and number of valid rows (1..T).
struct Tile {
    int stream, row0, rows;
};
template <int T = ATTN_TILE>
__device__ __forceinline__ Tile tile_of(int t, int La, int Lb) {
    const int na = ntiles<T>(La);
    Tile r;
    r.stream = t < na ? 0 : 1;
    r.row0 = (t < na ? t : t - na) * T;
    r.rows = min(T, (t < na ? La : Lb) - r.row0);
    return r;
}

// 2^x on the special-function unit (ex2.approx.ftz: 2^-22 relative error, −inf → +0). The
// emulator uses exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef ADVDMD_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// 2^x on the FMA pipes, for a share of a softmax's exponentials beside fast_exp2's (the split of
// FlashAttention-4; at head dim 64 an SM's 16 exponentials a clock take as long as the 256
// tensor-core FLOPs of each score). x is rounded to the nearest integer n by adding 1.5·2^23,
// 2^(x − n) comes from a cubic on [−½, ½] (relative error ≤ 7.5e-5, a fiftieth of P's bf16
// rounding; coefficients fitted for relative error), and n is added to the exponent bits. x is
// first raised to −125, so −inf (a masked key) gives 2^−125 ≈ 2e-38 where fast_exp2 gives 0.
__device__ __forceinline__ float poly_exp2(float x) {
    x = fmaxf(x, -125.f);
    const float t = __fadd_rn(x, 12582912.f);
    const float f = __fsub_rn(x, __fsub_rn(t, 12582912.f));
    const float p = fmaf(fmaf(fmaf(0.055171676f, f, 0.242611155f), f, 0.693260968f), f, 0.999928057f);
    // t's low mantissa bits hold n (two's complement): shifted to the exponent field they add n
    return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// Element offset of (batch b, token r, head h, column 0) in a [B, L, H, D] operand.
__device__ __forceinline__ long long row_offset(int b, int L, int r, int H, int h, int D) {
    return (((long long)b * L + r) * H + h) * D;
}

// The same in V (and dV), whose token rows are VMUL·H·D elements apart: H·D when V is its own
// tensor, 3·H·D when it is read in place from the MMDiT's fused qkv projection.
// Written as K's offset plus the extra stride, so that with VMUL = 1 it is K's offset exactly
// (one value, no extra register in these register-bound kernels).
template <int VMUL>
__device__ __forceinline__ long long v_offset(long long k_off, int b, int L, int r, long long ld) {
    return k_off + (long long)(VMUL - 1) * (((long long)b * L + r) * ld);
}

// p[0] += a, p[1] += b as one vector reduction (red.global.add.v2.f32, sm_90; p 8-byte aligned).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#ifdef ADVDMD_EMU
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#else
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#endif
}

// p[0..3] += v as one vector reduction (red.global.add.v4.f32, sm_90; p 16-byte aligned).
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#ifdef ADVDMD_EMU
    atomicAdd(p, v.x);
    atomicAdd(p + 1, v.y);
    atomicAdd(p + 2, v.z);
    atomicAdd(p + 3, v.w);
#else
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
#endif
}

// The joint-attention entry points (attention.cu, attention_hopper.cu), one line each: the kernel's
// name, its __launch_bounds__ (threads, minimum blocks per SM) and the kernel body it runs (a
// template instance taking the entry's arguments in this order). build.rs reads the kernel names
// from these invocations.
#define ATTN_FWD_ENTRY(name, threads, min_blocks, ...)                                                  \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,                     \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,     \
             int La, int Lb, int H, float scale_log2) {                                                 \
        kernel_prologue();                                                                              \
        __VA_ARGS__(oa, ob, lse, qa, ka, va, qb, kb, vb, La, Lb, H, scale_log2);                        \
    }

// The forward with its units split along the keys from split_from on (attention_hopper.cu's
// fwd_h3): ATTN_FWD_ENTRY's arguments, then the pieces' partial outputs, the split and the
// number of (virtual) blocks, which a smaller grid takes in turns.
#define ATTN_FWD_SPLIT_ENTRY(name, threads, min_blocks, ...)                                            \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,                     \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,     \
             int La, int Lb, int H, float scale_log2, float* __restrict__ opart, int split_from,        \
             int splits, int blocks) {                                                                  \
        kernel_prologue();                                                                              \
        __VA_ARGS__(oa, ob, lse, qa, ka, va, qb, kb, vb, La, Lb, H, scale_log2, opart, split_from,      \
                    splits, blocks);                                                                    \
    }

// The tensor maps of a forward whose producer copies by TMA (FwdVariant::H13): Q, K and V of
// stream a then b, each [B, L, H, D] as a rank-4 map (D innermost) with a box of 64 columns, one
// head and a tile's rows (src/kernels/attention.rs, fwd_maps). V's token stride is in its map, so
// one kernel reads V alone or inside a fused qkv.
struct AttnMaps {
    TmaMap q[2], k[2], v[2];
};

// ATTN_FWD_SPLIT_ENTRY's forward with the maps last, by value in param space (the copy unit
// reads them there); the producer passes their address to tma_load_4d.
#define ATTN_FWD_TMA_ENTRY(name, threads, min_blocks, ...)                                              \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,                     \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,     \
             int La, int Lb, int H, float scale_log2, float* __restrict__ opart, int split_from,        \
             int splits, int blocks, const __grid_constant__ attn::AttnMaps maps) {                     \
        kernel_prologue();                                                                              \
        __VA_ARGS__(oa, ob, lse, qa, ka, va, qb, kb, vb, La, Lb, H, scale_log2, opart, split_from,      \
                    splits, blocks, &maps);                                                             \
    }

#define ATTN_BWD_ENTRY(name, threads, min_blocks, ...)                                                  \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,                    \
             bf16* __restrict__ dvb, float* __restrict__ dqa_acc, float* __restrict__ dqb_acc,          \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ doa, const bf16* __restrict__ qb, const bf16* __restrict__ kb,    \
             const bf16* __restrict__ vb, const bf16* __restrict__ dob, const float* __restrict__ lse,  \
             const float* __restrict__ drow, int La, int Lb, int H, float scale_log2, float scale) {    \
        kernel_prologue();                                                                              \
        __VA_ARGS__(dka, dva, dkb, dvb, dqa_acc, dqb_acc, qa, ka, va, doa, qb, kb, vb, dob, lse, drow,  \
                    La, Lb, H, scale_log2, scale);                                                      \
    }

// The backward with its units split along the queries from split_from on (attention_hopper.cu's
// bwd_h3): ATTN_BWD_ENTRY's arguments, then the pieces' partial dK, dV and the split.
#define ATTN_BWD_SPLIT_ENTRY(name, threads, min_blocks, ...)                                            \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,                    \
             bf16* __restrict__ dvb, float* __restrict__ dqa_acc, float* __restrict__ dqb_acc,          \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ doa, const bf16* __restrict__ qb, const bf16* __restrict__ kb,    \
             const bf16* __restrict__ vb, const bf16* __restrict__ dob, const float* __restrict__ lse,  \
             const float* __restrict__ drow, int La, int Lb, int H, float scale_log2, float scale,      \
             float* __restrict__ kvpart, int split_from, int splits) {                                  \
        kernel_prologue();                                                                              \
        __VA_ARGS__(dka, dva, dkb, dvb, dqa_acc, dqb_acc, qa, ka, va, doa, qb, kb, vb, dob, lse, drow,  \
                    La, Lb, H, scale_log2, scale, kvpart, split_from, splits);                          \
    }

// The tensor maps of a backward whose loader copies Q, K, V and dO by TMA and whose flusher adds
// dQ by TMA (BwdVariant::H11), of stream a then b, as AttnMaps' (dO laid out as Q; dQ the f32
// accumulators, a box 32 columns wide).
struct AttnBwdMaps {
    TmaMap q[2], k[2], v[2], dout[2], dq[2];
};

// ATTN_BWD_SPLIT_ENTRY's backward with the maps last, by value in param space.
#define ATTN_BWD_TMA_ENTRY(name, threads, min_blocks, ...)                                              \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks)                                   \
        name(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,                    \
             bf16* __restrict__ dvb, float* __restrict__ dqa_acc, float* __restrict__ dqb_acc,          \
             const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,     \
             const bf16* __restrict__ doa, const bf16* __restrict__ qb, const bf16* __restrict__ kb,    \
             const bf16* __restrict__ vb, const bf16* __restrict__ dob, const float* __restrict__ lse,  \
             const float* __restrict__ drow, int La, int Lb, int H, float scale_log2, float scale,      \
             float* __restrict__ kvpart, int split_from, int splits,                                    \
             const __grid_constant__ attn::AttnBwdMaps maps) {                                          \
        kernel_prologue();                                                                              \
        __VA_ARGS__(dka, dva, dkb, dvb, dqa_acc, dqb_acc, qa, ka, va, doa, qb, kb, vb, dob, lse, drow,  \
                    La, Lb, H, scale_log2, scale, kvpart, split_from, splits, &maps);                   \
    }

// The lazy softmax rescale's threshold (attention.cu, fwd_v3): a row's reference maximum moves
// only when a score's exponent would exceed 2^kLazyLog2 against it.
constexpr float kLazyLog2 = 8.f;

}  // namespace attn
