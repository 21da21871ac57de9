// Joint attention of the MMDiT (MMDIT.md §A.3), FlashAttention-2 style, bf16 in and out with f32
// accumulation on the tensor cores (mma.m16n8k16 + ldmatrix, via common.cuh's wrappers).
// CPU twin: src/kernels/attention.rs (same layouts, same saved lse).
//
// Operands: two token streams a (text, La tokens, La may be 0) and b (image, Lb tokens), each with
// its own q, k, v pointers in the layout [B, L, H, D] (token row stride H·D; the tensor-core
// kernels take V and write dV with a token stride of vmul·H·D, vmul = 3 where the MMDiT reads V
// in place from its fused qkv projection and writes dV into the fused gradient). Every query attends
// over the concatenated keys [a; b] with one softmax, O = softmax(Q·Kᵀ/√D)·V, no mask, no
// causality; the concatenation is never built: the key (and query) tiles are enumerated stream
// a first, then stream b, and each tile lies inside one stream (a stream's last tile is partial
// and masked). D is 64 or 128 (template, one extern "C" entry per value); any other D up to 256
// runs the simple fallback at the end of this file (joint_attn_*_naive: one thread per row, no
// tensor cores, same results and lse).
//
//   joint_attn_fwd_v{3,4}_d{64,128} O (two buffers) and the row log-sum-exp lse [B, H, La+Lb]
//                                (f32, natural log of Σ exp(scale·s), rows ordered a then b):
//                                warps of 32 query rows with a lazy softmax rescale and a 2–3 stage
//                                K/V pipeline (fwd_v3); V3 8 warps (256-row blocks), V4 4 warps
//                                (128-row blocks) (FwdVariant::V3, V4)
//   joint_attn_bwd_rowdot        Drow = rowsum(dO ∘ O) [B, H, La+Lb], the softmax backward's row term,
//                                and the dQ accumulators zeroed
//   joint_attn_bwd_k128_d{64,128} dK, dV (bf16) per 128-key tile (8 warps; the default); dQ
//                                accumulated with f32 reductions into two f32 buffers [B, L, H, D]
//                                (zeroed by joint_attn_bwd_rowdot), unscaled
//   joint_attn_bwd_v3_d64        the same with 128-key tiles and 4 warps of 32 keys (bwd_v3,
//                                BwdVariant::V3)
//   joint_attn_dq_convert        dQ = scale · accumulator, to bf16 (the MMDiT with QK norms skips
//                                it: qknorm.cu's rms_norm_bwd2_dq32 reads the accumulator)
//   joint_attn_fwd_naive         fallback for any other D ≤ 256 (section at the end): O and lse,
//                                one thread per query row, online softmax over all keys
//   joint_attn_bwd_naive_drow    fallback Drow = Σ_j P·dP, one thread per query row
//   joint_attn_bwd_naive_dq      fallback dQ (bf16), one thread per query row over all keys
//   joint_attn_bwd_naive_dkdv    fallback dK, dV (bf16), one thread per key row over all queries
//
// Tiling: every warp owns 32 query rows of the forward's block (128 or 256 rows) or 16 or 32 keys of
// the backward's 128-key block; the other operand streams through shared memory in tiles of 64
// rows, pipelined: the next tiles' cp.async copies are issued before the current tile's math and
// waited for (cp.async.wait_group + barrier) once they are needed, so
// global latency overlaps the tensor-core work. Blocks of one (batch, head) are consecutive in
// blockIdx.x, so they run together and share the streamed tiles in L2. Shared rows are padded to
// D+8 bf16 (144 or 272 bytes): the 8 row addresses of one ldmatrix 8×8 matrix then fall in 8
// distinct 16-byte bank groups, so ldmatrix and the fragment stores are free of bank conflicts.
// Global↔shared copies are 16-byte (cp.async.cg, zero-filled past a tile's valid rows; rows are
// 16-byte aligned because D·2 is a multiple of 16 and buffers are 16-byte aligned).
//
// Forward (grid: query tiles of both streams × B·H): for every key tile, S = Q·Kᵀ (f32), online
// softmax on the raw scores with the scale folded into the exponent (p = 2^(s·c − m·c),
// c = scale·log2 e: one FFMA + ex2.approx; keys are masked only on a stream's partial last tile),
// P rounded to bf16 and reused in registers as the A operand of O += P·V. Each warp holds two
// 16-row m-tiles, so every K, V fragment read from shared memory feeds two mma; Q fragments stay
// in registers for D = 64 and are re-read from the Q tile per key tile for D = 128 (O alone holds
// 128 registers there). The variants measured and dropped (docs/perf-log.md, 2026-11-26): 8 warps
// of 16 rows (W16) and 4 warps of 32 rows without the lazy rescale (W32), both slower than the
// faster of V3/V4 at every measured shape on an H200; likewise the 64-key backward (K64).
//
// Backward (grid: key tiles of both streams × B·H): K, V of the block's key tile stay in shared
// memory (and, for D = 64, this warp's K, V rows in registers as A fragments), dK, dV accumulate
// in registers; for every query tile: Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·c − lse·log2 e), dV += Pᵀ·dO,
// dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − Drow), dK += dSᵀ·Q (per warp 16 keys × 64 queries; for D = 128 in
// chunks of 32 queries (16 with 8 warps), to stay within 255 registers). dSᵀ goes to shared
// memory (bf16) and then each warp forms dQ = dS·K for 16 query rows (× D/2 columns with 8 warps)
// and adds it to the f32 accumulator with red.global.add.v2.f32 (so dQ's summation order, unlike
// everything else here, is not fixed on a GPU). Q, dO, lse and Drow of the next query tile are
// prefetched with cp.async. Shared memory: K, V + two stages of Q, dO + dSᵀ (keys × 72) + two
// stages of two 64-float row vectors: 128 keys 93,184 bytes for D=64 and 158,720 for D=128.
//
// The row term: FlashAttention's Drow = dO·O, with O the bf16 forward output. The CPU kernel uses
// Σ P·dP instead (exact cancellation where attention is one-hot), which would need a second pass
// over all keys. Measured against the CPU kernel (tests/kernels/attention.rs): no difference at
// unit-variance scores (max relative error of dQ, dK ≈ 3e-3 either way, the bf16 output rounding
// being 2e-3); on peaked rows (score std 9) O's rounding raises it to ≈ 7e-3 (≈ 3e-3 with an
// exact Drow).
#include "attention_common.cuh"

#define ATTN_THREADS 128      // backward: 4 warps

namespace attn {

// Copies `rows` token rows starting at `g` (global, row stride `ld` elements) into a shared tile of
// stride D+8 with asynchronous copies (cp.async, completed by the caller's commit/wait + barrier): a
// tile of NR rows copied by NT threads; rows past `rows` are zero-filled (rows ≥ 1).
template <int D, int NR, int NT>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* __restrict__ g, long long ld, int rows) {
    constexpr int CH = D / 8;
    static_assert(NR * CH % NT == 0, "tile copy must divide evenly");
#pragma unroll
    for (int it = 0; it < NR * CH / NT; it++) {
        const int i = threadIdx.x + it * NT, r = i / CH, c = i % CH;
        cp_async_16_zfill(s + r * (D + 8) + c * 8, g + min(r, rows - 1) * ld + c * 8, r < rows);
    }
}

// The reverse: the first `rows` rows of a shared tile out to global memory.
template <int D, int NR = ATTN_TILE, int NT = ATTN_THREADS>
__device__ __forceinline__ void store_tile(bf16* __restrict__ g, const bf16* s, long long ld, int rows) {
    constexpr int CH = D / 8;
#pragma unroll
    for (int it = 0; it < NR * CH / NT; it++) {
        const int i = threadIdx.x + it * NT, r = i / CH, c = i % CH;
        if (r < rows) store16(g + r * ld + c * 8, load16(s + r * (D + 8) + c * 8));
    }
}

__device__ __forceinline__ void st_u32(bf16* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

// Shared-memory addresses a lane passes to ldmatrix_x4 for the operand fragments of
// mma.m16n8k16 (fragment layouts in common.cuh). `s` is a tile of stride `ld` elements.
//
// A operand, 16×16 at (row0, col0), stored row-major (rows = M, cols = K). Matrices 0..3 are
// (rows +0, cols +0), (rows +8, cols +0), (rows +0, cols +8), (rows +8, cols +8) = a[0..3].
__device__ __forceinline__ const bf16* frag_a(const bf16* s, int ld, int row0, int col0, int lane) {
    return s + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8;
}
// B operands of two adjacent n-blocks from a tile stored with rows = N, cols = K (e.g. K in
// S = Q·Kᵀ): matrices (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8), i.e. r[0..1] = b
// of n-block n0, r[2..3] = b of n-block n0+8. Non-transposed ldmatrix.
__device__ __forceinline__ const bf16* frag_b_nk(const bf16* s, int ld, int n0, int k0, int lane) {
    return s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// B operands of two adjacent n-blocks from a tile stored with rows = K, cols = N (e.g. V in
// O = P·V): matrices (k +0, n +0), (k +8, n +0), (k +0, n +8), (k +8, n +8), read with
// ldmatrix .trans; again r[0..1] = b of n-block n0, r[2..3] = b of n-block n0+8.
__device__ __forceinline__ const bf16* frag_b_kn(const bf16* s, int ld, int k0, int n0, int lane) {
    return s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}
// A operand 16×16 (M = rows of the result, K) from a tile stored transposed, rows = K, cols = M
// (dSᵀ when forming dQ = dS·K): matrices (k +0, m +0), (k +0, m +8), (k +8, m +0), (k +8, m +8)
// read with ldmatrix .trans give a[0..3].
__device__ __forceinline__ const bf16* frag_a_t(const bf16* s, int ld, int k0, int m0, int lane) {
    return s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}

// The A fragment of a 16×16 slice (columns 16c..16c+15) of a 16×8NB accumulator `x[NB][4]` (the
// C layout of NB n-blocks), rounded to bf16: how P (or dS) feeds the next product without
// leaving registers.
template <int NB>
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float x[NB][4], int c) {
    a[0] = pack_bf16x2(x[2 * c][0], x[2 * c][1]);
    a[1] = pack_bf16x2(x[2 * c][2], x[2 * c][3]);
    a[2] = pack_bf16x2(x[2 * c + 1][0], x[2 * c + 1][1]);
    a[3] = pack_bf16x2(x[2 * c + 1][2], x[2 * c + 1][3]);
}

// acc[16 × D] += A(16 × 8NB, as 16×16 A fragments from `x`) · B(8NB × D), B being rows k0.. of a
// shared tile with rows = K, cols = D: O += P·V, dV += Pᵀ·dO, dK += dSᵀ·Q.
template <int D, int NB>
__device__ __forceinline__ void acc_times_tile(float acc[D / 8][4], const float x[NB][4], const bf16* s, int k0,
                                               int lane) {
#pragma unroll
    for (int c = 0; c < NB / 2; c++) {
        uint32_t a[4];
        acc_to_a<NB>(a, x, c);
#pragma unroll
        for (int j = 0; j < D / 16; j++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, frag_b_kn(s, D + 8, k0 + 16 * c, 16 * j, lane));
            mma_m16n8k16_bf16(acc[2 * j], a, b, acc[2 * j]);
            mma_m16n8k16_bf16(acc[2 * j + 1], a, b + 2, acc[2 * j + 1]);
        }
    }
}

// x[16 × 8NB] = A(16 × D, rows row0.. of shared tile `sa`) · B(8NB × D, rows n0.. of tile `sb`)ᵀ:
// Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ.
template <int D, int NB>
__device__ __forceinline__ void tile_times_tile_t(float x[NB][4], const bf16* sa, int row0, const bf16* sb,
                                                  int n0, int lane) {
#pragma unroll
    for (int n = 0; n < NB; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) x[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t a[4];
        ldmatrix_x4(a, frag_a(sa, D + 8, row0, 16 * kk, lane));
#pragma unroll
        for (int j = 0; j < NB / 2; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, frag_b_nk(sb, D + 8, n0 + 16 * j, 16 * kk, lane));
            mma_m16n8k16_bf16(x[2 * j], a, b, x[2 * j]);
            mma_m16n8k16_bf16(x[2 * j + 1], a, b + 2, x[2 * j + 1]);
        }
    }
}

// The same with the A operand already in registers (af[kk] = 16×16 A fragment of columns 16kk..).
template <int D, int NB>
__device__ __forceinline__ void frag_times_tile_t(float x[NB][4], const uint32_t af[D / 16][4], const bf16* sb,
                                                  int n0, int lane) {
#pragma unroll
    for (int n = 0; n < NB; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) x[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
        for (int j = 0; j < NB / 2; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, frag_b_nk(sb, D + 8, n0 + 16 * j, 16 * kk, lane));
            mma_m16n8k16_bf16(x[2 * j], af[kk], b, x[2 * j]);
            mma_m16n8k16_bf16(x[2 * j + 1], af[kk], b + 2, x[2 * j + 1]);
        }
    }
}

// Writes a warp's 16 × D accumulator (times per-row factors f0 for rows g, f1 for rows g+8) as
// bf16 into rows row0.. of a shared tile, for a coalesced copy-out.
template <int D>
__device__ __forceinline__ void acc_to_shared(bf16* s, int row0, const float acc[D / 8][4], float f0, float f1,
                                              int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        st_u32(s + (row0 + g) * (D + 8) + 8 * n + 2 * t, pack_bf16x2(acc[n][0] * f0, acc[n][1] * f0));
        st_u32(s + (row0 + g + 8) * (D + 8) + 8 * n + 2 * t, pack_bf16x2(acc[n][2] * f1, acc[n][3] * f1));
    }
}

// ---- Forward ---------------------------------------------------------------------------------

// The forward generalised (FwdVariant::V3, V4): NW warps of 32 query rows (a 32·NW-row block),
// STAGES-deep cp.async pipeline of K, V tiles, and a lazy softmax rescale: a row's reference
// maximum m moves (and O, l are rescaled) only when some row of the warp sees a score whose
// exponent would exceed 2^kLazyLog2 against the current m (warp-uniform branch, decided with
// __any_sync); otherwise p = 2^(s·c − m·c) ≤ 2^kLazyLog2 stays well inside bf16 and f32 range.
// The first tile always rescales (m = −inf, alpha = 0). After the first tiles the branch is
// almost never taken, which removes the per-tile O rescale (one FMUL per score per thread at
// d = 64) and the alpha exponentials. The result is the same function (lse = m·c·ln2 + ln l holds
// for any reference m ≥ the running max − kLazyLog2/c); only roundings differ from an eager rescale.
// Deterministic: fixed order, no atomics.

template <int D, bool QREG, int NW, int STAGES, int VMUL>
__device__ __forceinline__ void fwd_v3(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,
                                       const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                                       const bf16* __restrict__ va, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb, int La, int Lb,
                                       int H, float scale_log2) {
    constexpr int LDS = D + 8;
    constexpr int MT = 2;  // m-tiles per warp
    constexpr int NT = 32 * NW, QT = 32 * NW;
    constexpr int KVS = ATTN_TILE * LDS;  // elements of one K (or V) stage
    static_assert(STAGES >= 2, "at least double buffering");
    DYNAMIC_SMEM(bf16, smem);
    bf16* sQ = smem;
    bf16* sK0 = sQ + QT * LDS;        // STAGES stages of K
    bf16* sV0 = sK0 + STAGES * KVS;   // STAGES stages of V

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;
    const int row_w = 32 * warp;

    const Tile qt = tile_of<QT>(blockIdx.x, La, Lb);
    const int Lq = qt.stream == 0 ? La : Lb;
    const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);

    auto issue_kv = [&](int i, int st) {
        const Tile kt = tile_of(i, La, Lb);
        const int Lk = kt.stream == 0 ? La : Lb;
        const long long k_off = row_offset(b, Lk, kt.row0, H, h, D);
        load_tile_async<D, ATTN_TILE, NT>(sK0 + st * KVS, (kt.stream == 0 ? ka : kb) + k_off, ld, kt.rows);
        load_tile_async<D, ATTN_TILE, NT>(sV0 + st * KVS,
                                          (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), VMUL * ld,
                                          kt.rows);
    };

    const int nkt = ntiles(La) + ntiles(Lb);
    // Prologue: group 0 = the Q tile and key tile 0; groups 1..STAGES−2 = key tiles 1..STAGES−2
    // (committed even when empty, so the wait counts below stay fixed).
    load_tile_async<D, QT, NT>(sQ, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
    issue_kv(0, 0);
    cp_async_commit();
#pragma unroll
    for (int s = 1; s < STAGES - 1; s++) {
        if (s < nkt) issue_kv(s, s);
        cp_async_commit();
    }

    uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];

    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < D / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[mt][n][e] = 0.f;
    // Reference max in exponent units, ms = m·c (m a raw score), and partial row sums; row
    // r = 2·mt + (0: row g, 1: row g+8).
    float ms[2 * MT], l[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) ms[r] = -INFINITY, l[r] = 0.f;

    int st = 0;  // stage of tile kt_i
    for (int kt_i = 0; kt_i < nkt; kt_i++) {
        // Refill the stage consumed in iteration kt_i − 1 (closed by that iteration's final
        // barrier) with tile kt_i + STAGES − 1, then wait for tile kt_i.
        {
            const int nx = kt_i + STAGES - 1;
            int nst = st + STAGES - 1;
            if (nst >= STAGES) nst -= STAGES;
            if (nx < nkt) issue_kv(nx, nst);
        }
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        if (QREG && kt_i == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++)
                    ldmatrix_x4(qf[QREG ? mt : 0][QREG ? kk : 0], frag_a(sQ, LDS, row_w + 16 * mt, 16 * kk, lane));
        }
        const bf16* sK = sK0 + st * KVS;
        const bf16* sV = sV0 + st * KVS;
        const int krows = min(ATTN_TILE, kt_i < ntiles(La) ? La - kt_i * ATTN_TILE
                                                            : Lb - (kt_i - ntiles(La)) * ATTN_TILE);

        float s[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[mt][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t qa_[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (QREG) {
#pragma unroll
                    for (int e = 0; e < 4; e++) qa_[mt][e] = qf[QREG ? mt : 0][QREG ? kk : 0][e];
                } else {
                    ldmatrix_x4(qa_[mt], frag_a(sQ, LDS, row_w + 16 * mt, 16 * kk, lane));
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t bk[4];
                ldmatrix_x4(bk, frag_b_nk(sK, LDS, 16 * j, 16 * kk, lane));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_m16n8k16_bf16(s[mt][2 * j], qa_[mt], bk, s[mt][2 * j]);
                    mma_m16n8k16_bf16(s[mt][2 * j + 1], qa_[mt], bk + 2, s[mt][2 * j + 1]);
                }
            }
        }

        if (krows < ATTN_TILE) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (8 * n + 2 * t + (e & 1) >= krows) s[mt][n][e] = -INFINITY;
        }
        // Tile row maxima (quad-reduced) and whether any row of the warp must move its reference.
        float mx[2 * MT];
        bool need = false;
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float a0 = s[mt][0][0], a1 = s[mt][0][2];
#pragma unroll
            for (int n = 0; n < 8; n++) {
                a0 = fmaxf(a0, fmaxf(s[mt][n][0], s[mt][n][1]));
                a1 = fmaxf(a1, fmaxf(s[mt][n][2], s[mt][n][3]));
            }
            mx[2 * mt] = a0, mx[2 * mt + 1] = a1;
        }
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
            // m = −inf on the first tile: +inf > threshold.
            need |= fmaf(mx[r], scale_log2, -ms[r]) > kLazyLog2;
        }
        if (__any_sync(FULL_MASK, need)) {  // warp-uniform
#pragma unroll
            for (int r = 0; r < 2 * MT; r++) {
                const float mn = fmaxf(ms[r], mx[r] * scale_log2);
                const float alpha = fast_exp2(ms[r] - mn);  // first tile: 2^−inf = 0
                ms[r] = mn;
                l[r] *= alpha;
                const int mt = r >> 1, hi = r & 1;
#pragma unroll
                for (int n = 0; n < D / 8; n++) {
                    o[mt][n][2 * hi] *= alpha;
                    o[mt][n][2 * hi + 1] *= alpha;
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float rs[2] = {0.f, 0.f};
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = fast_exp2(fmaf(s[mt][n][e], scale_log2, -ms[2 * mt + (e >> 1)]));
                    s[mt][n][e] = p;
                    rs[e >> 1] += p;
                }
            l[2 * mt] += rs[0];
            l[2 * mt + 1] += rs[1];
        }
        // O += P·V, every V fragment feeding both m-tiles.
#pragma unroll
        for (int c = 0; c < 4; c++) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) acc_to_a<8>(pa[mt], s[mt], c);
#pragma unroll
            for (int j = 0; j < D / 16; j++) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, frag_b_kn(sV, LDS, 16 * c, 16 * j, lane));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_m16n8k16_bf16(o[mt][2 * j], pa[mt], bv, o[mt][2 * j]);
                    mma_m16n8k16_bf16(o[mt][2 * j + 1], pa[mt], bv + 2, o[mt][2 * j + 1]);
                }
            }
        }
        __syncthreads();
        if (++st == STAGES) st = 0;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int r = 0; r < 2 * MT; r++) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    }
    if (t == 0) {
        float* lrow = lse + (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0;
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) {
            const int row = row_w + 16 * (r >> 1) + g + 8 * (r & 1);
            if (row < qt.rows) lrow[row] = ms[r] * kLn2 + logf(l[r]);
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
        acc_to_shared<D>(sQ, row_w + 16 * mt, o[mt], 1.f / l[2 * mt], 1.f / l[2 * mt + 1], lane);
    __syncthreads();
    store_tile<D, QT, NT>((qt.stream == 0 ? oa : ob) + q_off, sQ, ld, qt.rows);
}

// ---- Backward --------------------------------------------------------------------------------

// NW warps (8: BwdVariant::K128), each owning 16 keys: a key tile of KT = 16·NW rows per block.
template <int D, int NW, int VMUL>
__device__ __forceinline__ void bwd(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,
                                    bf16* __restrict__ dvb, float* __restrict__ dqa_acc,
                                    float* __restrict__ dqb_acc, const bf16* __restrict__ qa,
                                    const bf16* __restrict__ ka, const bf16* __restrict__ va,
                                    const bf16* __restrict__ doa, const bf16* __restrict__ qb,
                                    const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                                    const bf16* __restrict__ dob, const float* __restrict__ lse,
                                    const float* __restrict__ drow, int La, int Lb, int H, float scale_log2,
                                    float scale) {
    constexpr int LDS = D + 8;
    constexpr int LDP = ATTN_TILE + 8;  // dSᵀ tile stride (keys × queries)
    constexpr int QC = D == 128 ? (NW == 8 ? 16 : 32) : 64;  // query columns per Pᵀ/dSᵀ chunk
    constexpr int NB = QC / 8;
    constexpr int TS = ATTN_TILE * LDS;  // elements of one query tile
    constexpr int NT = 32 * NW, KT = 16 * NW;
    DYNAMIC_SMEM(bf16, smem);
    bf16* sK = smem;               // KT rows
    bf16* sV = sK + KT * LDS;      // KT rows
    bf16* sQ0 = sV + KT * LDS;     // two stages of Q
    bf16* sdO0 = sQ0 + 2 * TS;  // two stages of dO
    bf16* sdS = sdO0 + 2 * TS;
    float* sL0 = reinterpret_cast<float*>(sdS + KT * LDP);  // two stages of lse per query row
    float* sDr0 = sL0 + 2 * ATTN_TILE;                              // two stages of Drow per query row

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;

    const Tile kt = tile_of<KT>(blockIdx.x, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long k_off = row_offset(b, Lk, kt.row0, H, h, D);

    // Query tile `i` (Q, dO, lse, Drow) into stage `st`, asynchronously (the caller commits).
    // Padded query rows: zero Q and dO, lse = +inf (P exactly 0), Drow = 0.
    auto issue_q = [&](int i, int st) {
        const Tile qt = tile_of(i, La, Lb);
        const int Lq = qt.stream == 0 ? La : Lb;
        const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);
        const long long r_off = (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0;
        load_tile_async<D, ATTN_TILE, NT>(sQ0 + st * TS, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
        load_tile_async<D, ATTN_TILE, NT>(sdO0 + st * TS, (qt.stream == 0 ? doa : dob) + q_off, ld, qt.rows);
        for (int j = threadIdx.x; j < 2 * ATTN_TILE; j += NT) {
            const int r = j & (ATTN_TILE - 1);
            float* dst = (j < ATTN_TILE ? sL0 : sDr0) + st * ATTN_TILE + r;
            if (r < qt.rows)
                cp_async_4(dst, (j < ATTN_TILE ? lse : drow) + r_off + r);
            else
                *dst = j < ATTN_TILE ? INFINITY : 0.f;
        }
    };

    // Group 0: K, V of this block and query tile 0.
    load_tile_async<D, KT, NT>(sK, (kt.stream == 0 ? ka : kb) + k_off, ld, kt.rows);
    load_tile_async<D, KT, NT>(sV, (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), VMUL * ld, kt.rows);
    issue_q(0, 0);
    cp_async_commit();
    // Keys (rows of this warp's Sᵀ) past the tile's end get P = 0.
    const bool key_ok[2] = {16 * warp + g < kt.rows, 16 * warp + g + 8 < kt.rows};

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;

    // D = 64: this warp's K and V rows as A fragments in registers for the whole loop (32
    // registers; D = 128 has no room and re-reads them from shared memory).
    constexpr bool KVREG = D == 64;
    uint32_t kf[KVREG ? D / 16 : 1][4], vf[KVREG ? D / 16 : 1][4];

    const int nqt = ntiles(La) + ntiles(Lb);
    for (int qt_i = 0; qt_i < nqt; qt_i++) {
        // Prefetch the next query tile into the other stage (last read in iteration qt_i − 1,
        // before that iteration's middle barrier), then wait for this one. The barrier also
        // orders the previous iteration's dQ reads of dSᵀ before this iteration's writes.
        if (qt_i + 1 < nqt) issue_q(qt_i + 1, (qt_i + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (KVREG && qt_i == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                ldmatrix_x4(kf[KVREG ? kk : 0], frag_a(sK, LDS, 16 * warp, 16 * kk, lane));
                ldmatrix_x4(vf[KVREG ? kk : 0], frag_a(sV, LDS, 16 * warp, 16 * kk, lane));
            }
        }
        const int st = qt_i & 1;
        const bf16* sQ = sQ0 + st * TS;
        const bf16* sdO = sdO0 + st * TS;
        const float* sL = sL0 + st * ATTN_TILE;
        const float* sDr = sDr0 + st * ATTN_TILE;

        // The tile's 64 queries in chunks of QC columns (all 64 for D = 64; two halves of 32 for
        // D = 128, where dK, dV already hold 128 registers and full-width Pᵀ, dSᵀ spill). Not
        // unrolled: ptxas then keeps both chunks' values live and spills anyway.
#pragma unroll 1
        for (int q0 = 0; q0 < ATTN_TILE; q0 += QC) {
            // Pᵀ (rows: this warp's 16 keys; columns: queries q0..q0+QC−1).
            float p[NB][4];
            if constexpr (KVREG)
                frag_times_tile_t<D, NB>(p, kf, sQ, q0, lane);
            else
                tile_times_tile_t<D, NB>(p, sK, 16 * warp, sQ, q0, lane);
#pragma unroll
            for (int n = 0; n < NB; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int q = q0 + 8 * n + 2 * t + c;
                    const float lq = sL[q] * kLog2e;
#pragma unroll
                    for (int r = 0; r < 2; r++)
                        p[n][2 * r + c] = key_ok[r] ? fast_exp2(fmaf(p[n][2 * r + c], scale_log2, -lq)) : 0.f;
                }
            acc_times_tile<D, NB>(dv, p, sdO, q0, lane);  // dV += Pᵀ·dO

            // dSᵀ = Pᵀ ∘ (dPᵀ − Drow), dPᵀ = V·dOᵀ.
            float ds[NB][4];
            if constexpr (KVREG)
                frag_times_tile_t<D, NB>(ds, vf, sdO, q0, lane);
            else
                tile_times_tile_t<D, NB>(ds, sV, 16 * warp, sdO, q0, lane);
#pragma unroll
            for (int n = 0; n < NB; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int q = q0 + 8 * n + 2 * t + (e & 1);
                    ds[n][e] = p[n][e] * (ds[n][e] - sDr[q]);
                }
            acc_times_tile<D, NB>(dk, ds, sQ, q0, lane);  // dK += dSᵀ·Q (scaled at the end)

            // dSᵀ to shared memory for dQ below.
#pragma unroll
            for (int n = 0; n < NB; n++) {
                const int q = q0 + 8 * n + 2 * t;
                st_u32(sdS + (16 * warp + g) * LDP + q, pack_bf16x2(ds[n][0], ds[n][1]));
                st_u32(sdS + (16 * warp + g + 8) * LDP + q, pack_bf16x2(ds[n][2], ds[n][3]));
            }
        }
        // dQ += dS·K over the tile's KT keys (all warps' dSᵀ rows): warp w takes the 16 queries
        // 16·(w mod 4).. and the D/CG columns (w / 4)·D/CG.. (CG = NW/4 column groups).
        __syncthreads();
        const Tile qt = tile_of(qt_i, La, Lb);
        constexpr int CG = NW / 4, DC = D / CG;
        const int qr = CG == 1 ? 16 * warp : 16 * (warp & 3), c0 = CG == 1 ? 0 : (warp >> 2) * DC;
        if (qr < qt.rows) {  // warp-uniform: skip query rows that are all padding
            const int Lq = qt.stream == 0 ? La : Lb;
            float* dq = (qt.stream == 0 ? dqa_acc : dqb_acc) + row_offset(b, Lq, qt.row0, H, h, D);
            const int r0 = qr + g;
            // This warp's dS rows (16 queries × KT keys) as A fragments, read once for all columns.
            uint32_t a[KT / 16][4];
#pragma unroll
            for (int c = 0; c < KT / 16; c++) ldmatrix_x4_trans(a[c], frag_a_t(sdS, LDP, 16 * c, qr, lane));
#pragma unroll
            for (int j = 0; j < DC / 16; j++) {
                float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int c = 0; c < KT / 16; c++) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, frag_b_kn(sK, LDS, 16 * c, c0 + 16 * j, lane));
                    mma_m16n8k16_bf16(acc[0], a[c], bk, acc[0]);
                    mma_m16n8k16_bf16(acc[1], a[c], bk + 2, acc[1]);
                }
#pragma unroll
                for (int hn = 0; hn < 2; hn++) {
                    const int col = c0 + 16 * j + 8 * hn + 2 * t;
                    if (r0 < qt.rows) red_add2(dq + r0 * ld + col, acc[hn][0], acc[hn][1]);
                    if (r0 + 8 < qt.rows) red_add2(dq + (r0 + 8) * ld + col, acc[hn][2], acc[hn][3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // dK (times the softmax scale, which the scores carried) and dV out through this warp's own
    // rows of the K and V tiles (no warp reads them after the barrier).
    __syncthreads();
    acc_to_shared<D>(sK, 16 * warp, dk, scale, scale, lane);
    acc_to_shared<D>(sV, 16 * warp, dv, 1.f, 1.f, lane);
    __syncthreads();
    store_tile<D, KT, NT>((kt.stream == 0 ? dka : dkb) + k_off, sK, ld, kt.rows);
    store_tile<D, KT, NT>((kt.stream == 0 ? dva : dvb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), sV, VMUL * ld, kt.rows);
}

// The backward with MT 16-key m-tiles per warp (BwdVariant::V3: D = 64, 4 warps × 32 keys =
// 128-key blocks, two blocks per SM). Every Q and dO fragment read from shared memory (the B
// operand of Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q) feeds MT m-tiles instead of one;
// K and V (the A operands) are re-read from shared memory per product instead of being held in
// registers (dK, dV of 32 keys take 128 registers). Queries in chunks of QC = 32 columns. dQ as
// in bwd: dSᵀ through shared memory, warp w forms dQ for queries 16w.. over all KT keys with
// f32 reductions. Same shared-memory layout and launch arguments as bwd with KT = 32·NW.
template <int D, int NW, int MT, int VMUL>
__device__ __forceinline__ void bwd_v3(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,
                                       bf16* __restrict__ dvb, float* __restrict__ dqa_acc,
                                       float* __restrict__ dqb_acc, const bf16* __restrict__ qa,
                                       const bf16* __restrict__ ka, const bf16* __restrict__ va,
                                       const bf16* __restrict__ doa, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                                       const bf16* __restrict__ dob, const float* __restrict__ lse,
                                       const float* __restrict__ drow, int La, int Lb, int H, float scale_log2,
                                       float scale) {
    constexpr int LDS = D + 8;
    constexpr int LDP = ATTN_TILE + 8;
    constexpr int QC = 32, NB = QC / 8;
    constexpr int TS = ATTN_TILE * LDS;
    constexpr int NT = 32 * NW, KT = 16 * MT * NW;
    static_assert(NW == 4, "dQ split assumes 4 warps of 16 query rows");
    DYNAMIC_SMEM(bf16, smem);
    bf16* sK = smem;
    bf16* sV = sK + KT * LDS;
    bf16* sQ0 = sV + KT * LDS;
    bf16* sdO0 = sQ0 + 2 * TS;
    bf16* sdS = sdO0 + 2 * TS;
    float* sL0 = reinterpret_cast<float*>(sdS + KT * LDP);
    float* sDr0 = sL0 + 2 * ATTN_TILE;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;
    const int key_w = 16 * MT * warp;  // this warp's first key in the tile

    const Tile kt = tile_of<KT>(blockIdx.x, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long k_off = row_offset(b, Lk, kt.row0, H, h, D);

    auto issue_q = [&](int i, int st) {
        const Tile qt = tile_of(i, La, Lb);
        const int Lq = qt.stream == 0 ? La : Lb;
        const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);
        const long long r_off = (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0;
        load_tile_async<D, ATTN_TILE, NT>(sQ0 + st * TS, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
        load_tile_async<D, ATTN_TILE, NT>(sdO0 + st * TS, (qt.stream == 0 ? doa : dob) + q_off, ld, qt.rows);
        for (int j = threadIdx.x; j < 2 * ATTN_TILE; j += NT) {
            const int r = j & (ATTN_TILE - 1);
            float* dst = (j < ATTN_TILE ? sL0 : sDr0) + st * ATTN_TILE + r;
            if (r < qt.rows)
                cp_async_4(dst, (j < ATTN_TILE ? lse : drow) + r_off + r);
            else
                *dst = j < ATTN_TILE ? INFINITY : 0.f;
        }
    };

    load_tile_async<D, KT, NT>(sK, (kt.stream == 0 ? ka : kb) + k_off, ld, kt.rows);
    load_tile_async<D, KT, NT>(sV, (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), VMUL * ld, kt.rows);
    issue_q(0, 0);
    cp_async_commit();
    // Key rows (2·mt + r: rows g, g+8 of m-tile mt) past the tile's end get P = 0.
    bool key_ok[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) key_ok[r] = key_w + 16 * (r >> 1) + g + 8 * (r & 1) < kt.rows;

    float dk[MT][D / 8][4], dv[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < D / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[mt][n][e] = dv[mt][n][e] = 0.f;

    // x[mt] = A(rows key_w + 16mt.. of sa) · B(rows n0.. of sb)ᵀ, B fragments shared by the m-tiles.
    auto mm_t = [&](float x[MT][NB][4], const bf16* sa, const bf16* sb, int n0) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < NB; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) x[mt][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ldmatrix_x4(a[mt], frag_a(sa, LDS, key_w + 16 * mt, 16 * kk, lane));
#pragma unroll
            for (int j = 0; j < NB / 2; j++) {
                uint32_t bb[4];
                ldmatrix_x4(bb, frag_b_nk(sb, LDS, n0 + 16 * j, 16 * kk, lane));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_m16n8k16_bf16(x[mt][2 * j], a[mt], bb, x[mt][2 * j]);
                    mma_m16n8k16_bf16(x[mt][2 * j + 1], a[mt], bb + 2, x[mt][2 * j + 1]);
                }
            }
        }
    };
    // acc[mt] += x[mt] (as A fragments) · B(rows k0.. of tile s, cols = D).
    auto mm_acc = [&](float acc[MT][D / 8][4], const float x[MT][NB][4], const bf16* s, int k0) {
#pragma unroll
        for (int c = 0; c < NB / 2; c++) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) acc_to_a<NB>(a[mt], x[mt], c);
#pragma unroll
            for (int j = 0; j < D / 16; j++) {
                uint32_t bb[4];
                ldmatrix_x4_trans(bb, frag_b_kn(s, LDS, k0 + 16 * c, 16 * j, lane));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_m16n8k16_bf16(acc[mt][2 * j], a[mt], bb, acc[mt][2 * j]);
                    mma_m16n8k16_bf16(acc[mt][2 * j + 1], a[mt], bb + 2, acc[mt][2 * j + 1]);
                }
            }
        }
    };

    const int nqt = ntiles(La) + ntiles(Lb);
    for (int qt_i = 0; qt_i < nqt; qt_i++) {
        if (qt_i + 1 < nqt) issue_q(qt_i + 1, (qt_i + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int st = qt_i & 1;
        const bf16* sQ = sQ0 + st * TS;
        const bf16* sdO = sdO0 + st * TS;
        const float* sL = sL0 + st * ATTN_TILE;
        const float* sDr = sDr0 + st * ATTN_TILE;

#pragma unroll 1
        for (int q0 = 0; q0 < ATTN_TILE; q0 += QC) {
            float p[MT][NB][4];
            mm_t(p, sK, sQ, q0);
#pragma unroll
            for (int n = 0; n < NB; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float lq = sL[q0 + 8 * n + 2 * t + c] * kLog2e;
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int r = 0; r < 2; r++)
                            p[mt][n][2 * r + c] =
                                key_ok[2 * mt + r] ? fast_exp2(fmaf(p[mt][n][2 * r + c], scale_log2, -lq)) : 0.f;
                }
            mm_acc(dv, p, sdO, q0);  // dV += Pᵀ·dO

            float ds[MT][NB][4];
            mm_t(ds, sV, sdO, q0);  // dPᵀ = V·dOᵀ
#pragma unroll
            for (int n = 0; n < NB; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float dr = sDr[q0 + 8 * n + 2 * t + c];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int r = 0; r < 2; r++)
                            ds[mt][n][2 * r + c] = p[mt][n][2 * r + c] * (ds[mt][n][2 * r + c] - dr);
                }
            mm_acc(dk, ds, sQ, q0);  // dK += dSᵀ·Q (scaled at the end)

#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < NB; n++) {
                    const int q = q0 + 8 * n + 2 * t;
                    st_u32(sdS + (key_w + 16 * mt + g) * LDP + q, pack_bf16x2(ds[mt][n][0], ds[mt][n][1]));
                    st_u32(sdS + (key_w + 16 * mt + g + 8) * LDP + q, pack_bf16x2(ds[mt][n][2], ds[mt][n][3]));
                }
        }
        // dQ += dS·K over the tile's KT keys: warp w takes the 16 queries 16w.. and all D columns.
        __syncthreads();
        const Tile qt = tile_of(qt_i, La, Lb);
        const int qr = 16 * warp;
        if (qr < qt.rows) {  // warp-uniform
            const int Lq = qt.stream == 0 ? La : Lb;
            float* dq = (qt.stream == 0 ? dqa_acc : dqb_acc) + row_offset(b, Lq, qt.row0, H, h, D);
            const int r0 = qr + g;
            uint32_t a[KT / 16][4];
#pragma unroll
            for (int c = 0; c < KT / 16; c++) ldmatrix_x4_trans(a[c], frag_a_t(sdS, LDP, 16 * c, qr, lane));
#pragma unroll
            for (int j = 0; j < D / 16; j++) {
                float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int c = 0; c < KT / 16; c++) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, frag_b_kn(sK, LDS, 16 * c, 16 * j, lane));
                    mma_m16n8k16_bf16(acc[0], a[c], bk, acc[0]);
                    mma_m16n8k16_bf16(acc[1], a[c], bk + 2, acc[1]);
                }
#pragma unroll
                for (int hn = 0; hn < 2; hn++) {
                    const int col = 16 * j + 8 * hn + 2 * t;
                    if (r0 < qt.rows) red_add2(dq + r0 * ld + col, acc[hn][0], acc[hn][1]);
                    if (r0 + 8 < qt.rows) red_add2(dq + (r0 + 8) * ld + col, acc[hn][2], acc[hn][3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        acc_to_shared<D>(sK, key_w + 16 * mt, dk[mt], scale, scale, lane);
        acc_to_shared<D>(sV, key_w + 16 * mt, dv[mt], 1.f, 1.f, lane);
    }
    __syncthreads();
    store_tile<D, KT, NT>((kt.stream == 0 ? dka : dkb) + k_off, sK, ld, kt.rows);
    store_tile<D, KT, NT>((kt.stream == 0 ? dva : dvb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), sV, VMUL * ld, kt.rows);
}

}  // namespace attn

// ---- Entry points ------------------------------------------------------------------------------
// scale_log2 = log2(e)/√D.

// fwd_v3 entries (same arguments and results as the others). V3: 8 warps × 32 rows = 256-row
// query blocks (grid: 256-row tiles of a + of b, B·H), 3 K/V stages at D = 64 and 2 at D = 128
// (3 spill there), one block per SM; dynamic shared memory (256 + STAGES·2·64)·(D+8)·2 bytes. V4: 4 warps × 32 rows = 128-row blocks, 3 stages
// at D = 64 (two blocks per SM), 2 at D = 128; (128 + STAGES·2·64)·(D+8)·2 bytes.
// The *_vfused entries read V with a token stride of 3·H·D (in place in a fused qkv projection):
// a compile-time stride, since a runtime one costs these 241–255-register kernels a spill.
ATTN_FWD_ENTRY(joint_attn_fwd_v3_d64, 256, 1, attn::fwd_v3<64, true, 8, 3, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_v3_d64_vfused, 256, 1, attn::fwd_v3<64, true, 8, 3, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_v3_d128, 256, 1, attn::fwd_v3<128, false, 8, 2, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_v3_d128_vfused, 256, 1, attn::fwd_v3<128, false, 8, 2, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_v4_d64, 128, 2, attn::fwd_v3<64, true, 4, 3, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_v4_d64_vfused, 128, 2, attn::fwd_v3<64, true, 4, 3, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_v4_d128, 128, 2, attn::fwd_v3<128, false, 4, 2, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_v4_d128_vfused, 128, 2, attn::fwd_v3<128, false, 4, 2, 3>)

// Drow[b, h, i] = Σ_c dO[i, c]·O[i, c] over the concatenated rows i of [a; b], and the row's
// dQ accumulator (same [B, L, H, D] layout as O) zeroed for the backward's reductions (in place of
// two memsets). Eight lanes per (batch, token, head) row, 32 rows per 256-thread block; rows
// enumerated (b, token, h) so that consecutive groups read consecutive memory. With `nlse` (else
// null), also nlse = −lse·log2 e per row: the exponent's offset as attention_hopper.cu's bwd_h3
// adds it, a multiply per query pair out of each of its consumers' tiles.
extern "C" __global__ void __launch_bounds__(256)
    joint_attn_bwd_rowdot(float* __restrict__ drow, float* __restrict__ dqa_acc, float* __restrict__ dqb_acc,
                          const bf16* __restrict__ oa, const bf16* __restrict__ ob,
                          const bf16* __restrict__ doa, const bf16* __restrict__ dob, int B, int La, int Lb,
                          int H, int D, const float* __restrict__ lse, float* __restrict__ nlse) {
    kernel_prologue();
    const int Lt = La + Lb;
    const long long rows = (long long)B * Lt * H;
    const long long R = (long long)blockIdx.x * (blockDim.x / 8) + threadIdx.x / 8;
    const int sub = threadIdx.x & 7;
    float sum = 0.f;
    int b = 0, tok = 0, h = 0;
    if (R < rows) {
        h = (int)(R % H);
        tok = (int)((R / H) % Lt);
        b = (int)(R / ((long long)H * Lt));
        const bool in_a = tok < La;
        const long long off = in_a ? attn::row_offset(b, La, tok, H, h, D) : attn::row_offset(b, Lb, tok - La, H, h, D);
        const bf16* o = (in_a ? oa : ob) + off;
        const bf16* d = (in_a ? doa : dob) + off;
        float* acc = (in_a ? dqa_acc : dqb_acc) + off;
        for (int c = sub; c < D / 4; c += 8)
            store_f4(acc + 4 * c, make_float4(0.f, 0.f, 0.f, 0.f));
        for (int c = sub; c < D / 8; c += 8) {
            float fo[8], fd[8];
            unpack_bf16x8(load16(o + 8 * c), fo);
            unpack_bf16x8(load16(d + 8 * c), fd);
#pragma unroll
            for (int k = 0; k < 8; k++) sum += fo[k] * fd[k];
        }
    }
    // Every lane takes part in the shuffles (groups of 8 never straddle a row boundary).
    sum += __shfl_xor_sync(FULL_MASK, sum, 4);
    sum += __shfl_xor_sync(FULL_MASK, sum, 2);
    sum += __shfl_xor_sync(FULL_MASK, sum, 1);
    if (R < rows && sub == 0) {
        const long long at = ((long long)b * H + h) * Lt + tok;
        drow[at] = sum;
        if (nlse != nullptr) nlse[at] = -lse[at] * attn::kLog2e;
    }
}

// The 8-warp variants: key tiles of 128 rows (grid: 128-row key tiles of a + of b, B·H), block
// 256, dynamic shared memory (2·128·(D+8) + 4·64·(D+8) + 128·72)·2 + 4·64·4 bytes. Half the dQ
// reductions and half the Q, dO traffic per key of 64-key tiles.
// The *_vfused entries read V and write dV with a token stride of 3·H·D (as the forward's).
ATTN_BWD_ENTRY(joint_attn_bwd_k128_d64, 2 * ATTN_THREADS, 1, attn::bwd<64, 8, 1>)
ATTN_BWD_ENTRY(joint_attn_bwd_k128_d64_vfused, 2 * ATTN_THREADS, 1, attn::bwd<64, 8, 3>)
ATTN_BWD_ENTRY(joint_attn_bwd_k128_d128, 2 * ATTN_THREADS, 1, attn::bwd<128, 8, 1>)
ATTN_BWD_ENTRY(joint_attn_bwd_k128_d128_vfused, 2 * ATTN_THREADS, 1, attn::bwd<128, 8, 3>)

// BwdVariant::V3 at D = 64: 4 warps × 32 keys (grid: 128-row key tiles of a + of b, B·H), block
// 128, the same dynamic shared memory as joint_attn_bwd_k128_d64. (D = 128 has no room for 32
// keys of dK, dV per warp; the Rust side runs K128 there.)
ATTN_BWD_ENTRY(joint_attn_bwd_v3_d64, ATTN_THREADS, 2, attn::bwd_v3<64, 4, 2, 1>)
ATTN_BWD_ENTRY(joint_attn_bwd_v3_d64_vfused, ATTN_THREADS, 2, attn::bwd_v3<64, 4, 2, 3>)

// dq = scale · acc for both streams (na, nb elements, multiples of 8): 8 elements per thread.
extern "C" __global__ void __launch_bounds__(256)
    joint_attn_dq_convert(bf16* __restrict__ dqa, bf16* __restrict__ dqb, const float* __restrict__ acc_a,
                          const float* __restrict__ acc_b, long long na, long long nb, float scale) {
    kernel_prologue();
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= na + nb) return;
    const bool in_a = i < na;
    const float* src = in_a ? acc_a + i : acc_b + (i - na);
    bf16* dst = in_a ? dqa + i : dqb + (i - na);
    const pack16 lo = load16(src), hi = load16(src + 4);
    float f[8];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        f[k] = bits_to_float(lo.w[k]) * scale;
        f[4 + k] = bits_to_float(hi.w[k]) * scale;
    }
    store16(dst, pack_bf16x8(f));
}

// ---- Fallback for other head dims (joint_attn_*_naive) ----------------------------------------
//
// Any head dim 1 ≤ D ≤ 256 that the tensor-core kernels above do not take (the tiny test models
// use 16 and 32; the Rust launcher sends every D other than 64 and 128 here). Same operands, the
// same results (o_a, o_b bf16; lse [B, H, La+Lb] f32 in natural log, rows ordered a then b;
// dQ, dK, dV bf16) and the same row term Drow = Σ_j P_ij·dP_ij; built for simplicity, not speed:
// no shared memory, no tensor cores, no atomics, no warp collectives, operands read straight from
// global memory (every thread of a warp reads the same other-side row: one broadcast load).
//
// One thread per row (query row, or key row for dK, dV) of the concatenation [a; b], 128 rows per
// block, grid (⌈(La+Lb)/128⌉, B·H); a thread whose row is past La+Lb returns. A thread keeps its
// accumulators as D floats in local memory (≤ 1 KiB each, L1-resident) and reads every operand,
// its own row's too, from global memory; a dot product runs over the columns in order, so every kernel forms the same score and dP bits
// for a pair. No collectives also keeps the emulator quick here: the tiny models' device tests
// spend most of their time in these kernels, and a warp collective costs the emulator 64 fiber
// switches. All arithmetic is f32; P and dS stay in f32 (the fast kernels round them to bf16 for
// the mma).
//
//   joint_attn_fwd_naive         per query row, one pass over all La+Lb keys with an online softmax
//                                in log2 units (s·c, c = scale·log2 e; eager rescale whenever the
//                                max grows), O = acc / l, lse = m·ln 2 + ln l
//   joint_attn_bwd_naive_drow    Drow = Σ_j P_ij·dP_ij per query row over all keys (the CPU
//                                kernel's row term; exact cancellation, see the kernel)
//   joint_attn_bwd_naive_dq      per query row, over all keys: p = 2^(s·c − lse·log2 e),
//                                dS = p·(dO·v − Drow), dQ = scale · Σ dS·k
//   joint_attn_bwd_naive_dkdv    per key row, over all queries: the same p and dS,
//                                dV = Σ p·dO, dK = scale · Σ dS·q
//
// Every row's reductions run in a fixed order: bitwise reproducible, dQ included.
#define ATTN_NAIVE_THREADS 128  // rows per block
#define ATTN_NAIVE_MAX_D 256

namespace attn {

// Element offset of row r of the concatenation [a; b] (batch b, head h) in its own stream's
// buffer (a for r < La, else b at r − La).
__device__ __forceinline__ long long naive_off(int b, int r, int La, int Lb, int H, int h, int D) {
    return r < La ? row_offset(b, La, r, H, h, D) : row_offset(b, Lb, r - La, H, h, D);
}

// Σ_c x[c]·p[c] of two bf16 rows, columns in order.
__device__ __forceinline__ float naive_dot(const bf16* __restrict__ x, const bf16* __restrict__ p, int D) {
    float s = 0.f;
    for (int c = 0; c < D; c++) s = fmaf(bf2f(x[c]), bf2f(p[c]), s);
    return s;
}

// acc += w · p.
__device__ __forceinline__ void naive_axpy(float* acc, float w, const bf16* __restrict__ p, int D) {
    for (int c = 0; c < D; c++) acc[c] = fmaf(w, bf2f(p[c]), acc[c]);
}

// p = f · acc, rounded to bf16.
__device__ __forceinline__ void naive_store(bf16* __restrict__ p, const float* acc, float f, int D) {
    for (int c = 0; c < D; c++) p[c] = f2bf(acc[c] * f);
}

// The thread's row of the concatenation (−1 past La+Lb) and its (batch, head).
struct NaiveRow {
    int row, b, h;
};
__device__ __forceinline__ NaiveRow naive_row(int La, int Lb, int H) {
    NaiveRow r;
    r.row = blockIdx.x * ATTN_NAIVE_THREADS + threadIdx.x;
    if (r.row >= La + Lb) r.row = -1;
    r.b = blockIdx.y / H;
    r.h = blockIdx.y % H;
    return r;
}

}  // namespace attn

extern "C" __global__ void __launch_bounds__(ATTN_NAIVE_THREADS)
    joint_attn_fwd_naive(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,
                         const bf16* __restrict__ qa, const bf16* __restrict__ ka, const bf16* __restrict__ va,
                         const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                         int La, int Lb, int H, int D, float scale_log2) {
    kernel_prologue();
    using namespace attn;
    const NaiveRow w = naive_row(La, Lb, H);
    if (w.row < 0) return;
    const int Lt = La + Lb, i = w.row;
    const long long qoff = naive_off(w.b, i, La, Lb, H, w.h, D);
    // (q as floats in local memory too: with q read from global memory ptxas spills here)
    float q[ATTN_NAIVE_MAX_D], acc[ATTN_NAIVE_MAX_D];
    for (int c = 0; c < D; c++) q[c] = bf2f(((i < La ? qa : qb) + qoff)[c]), acc[c] = 0.f;
    float m = -INFINITY, l = 0.f;  // running max (log2 units) and Σ 2^(s − m)
    for (int j = 0; j < Lt; j++) {
        const long long koff = naive_off(w.b, j, La, Lb, H, w.h, D);
        const bf16* k = (j < La ? ka : kb) + koff;
        float s = 0.f;
        for (int c = 0; c < D; c++) s = fmaf(q[c], bf2f(k[c]), s);  // naive_dot's order
        s *= scale_log2;
        if (s > m) {  // the first key: 2^−inf = 0
            const float alpha = fast_exp2(m - s);
            l *= alpha;
            for (int c = 0; c < D; c++) acc[c] *= alpha;
            m = s;
        }
        const float p = fast_exp2(s - m);
        l += p;
        naive_axpy(acc, p, (j < La ? va : vb) + koff, D);
    }
    naive_store((i < La ? oa : ob) + qoff, acc, 1.f / l, D);
    lse[(long long)blockIdx.y * Lt + i] = m * kLn2 + logf(l);
}

// Drow = Σ_j P_ij·dP_ij over all keys (not dO·O): exact in f32 from the same P and dP the dQ and
// dK kernels form, so Σ_j dS_ij cancels to f32 rounding. Gradients that vanish by that cancellation
// (a key bias, nearly uniform rows) then stay at their true size instead of O's bf16 rounding.
extern "C" __global__ void __launch_bounds__(ATTN_NAIVE_THREADS)
    joint_attn_bwd_naive_drow(float* __restrict__ drow, const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                              const bf16* __restrict__ va, const bf16* __restrict__ doa, const bf16* __restrict__ qb,
                              const bf16* __restrict__ kb, const bf16* __restrict__ vb, const bf16* __restrict__ dob,
                              const float* __restrict__ lse, int La, int Lb, int H, int D, float scale_log2) {
    kernel_prologue();
    using namespace attn;
    const NaiveRow w = naive_row(La, Lb, H);
    if (w.row < 0) return;
    const int Lt = La + Lb, i = w.row;
    const long long qoff = naive_off(w.b, i, La, Lb, H, w.h, D);
    const bf16* q = (i < La ? qa : qb) + qoff;
    const bf16* dout = (i < La ? doa : dob) + qoff;
    const long long r = (long long)blockIdx.y * Lt + i;
    const float lq = lse[r] * kLog2e;
    float s = 0.f;
    for (int j = 0; j < Lt; j++) {
        const long long koff = naive_off(w.b, j, La, Lb, H, w.h, D);
        const float score = naive_dot(q, (j < La ? ka : kb) + koff, D);
        const float dp = naive_dot(dout, (j < La ? va : vb) + koff, D);
        s = fmaf(fast_exp2(score * scale_log2 - lq), dp, s);
    }
    drow[r] = s;
}

extern "C" __global__ void __launch_bounds__(ATTN_NAIVE_THREADS)
    joint_attn_bwd_naive_dq(bf16* __restrict__ dqa, bf16* __restrict__ dqb, const bf16* __restrict__ qa,
                            const bf16* __restrict__ ka, const bf16* __restrict__ va, const bf16* __restrict__ doa,
                            const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                            const bf16* __restrict__ dob, const float* __restrict__ lse,
                            const float* __restrict__ drow, int La, int Lb, int H, int D, float scale_log2,
                            float scale) {
    kernel_prologue();
    using namespace attn;
    const NaiveRow w = naive_row(La, Lb, H);
    if (w.row < 0) return;
    const int Lt = La + Lb, i = w.row;
    const long long qoff = naive_off(w.b, i, La, Lb, H, w.h, D);
    const bf16* q = (i < La ? qa : qb) + qoff;
    const bf16* dout = (i < La ? doa : dob) + qoff;
    float acc[ATTN_NAIVE_MAX_D];
    for (int c = 0; c < D; c++) acc[c] = 0.f;
    const long long r = (long long)blockIdx.y * Lt + i;
    const float lq = lse[r] * kLog2e, dr = drow[r];
    for (int j = 0; j < Lt; j++) {
        const long long koff = naive_off(w.b, j, La, Lb, H, w.h, D);
        const bf16* k = (j < La ? ka : kb) + koff;
        const float p = fast_exp2(naive_dot(q, k, D) * scale_log2 - lq);
        const float dp = naive_dot(dout, (j < La ? va : vb) + koff, D);
        naive_axpy(acc, p * (dp - dr), k, D);
    }
    naive_store((i < La ? dqa : dqb) + qoff, acc, scale, D);
}

extern "C" __global__ void __launch_bounds__(ATTN_NAIVE_THREADS)
    joint_attn_bwd_naive_dkdv(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,
                              bf16* __restrict__ dvb, const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                              const bf16* __restrict__ va, const bf16* __restrict__ doa,
                              const bf16* __restrict__ qb, const bf16* __restrict__ kb,
                              const bf16* __restrict__ vb, const bf16* __restrict__ dob,
                              const float* __restrict__ lse, const float* __restrict__ drow, int La, int Lb, int H,
                              int D, float scale_log2, float scale) {
    kernel_prologue();
    using namespace attn;
    const NaiveRow w = naive_row(La, Lb, H);
    if (w.row < 0) return;
    const int Lt = La + Lb, j = w.row;
    const long long koff = naive_off(w.b, j, La, Lb, H, w.h, D);
    const bf16* k = (j < La ? ka : kb) + koff;
    const bf16* v = (j < La ? va : vb) + koff;
    float dk[ATTN_NAIVE_MAX_D], dv[ATTN_NAIVE_MAX_D];
    for (int c = 0; c < D; c++) dk[c] = dv[c] = 0.f;
    const float* lrow = lse + (long long)blockIdx.y * Lt;
    const float* drow_bh = drow + (long long)blockIdx.y * Lt;
    for (int i = 0; i < Lt; i++) {
        const long long qoff = naive_off(w.b, i, La, Lb, H, w.h, D);
        const bf16* q = (i < La ? qa : qb) + qoff;
        const bf16* dout = (i < La ? doa : dob) + qoff;
        const float p = fast_exp2(naive_dot(k, q, D) * scale_log2 - lrow[i] * kLog2e);
        const float dp = naive_dot(v, dout, D);
        naive_axpy(dv, p, dout, D);
        naive_axpy(dk, p * (dp - drow_bh[i]), q, D);
    }
    naive_store((j < La ? dka : dkb) + koff, dk, scale, D);
    naive_store((j < La ? dva : dvb) + koff, dv, 1.f, D);
}

// poly_exp2 (attention_common.cuh, FwdVariant::H4 and H6) on n values, for its accuracy test.
extern "C" __global__ void __launch_bounds__(256)
    poly_exp2_probe(float* __restrict__ y, const float* __restrict__ x, int n) {
    kernel_prologue();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = attn::poly_exp2(x[i]);
}
