// advdmd-arch: 90a
//
// Joint attention on Hopper's warpgroup MMA: the same operands, results and lse as attention.cu
// (its top comment describes them), with every product on wgmma (common.cuh) instead of
// mma.sync. CPU twin: src/kernels/attention.rs.
//
//   joint_attn_fwd_h{1..12}_d{64,128}[_vfused]  O (two buffers) and lse [B, H, La+Lb]
//   joint_attn_fwd_h{13,14}_d{64,128},          (FwdVariant::H1 … H15; H4–H6, H8–H10 at d = 64,
//   joint_attn_fwd_h15_d128                     H15 at 128; the maps carry V's stride: no _vfused)
//   joint_attn_bwd_h{1,2}_d{64,128}[_vfused],   dK, dV (bf16) per 128-key tile, dQ into the f32
//   joint_attn_bwd_h{3..11}_d64[_vfused],       accumulators (BwdVariant::H1 … H14; the section
//   joint_attn_bwd_h{12..14}_d128[_vfused]      "Backward" below)
//
// Forward:
// A block is NWG warpgroups of 64 query rows (warp w of a group owns rows 16w..16w+15); the key
// and value tiles of KN rows stream through a STAGES-deep cp.async pipeline shared by the groups.
// Every tile (Q, K, V) is stored as 128-byte rows of 64 columns, a row's 16-byte chunks swizzled
// by the row's index mod 8 (the 128-byte swizzle of the wgmma descriptors), a D = 128 row split
// into two such halves, each half a block of its own: so Q and K are the K-major operands of
// S = Q·Kᵀ and V the MN-major B operand of O += P·V with no transposition anywhere. Per key tile:
// S (64 × KN per group, f32 in registers) by D/16 wgmma; the lazy-rescaled online softmax of
// attention.cu's fwd_v3 on S's fragments; P rounded to bf16 in registers as the A operand of
// KN/16 register-sourced wgmma into O. H1 waits for each product before the next; H2 overlaps
// one tile's P·V with the next tile's softmax; H3 adds FlashAttention-3's warp specialization
// and ping-pong scheduling (fwd_h3's comment); H7–H9 let its producer run ahead of its copies
// (cp_async_mbar_arrive) in fewer stages; H11, H12 take P speculatively (softmax_to_p_spec);
// H13's producer is one thread issuing TMA bulk tensor copies (fwd_tma_producer), H14 both.
#include "attention_common.cuh"

namespace attn_h {
using namespace attn;

// Byte offset of 16-byte chunk c (of D/8) of row r in a swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ uint32_t chunk_offset(int r, int c) {
    return (uint32_t)((c / 8) * ROWS * 128 + r * 128 + ((c % 8) ^ (r & 7)) * 16);
}

// `rows` token rows from `g` (row stride `ld` elements) into a swizzled tile of ROWS rows, by NT
// threads with cp.async; rows past `rows` are zero-filled (rows ≥ 1). Thread x copies 16-byte
// chunk c = x mod CH of rows x / CH, x / CH + NT/CH, …: where NT/CH is a multiple of 8, the
// chunk's swizzle (c ^ row mod 8) is the same in all its rows, so a full tile's copy k is the
// first's addresses plus k·NT/CH rows — an add or two a copy, where clamping each row and
// predicating its zero-fill took ~19 instructions (the producers' SASS: 302 a 128-key tile of K
// and V, beside the consumers' ~520). A partial tile clamps and zero-fills as before. ROLLED keeps
// the loop rolled: a few registers, for a producer left 32–40 by setmaxnreg. TIGHT: one rolled
// loop clamping every row, for the backward's 24-register producer (the two paths spilled it).
template <int D, int ROWS, int NT, bool ROLLED, bool TIGHT = false>
__device__ __forceinline__ void load_tile_sw_by(unsigned char* s, const bf16* __restrict__ g, long long ld, int rows) {
    constexpr int CH = D / 8, RSTEP = NT / CH;
    static_assert(ROWS * CH % NT == 0, "tile copy must divide evenly");
    if constexpr (D == 128 && RSTEP % 8 != 0 && (NT / 8) % 8 == 0) {
        // NT/16 rows a step (64 threads: 4) would change a thread's chunk swizzle from copy to
        // copy (clamped and recomputed each time: ~35 instructions a copy in the backward's
        // loader at D = 128); each 64-column half-tile by the D = 64 path steps 8 rows instead
        load_tile_sw_by<64, ROWS, NT, ROLLED, TIGHT>(s, g, ld, rows);
        load_tile_sw_by<64, ROWS, NT, ROLLED, TIGHT>(s + ROWS * 128, g + 64, ld, rows);
    } else if constexpr (!TIGHT && NT % CH == 0 && RSTEP % 8 == 0) {
        constexpr int N = ROWS / RSTEP;
        const int c = threadIdx.x % CH, r0 = threadIdx.x / CH;
        unsigned char* dst = s + chunk_offset<ROWS>(r0, c);
        if (rows >= ROWS) {
            if constexpr (ROLLED) {
                // 32-bit element offsets from g (a tile spans < 2^32 elements): fewer registers
                // than a running 64-bit pointer and step
                const uint32_t off0 = (uint32_t)(r0 * ld) + c * 8, step = (uint32_t)(RSTEP * ld);
#pragma unroll 1
                for (int k = 0; k < N; k++) cp_async_16(dst + k * RSTEP * 128, g + (off0 + k * step));
            } else {
                const bf16* src = g + r0 * ld + c * 8;
#pragma unroll
                for (int k = 0; k < N; k++) cp_async_16(dst + k * RSTEP * 128, src + k * RSTEP * ld);
            }
        } else {
#pragma unroll 1
            for (int k = 0; k < N; k++) {
                const int r = r0 + k * RSTEP;
                cp_async_16_zfill(dst + k * RSTEP * 128, g + min(r, rows - 1) * ld + c * 8, r < rows);
            }
        }
    } else if constexpr (NT % CH == 0 && RSTEP % 8 == 0) {
        // TIGHT: one loop for every tile, 32-bit element offsets stepped by NT/CH rows; a row
        // past `rows` zero-fills from row 0's address (rows ≥ 1)
        const int c = threadIdx.x % CH, r0 = threadIdx.x / CH;
        unsigned char* dst = s + chunk_offset<ROWS>(r0, c);
        const uint32_t step = (uint32_t)(RSTEP * ld);
        uint32_t off = (uint32_t)(r0 * ld) + c * 8;
#pragma unroll 2
        for (int k = 0; k < ROWS / RSTEP; k++, off += step) {
            const bool ok = r0 + k * RSTEP < rows;
            cp_async_16_zfill(dst + k * RSTEP * 128, g + (ok ? off : (uint32_t)(c * 8)), ok);
        }
    } else {
#pragma unroll 1
        for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
            const int r = i / CH, c = i % CH;
            cp_async_16_zfill(s + chunk_offset<ROWS>(r, c), g + min(r, rows - 1) * ld + c * 8, r < rows);
        }
    }
}
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile_sw(unsigned char* s, const bf16* __restrict__ g, long long ld, int rows) {
    load_tile_sw_by<D, ROWS, NT, false>(s, g, ld, rows);
}
template <int D, int ROWS, int NT, bool TIGHT = false>
__device__ __forceinline__ void load_tile_sw_lean(unsigned char* s, const bf16* __restrict__ g, long long ld,
                                                  int rows) {
    load_tile_sw_by<D, ROWS, NT, true, TIGHT>(s, g, ld, rows);
}

// A producer thread's hand-over of tile i of its loop (its copies into the stage that `full`
// guards just issued). ASYNC: the tile hands itself over — the copies arrive on `full` when they
// land (cp_async_mbar_arrive) and, with STORES, the thread's plain stores by an ordinary arrive.
// Otherwise the copies form a group, and tile i − LAG (−1: the one loaded before the loop) is
// published (publish(j): fence, arrive) once its group has landed; tiles_done publishes the last
// LAG after the loop's n tiles.
template <bool ASYNC, int LAG, bool STORES = false, class Publish>
__device__ __forceinline__ void tile_issued(int i, uint64_t* full, Publish&& publish) {
    if constexpr (ASYNC) {
        cp_async_mbar_arrive(full);
        if constexpr (STORES) mbar_arrive(full);
    } else {
        cp_async_commit();
        if (i - LAG >= -1) {
            cp_async_wait<LAG>();
            publish(i - LAG);
        }
    }
}
template <bool ASYNC, int LAG, class Publish>
__device__ __forceinline__ void tiles_done(int n, Publish&& publish) {
    if constexpr (!ASYNC) {
        cp_async_wait<0>();
        for (int j = max(-1, n - LAG); j < n; j++) publish(j);
    }
}

// Key tile i (of KN rows, streams a then b) of K and V into the swizzled tiles sK, sV by NT
// threads, asynchronously (the caller commits). LEAN: load_tile_sw_lean's rolled copies.
template <int D, int KN, int NT, int VMUL, bool LEAN = false>
__device__ __forceinline__ void load_kv_tile(unsigned char* sK, unsigned char* sV, int i, const bf16* __restrict__ ka,
                                             const bf16* __restrict__ va, const bf16* __restrict__ kb,
                                             const bf16* __restrict__ vb, int La, int Lb, int b, int H, int h) {
    const Tile kt = tile_of<KN>(i, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long ld = (long long)H * D, k_off = row_offset(b, Lk, kt.row0, H, h, D);
    const bf16* k = (kt.stream == 0 ? ka : kb) + k_off;
    const bf16* v = (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld);
    if constexpr (LEAN) {
        load_tile_sw_lean<D, KN, NT>(sK, k, ld, kt.rows);
        load_tile_sw_lean<D, KN, NT>(sV, v, VMUL * ld, kt.rows);
    } else {
        load_tile_sw<D, KN, NT>(sK, k, ld, kt.rows);
        load_tile_sw<D, KN, NT>(sV, v, VMUL * ld, kt.rows);
    }
}

// S (64 query rows × KN keys) = Q·Kᵀ over D: this group's Q rows at `q_rows` (a QT-row tile),
// the key tile at `k_rows`, both K-major.
template <int D, int KN, int QT>
__device__ __forceinline__ void fwd_issue_s(float (&s)[KN / 2], uint32_t q_rows, uint32_t k_rows) {
    const uint32_t q_lo = wgmma_desc_lo(q_rows, 16), k_lo = wgmma_desc_lo(k_rows, 16);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        wgmma_ss<KN, 0, 0>(s, wgmma_desc_step(q_lo, (kk / 4) * QT * 128 + (kk % 4) * 32, 1024, kSwizzle128),
                           wgmma_desc_step(k_lo, (kk / 4) * KN * 128 + (kk % 4) * 32, 1024, kSwizzle128), kk > 0);
}

// O += P·V: KN/16 steps of k16 over the keys, P from registers, V's rows 16c.. MN-major (the D = 128
// halves KN·128 bytes apart: the descriptor's leading-dimension offset).
template <int D, int KN>
__device__ __forceinline__ void fwd_issue_pv(float* o, const uint32_t (&p)[KN / 16][4], uint32_t v_rows) {
    const uint32_t v_lo = wgmma_desc_lo(v_rows, KN * 128);
#pragma unroll
    for (int c = 0; c < KN / 16; c++)
        wgmma_rs<D, 1>(o, p[c], wgmma_desc_step(v_lo, c * 16 * 128, 1024, kSwizzle128), 1);
}

// S's keys ≥ krows (past a partial tile's end) to −∞: column 8j + 2t + (e & 1) of fragment 4j + e.
template <int KN>
__device__ __forceinline__ void mask_keys(float (&s)[KN / 2], int krows, int t) {
    if (krows < KN) {
#pragma unroll
        for (int j = 0; j < KN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (8 * j + 2 * t + (e & 1) >= krows) s[4 * j + e] = -INFINITY;
    }
}

// The row maxima of this thread's two rows (fragments 4j + {0, 1} and 4j + {2, 3}) over the quad.
template <int KN>
__device__ __forceinline__ void row_max(const float (&s)[KN / 2], float (&mx)[2]) {
    mx[0] = s[0];
    mx[1] = s[2];
#pragma unroll
    for (int j = 0; j < KN / 8; j++) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
    }
}

// The lazy rescale's move: each row's reference to its maximum where that is higher, alpha the
// factor O (and, with SUMS, l here) moves by.
template <bool SUMS>
__device__ __forceinline__ void move_reference(const float (&mx)[2], float (&alpha)[2], float (&ms)[2], float (&l)[2],
                                               float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const float mn = fmaxf(ms[r], mx[r] * scale_log2);
        alpha[r] = fast_exp2(ms[r] - mn);
        ms[r] = mn;
        if constexpr (SUMS) l[r] *= alpha[r];
    }
}

// Tile i's online softmax on S's accumulator fragments (rows g and g + 8 of this warp, as in
// attention.cu's fwd_v3): keys ≥ krows masked, the reference maximum moved lazily (l rescaled
// here; O's factor returned in alpha, for rescale_o once no product writes O any more), the row
// sums added to l, P's values left in s (pack_p rounds them for the P·V wgmma). No wgmma wait in
// here: a wait is `.aligned` (the whole warpgroup executes it or the behaviour is undefined), and
// whether the maximum moves differs from warp to warp.
// POLY > 0: every POLY-th group of 4 scores (j ≡ POLY − 1 mod POLY) takes its exponentials from
// poly_exp2 on the FMA pipes instead of the special-function unit (FwdVariant::H4: POLY = 4).
// SUMS = false (fwd_h3's ROWSUM): l is neither rescaled nor added to; the tensor cores sum P.
// EXP = false (FwdAblation::NoExponentials, a bench cut): P = |max(x, −126)| of the exponent x, an
// FMNMX (the magnitude folds into its users) where the exponential was: positive and finite.
template <int D, int KN, int POLY = 0, bool SUMS = true, bool EXP = true>
__device__ __forceinline__ void softmax_exps(float (&s)[KN / 2], float (&alpha)[2], float (&ms)[2], float (&l)[2],
                                             int krows, int t, float scale_log2) {
    mask_keys<KN>(s, krows, t);
    float mx[2];
    row_max<KN>(s, mx);
    bool need = false;
#pragma unroll
    for (int r = 0; r < 2; r++) need |= fmaf(mx[r], scale_log2, -ms[r]) > kLazyLog2;
    alpha[0] = alpha[1] = 1.f;
    if (__any_sync(FULL_MASK, need)) move_reference<SUMS>(mx, alpha, ms, l, scale_log2);  // warp-uniform
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < KN / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float x = fmaf(s[4 * j + e], scale_log2, -ms[e >> 1]);
            float p;
            if constexpr (EXP)
                p = POLY > 0 && j % POLY == POLY - 1 ? poly_exp2(x) : fast_exp2(x);
            else
                p = fabsf(fmaxf(x, -126.f));
            s[4 * j + e] = p;
            if constexpr (SUMS) rs[e >> 1] += p;
        }
    if constexpr (SUMS) {
        l[0] += rs[0];
        l[1] += rs[1];
    }
}

// P (softmax_exps' values in s) rounded to bf16 into the A fragments of the P·V wgmma.
template <int KN>
__device__ __forceinline__ void pack_p(const float (&s)[KN / 2], uint32_t (&pa)[KN / 16][4]) {
#pragma unroll
    for (int c = 0; c < KN / 16; c++) {
        pa[c][0] = pack_bf16x2(s[8 * c], s[8 * c + 1]);
        pa[c][1] = pack_bf16x2(s[8 * c + 2], s[8 * c + 3]);
        pa[c][2] = pack_bf16x2(s[8 * c + 4], s[8 * c + 5]);
        pa[c][3] = pack_bf16x2(s[8 * c + 6], s[8 * c + 7]);
    }
}

// Tile i's softmax with P packed at once (the caller's P registers are free: two P sets).
template <int D, int KN, int POLY = 0, bool SUMS = true, bool EXP = true>
__device__ __forceinline__ void softmax_to_p(float (&s)[KN / 2], float (&alpha)[2], float (&ms)[2], float (&l)[2],
                                             uint32_t (&pa)[KN / 16][4], int krows, int t, float scale_log2) {
    softmax_exps<D, KN, POLY, SUMS, EXP>(s, alpha, ms, l, krows, t, scale_log2);
    pack_p<KN>(s, pa);
}

// softmax_to_p with the exponentials taken speculatively (fwd_h3's SPEC, FwdVariant::H11): P
// against the reference maximum as it stands, while the row maxima reduce beside them — the
// exponentials and sums need only the reference, which the lazy rescale moves rarely (first at
// a unit's first tile, where it is −∞). Where a row's maximum has passed it by 2^kLazyLog2 the
// warp rescales as softmax_exps does and takes P again from the scores, kept for that. So the
// exponentials (the special-function unit's 8 cycles a warp instruction) no longer wait for
// the maximum's chain (64 half-rate FMNMX, two shuffle rounds, a vote: ~220 of a warp's ~1100
// cycles a 64 × 128 tile by tools/sass-stats.sh --cycles), and P is bit for bit softmax_to_p's.
// BOUND (FwdVariant::H12): no maximum at all unless the warp rescales. The lazy rule's purpose
// is that no P exceeds 2^kLazyLog2; a thread's partial row sum bounds each of its P, so the test
// is that sum ≤ 2^kLazyLog2 (false for the ∞ and NaN of a first tile), and only a rescale
// reduces the maximum it moves to. A sum can pass the bound with no P past it (many P near
// it): a rescale not strictly needed, after which the reference is the row's maximum again.
// P then differs from softmax_to_p's where the references differ (the same softmax, other
// roundings); the 64 FMNMX and the shuffles leave the tile's common path.
template <int D, int KN, int POLY = 0, bool SUMS = true, bool BOUND = false>
__device__ __forceinline__ void softmax_to_p_spec(float (&s)[KN / 2], float (&alpha)[2], float (&ms)[2],
                                                  float (&l)[2], uint32_t (&pa)[KN / 16][4], int krows, int t,
                                                  float scale_log2) {
    mask_keys<KN>(s, krows, t);
    alpha[0] = alpha[1] = 1.f;
    float rs[2];
    auto take_p = [&]() {
        rs[0] = rs[1] = 0.f;
#pragma unroll
        for (int j = 0; j < KN / 8; j++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = fmaf(s[4 * j + e], scale_log2, -ms[e >> 1]);
                p[e] = POLY > 0 && j % POLY == POLY - 1 ? poly_exp2(x) : fast_exp2(x);
                if constexpr (SUMS) rs[e >> 1] += p[e];
            }
            pa[j / 2][2 * (j % 2)] = pack_bf16x2(p[0], p[1]);
            pa[j / 2][2 * (j % 2) + 1] = pack_bf16x2(p[2], p[3]);
        }
    };
    float mx[2];
    static_assert(!BOUND || SUMS, "the bound is on the row sums");
    take_p();  // against the reference as it stands
    bool need = false;
    if constexpr (BOUND) {
        constexpr float kBound = 1 << (int)kLazyLog2;
        need = !(rs[0] <= kBound) || !(rs[1] <= kBound);
    } else {
        row_max<KN>(s, mx);
#pragma unroll
        for (int r = 0; r < 2; r++) need |= fmaf(mx[r], scale_log2, -ms[r]) > kLazyLog2;
    }
    if (__any_sync(FULL_MASK, need)) {  // warp-uniform, rare: P again against the moved reference
        if constexpr (BOUND) row_max<KN>(s, mx);
        move_reference<SUMS>(mx, alpha, ms, l, scale_log2);
        take_p();
    }
    if constexpr (SUMS) {
        l[0] += rs[0];
        l[1] += rs[1];
    }
}

// O's rows moved to softmax_to_p's new maximum (call once every product writing O is complete;
// warp-uniform skip when the maximum stayed).
template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], const float (&alpha)[2]) {
    if (!__any_sync(FULL_MASK, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[4 * j + 2 * r] *= alpha[r];
            o[4 * j + 2 * r + 1] *= alpha[r];
        }
}

// Row sums of P on the tensor cores (fwd_h3's ROWSUM): lsum (+)= P·1 over KN/16 steps of k16, B a
// 16 × 8 block of bf16 ones in shared memory (every step reads the same 256 bytes). lsum is an
// m64n8 accumulator: this thread's rows g and g + 8 in [0, 1] and [2, 3], every column the sum.
template <int KN>
__device__ __forceinline__ void fwd_issue_rowsum(float (&lsum)[4], const uint32_t (&p)[KN / 16][4], uint64_t ones) {
#pragma unroll
    for (int c = 0; c < KN / 16; c++) wgmma_rs<8, 0>(lsum, p[c], ones, 1);
}

// The 256 bytes of bf16 ones fwd_issue_rowsum reads, and their descriptor (no swizzle: 8-row core
// matrices of 16-byte rows, the second k8 half 128 bytes on).
__device__ __forceinline__ uint64_t ones_desc(const unsigned char* ones) {
    return wgmma_desc(smem_addr(ones), 128, 256, kSwizzleNone);
}

// lsum moved to the new maximum with O (rescale_o's alpha, the same warp-uniform skip).
__device__ __forceinline__ void rescale_sum(float (&lsum)[4], const float (&alpha)[2]) {
    if (!__any_sync(FULL_MASK, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int e = 0; e < 4; e++) lsum[e] *= alpha[e >> 1];
}

__device__ __forceinline__ void store_pair(bf16* p, float a, float b) {
    *reinterpret_cast<uint32_t*>(p) = pack_bf16x2(a, b);
}
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// The epilogue: this thread's rows row0 and row0 + 8 (of the block's `rows` valid ones) get their
// lse (from the quad-summed l) and O / l (bf16; f32 for a split unit's piece).
template <int D, typename T>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], const float (&ms)[2], float (&l)[2], float* lrow,
                                           T* out, long long ld, int row0, int rows, int t) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + 8 * r;
        if (row >= rows) continue;
        if (t == 0) lrow[row] = ms[r] * kLn2 + logf(l[r]);
        const float f = 1.f / l[r];
        T* dst = out + row * ld + 2 * t;
#pragma unroll
        for (int j = 0; j < D / 8; j++) store_pair(dst + 8 * j, o[4 * j + 2 * r] * f, o[4 * j + 2 * r + 1] * f);
    }
}

template <int D, int NWG, int KN, int STAGES, int VMUL>
__device__ __forceinline__ void fwd_h1(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,
                                       const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                                       const bf16* __restrict__ va, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb, int La, int Lb,
                                       int H, float scale_log2) {
    constexpr int QT = 64 * NWG, NT = 128 * NWG;
    constexpr int QBYTES = QT * D * 2, KVBYTES = KN * D * 2;
    static_assert(STAGES >= 2, "at least double buffering");
    DYNAMIC_SMEM(unsigned char, raw);
    // Swizzled tiles start on a 1 KB boundary of the shared address space (the launcher adds 1 KB).
    unsigned char* sQ = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sK0 = sQ + QBYTES;
    unsigned char* sV0 = sK0 + STAGES * KVBYTES;

    const int tid = threadIdx.x, wg = tid / 128, w = (tid / 32) % 4, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;

    const Tile qt = tile_of<QT>(blockIdx.x, La, Lb);
    const int Lq = qt.stream == 0 ? La : Lb;
    const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);

    auto issue_kv = [&](int i, int st) {
        load_kv_tile<D, KN, NT, VMUL>(sK0 + st * KVBYTES, sV0 + st * KVBYTES, i, ka, va, kb, vb, La, Lb, b, H, h);
    };

    const int nkt = ntiles<KN>(La) + ntiles<KN>(Lb);
    // Prologue as in fwd_v3: group 0 = Q and key tile 0, then tiles 1..STAGES−2 (empty groups
    // committed too, so the wait counts stay fixed).
    load_tile_sw<D, QT, NT>(sQ, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
    issue_kv(0, 0);
    cp_async_commit();
#pragma unroll
    for (int s = 1; s < STAGES - 1; s++) {
        if (s < nkt) issue_kv(s, s);
        cp_async_commit();
    }

    // Descriptor bases: this group's 64 Q rows (8-row groups 1 KB apart, 32 bytes per k16 step
    // inside a 128-byte half, halves QT·128 bytes apart), and K, V of stage 0.
    const uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128, k_addr = smem_addr(sK0), v_addr = smem_addr(sV0);

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    // Rows g (r = 0) and g + 8 (r = 1) of this warp: reference max in exponent units, row sums.
    float ms[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    int st = 0;
    for (int kt_i = 0; kt_i < nkt; kt_i++) {
        {
            const int nx = kt_i + STAGES - 1;
            int nst = st + STAGES - 1;
            if (nst >= STAGES) nst -= STAGES;
            if (nx < nkt) issue_kv(nx, nst);
        }
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        // cp.async wrote through the generic proxy; wgmma reads through the async one.
        fence_proxy_async();
        __syncthreads();
        const int krows = min(KN, kt_i < ntiles<KN>(La) ? La - kt_i * KN : Lb - (kt_i - ntiles<KN>(La)) * KN);
        const uint32_t k_st = k_addr + st * KVBYTES, v_st = v_addr + st * KVBYTES;

        float s[KN / 2];
        wgmma_fence();
        fwd_issue_s<D, KN, QT>(s, q_addr, k_st);
        wgmma_commit();
        wgmma_wait<0>();

        uint32_t pa[KN / 16][4];
        float alpha[2];
        softmax_to_p<D, KN>(s, alpha, ms, l, pa, krows, t, scale_log2);
        rescale_o<D>(o, alpha);  // the previous P·V was waited for at the end of its step
        wgmma_fence();
        fwd_issue_pv<D, KN>(o, pa, v_st);
        wgmma_commit();
        wgmma_wait<0>();
        __syncthreads();  // every group is done with this stage before it is refilled
        if (++st == STAGES) st = 0;
    }
    cp_async_wait<0>();

    const int row0 = 64 * wg + 16 * w + g;  // this thread's rows: row0 and row0 + 8
    store_rows<D>(o, ms, l, lse + (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0,
                  (qt.stream == 0 ? oa : ob) + q_off, ld, row0, qt.rows, t);
}

// FwdVariant::H2: fwd_h1 with the product of one tile overlapping the softmax of the next
// (FlashAttention-3's intra-warpgroup pipelining). Iteration i issues S_i = Q·K_iᵀ and then
// O += P_{i−1}·V_{i−1}, waits for S_i alone (wgmma groups complete in order), and runs tile i's
// softmax while the tensor cores still work on P_{i−1}·V_{i−1}; P alternates between two register
// sets (the loop body is written twice) because P_{i−1} is being read while P_i is written. O is
// touched only after waiting for every product: on the (lazy, rare) rescale, and at the end.
// Loads: tile i+1 is fetched into stage (i+1) mod 3 at the top of iteration i, after the barrier
// that proves P_{i−2}·V_{i−2} (the stage's last reader) complete.
template <int D, int KN>
struct H2Regs {
    float o[D / 2];
    float ms[2], l[2];
};

template <int D, int NWG, int KN, int VMUL>
__device__ __forceinline__ void fwd_h2(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,
                                       const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                                       const bf16* __restrict__ va, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb, int La, int Lb,
                                       int H, float scale_log2) {
    constexpr int STAGES = 3;
    constexpr int QT = 64 * NWG, NT = 128 * NWG;
    constexpr int QBYTES = QT * D * 2, KVBYTES = KN * D * 2;
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* sQ = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sK0 = sQ + QBYTES;
    unsigned char* sV0 = sK0 + STAGES * KVBYTES;

    const int tid = threadIdx.x, wg = tid / 128, w = (tid / 32) % 4, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;

    const Tile qt = tile_of<QT>(blockIdx.x, La, Lb);
    const int Lq = qt.stream == 0 ? La : Lb;
    const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);

    auto issue_kv = [&](int i, int st) {
        load_kv_tile<D, KN, NT, VMUL>(sK0 + st * KVBYTES, sV0 + st * KVBYTES, i, ka, va, kb, vb, La, Lb, b, H, h);
    };

    const int nkt = ntiles<KN>(La) + ntiles<KN>(Lb);
    load_tile_sw<D, QT, NT>(sQ, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
    issue_kv(0, 0);
    cp_async_commit();

    const uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128, k_addr = smem_addr(sK0), v_addr = smem_addr(sV0);
    H2Regs<D, KN> R;
#pragma unroll
    for (int i = 0; i < D / 2; i++) R.o[i] = 0.f;
    R.ms[0] = R.ms[1] = -INFINITY;
    R.l[0] = R.l[1] = 0.f;
    uint32_t p0[KN / 16][4], p1[KN / 16][4];

    // One iteration: tile i (stage i mod 3); `pv` = P_{i−1} (read by the product issued here),
    // `pn` = P_i (written here).
    // i == nkt drains: only the last tile's product.
    auto step = [&](int i, const uint32_t (&pv)[KN / 16][4], uint32_t (&pn)[KN / 16][4]) {
        if (i == nkt) {
            const uint32_t v_last = v_addr + ((i - 1) % STAGES) * KVBYTES;
            wgmma_fence();
            fwd_issue_pv<D, KN>(R.o, pv, v_last);
            wgmma_commit();
            wgmma_wait<0>();
            return;
        }
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (i + 1 < nkt) issue_kv(i + 1, (i + 1) % STAGES);
        cp_async_commit();
        const int st = i % STAGES, sp = (i + STAGES - 1) % STAGES;
        const int krows = min(KN, i < ntiles<KN>(La) ? La - i * KN : Lb - (i - ntiles<KN>(La)) * KN);
        const uint32_t k_st = k_addr + st * KVBYTES, v_prev = v_addr + sp * KVBYTES;

        float s[KN / 2];
        wgmma_fence();
        fwd_issue_s<D, KN, QT>(s, q_addr, k_st);
        wgmma_commit();
        if (i > 0) fwd_issue_pv<D, KN>(R.o, pv, v_prev);
        wgmma_commit();
        wgmma_wait<1>();  // S_i complete; P_{i−1}·V_{i−1} may still run

        float alpha[2];
        softmax_to_p<D, KN>(s, alpha, R.ms, R.l, pn, krows, t, scale_log2);
        wgmma_wait<0>();  // P_{i−1}·V_{i−1} complete: its stage may be refilled after the next barrier
        rescale_o<D>(R.o, alpha);
    };

    for (int i = 0; i <= nkt; i += 2) {
        step(i, p1, p0);
        if (i + 1 <= nkt) step(i + 1, p0, p1);
    }
    cp_async_wait<0>();

    const int row0 = 64 * wg + 16 * w + g;  // this thread's rows: row0 and row0 + 8
    store_rows<D>(R.o, R.ms, R.l, lse + (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0,
                  (qt.stream == 0 ? oa : ob) + q_off, ld, row0, qt.rows, t);
}


// A block of a split pass (fwd_h3: units of QT query rows over key tiles of KN; bwd_h3: units of
// KT keys over query tiles of 64): its unit (b·H + h, tile of UT rows), the tiles of TT rows it
// loops over, and its slot in the partial outputs (−1: the unit is whole). Units before
// `split_from` are one block each; every later unit is `splits` consecutive blocks, piece p
// taking tiles [p·n/splits, (p + 1)·n/splits) of the n over both streams (each piece ≥ 1 tile:
// splits ≤ n).
struct SplitPiece {
    int bh, tile, k0, nkt, slot;
};
template <int UT, int TT>
__device__ __forceinline__ SplitPiece split_piece(int block, int split_from, int splits, int La, int Lb) {
    const int tiles = ntiles<UT>(La) + ntiles<UT>(Lb), n = ntiles<TT>(La) + ntiles<TT>(Lb);
    SplitPiece r;
    int unit = block, piece = 0, ways = 1;
    r.slot = -1;
    if (block >= split_from) {
        r.slot = block - split_from;
        unit = split_from + r.slot / splits;
        piece = r.slot % splits;
        ways = splits;
    }
    r.bh = unit / tiles;
    r.tile = unit % tiles;
    r.k0 = piece * n / ways;
    r.nkt = (piece + 1) * n / ways - r.k0;
    return r;
}

// The split forward's partial outputs: slot s holds QT rows of O/l (f32, D columns) and then
// their QT lse values; rows past the tile's `rows` are left unwritten (the combine skips them).
template <int D, int QT>
__device__ __forceinline__ float* piece_slot(float* opart, int slot) {
    return opart + (long long)slot * QT * (D + 1);
}

// store_rows for a piece of a split unit: this thread's rows row0 and row0 + 8 as O/l in f32 and
// their lse, into its slot.
template <int D, int QT>
__device__ __forceinline__ void fwd_store_piece(const float (&o)[D / 2], const float (&ms)[2], float (&l)[2],
                                                float* __restrict__ opart, int slot, int row0, int rows, int t) {
    float* dst = piece_slot<D, QT>(opart, slot);
    store_rows<D>(o, ms, l, dst + QT * D, dst, D, row0, rows, t);
}

// O and lse of the split units from their pieces: lse = log Σ_p e^{lse_p}, O = Σ_p e^{lse_p − lse}·O_p
// (each O_p normalised by its own sum). Unit split_from + blockIdx.x; a thread per 8 columns of
// a row, rows strided by the block. grid: units split, block: 256.
template <int D, int QT>
__device__ __forceinline__ void fwd_split_combine(bf16* __restrict__ oa, bf16* __restrict__ ob,
                                                  float* __restrict__ lse, const float* __restrict__ opart,
                                                  int La, int Lb, int H, int split_from, int splits) {
    constexpr int CH = D / 8;
    const int tiles = ntiles<QT>(La) + ntiles<QT>(Lb);
    const int unit = split_from + blockIdx.x, bh = unit / tiles, b = bh / H, h = bh % H;
    const Tile qt = tile_of<QT>(unit % tiles, La, Lb);
    const int Lq = qt.stream == 0 ? La : Lb;
    const long long ld = (long long)H * D;
    bf16* out = (qt.stream == 0 ? oa : ob) + row_offset(b, Lq, qt.row0, H, h, D);
    float* lrow = lse + (long long)bh * (La + Lb) + (qt.stream == 0 ? 0 : La) + qt.row0;
    const float* first = opart + (long long)blockIdx.x * splits * QT * (D + 1);
    for (int i = threadIdx.x; i < qt.rows * CH; i += blockDim.x) {
        const int r = i / CH, c = i % CH;
        float m = -INFINITY;
        for (int p = 0; p < splits; p++) m = fmaxf(m, first[(long long)p * QT * (D + 1) + QT * D + r]);
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, sum = 0.f;
        for (int p = 0; p < splits; p++) {
            const float* slot = first + (long long)p * QT * (D + 1);
            const float w = __expf(slot[QT * D + r] - m);
            const float4 lo = load_f4(slot + r * D + 8 * c);
            const float4 hi = load_f4(slot + r * D + 8 * c + 4);
            const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int k = 0; k < 8; k++) acc[k] += w * v[k];
            sum += w;
        }
        const float f = 1.f / sum;
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] *= f;
        store16(out + r * ld + 8 * c, pack_bf16x8(acc));
        if (c == 0) lrow[r] = m + logf(sum);
    }
}

// The ROWS × D tile of `map` whose first row is token `row0` of head h of sample b (rows past
// the stream zero) into the swizzled tile at `dst` (1024-byte aligned): one box of 64 columns
// (its 128-byte rows) per column block of chunk_offset, completing on `bar`.
template <int D, int ROWS>
__device__ __forceinline__ void tma_load_tile(unsigned char* dst, const TmaMap* map, int h, int row0, int b,
                                              uint64_t* bar) {
#pragma unroll
    for (int j = 0; j < D / 64; j++) tma_load_4d(dst + j * ROWS * 128, map, 64 * j, h, row0, b, bar);
}

// fwd_h3's TMA producer (one thread): per unit its Q tile once the consumers are done with the
// Q slot's previous unit, then its key tiles through the ring, as fwd_h3's copying producer
// orders them; each `full` gets the one arrival and the bytes it waits for.
template <int D, int KN, int QT, int STAGES>
__device__ __forceinline__ void fwd_tma_producer(unsigned char* sQ0, unsigned char* sK0, unsigned char* sV0,
                                                 uint64_t* q_full, uint64_t* q_empty, uint64_t* full,
                                                 uint64_t* empty, const AttnMaps* maps, int La, int Lb, int H,
                                                 int split_from, int splits, int blocks) {
    constexpr int QBYTES = QT * D * 2, KVBYTES = KN * D * 2;
    int g = 0, n = 0;
    for (int v = blockIdx.x; v < blocks; v += gridDim.x, n++) {
        const SplitPiece sp = split_piece<QT, KN>(v, split_from, splits, La, Lb);
        const int b = sp.bh / H, h = sp.bh % H, qs = n & 1;
        const Tile qt = tile_of<QT>(sp.tile, La, Lb);
        if (n >= 2) mbar_wait(&q_empty[qs], ((n / 2) - 1) & 1);
        mbar_arrive_expect_tx(&q_full[qs], QBYTES);
        tma_load_tile<D, QT>(sQ0 + qs * QBYTES, &maps->q[qt.stream], h, qt.row0, b, &q_full[qs]);
#pragma unroll 1
        for (int i = 0; i < sp.nkt; i++) {
            const int tg = g + i, st = tg % STAGES;
            const Tile kt = tile_of<KN>(sp.k0 + i, La, Lb);
            if (tg >= STAGES) mbar_wait(&empty[st], ((tg / STAGES) - 1) & 1);
            mbar_arrive_expect_tx(&full[st], 2 * KVBYTES);
            tma_load_tile<D, KN>(sK0 + st * KVBYTES, &maps->k[kt.stream], h, kt.row0, b, &full[st]);
            tma_load_tile<D, KN>(sV0 + st * KVBYTES, &maps->v[kt.stream], h, kt.row0, b, &full[st]);
        }
        g += sp.nkt;
    }
}

// FwdVariant::H3: fwd_h2's consumers fed by a producer warpgroup, FlashAttention-3's structure
// (with cp.async where FA3 uses TMA). Warpgroup 0 produces: it loads Q once and streams the key
// and value tiles through STAGES shared stages, each guarded by two mbarriers: `full` (the
// producer's 128 threads arrive once their copies of the tile have landed, fenced for the async
// proxy) and `empty` (the 256 consumer threads arrive once their products have read it). It runs
// with 72 registers (setmaxnreg; 40 and 56 spilled its copy addressing), giving the consumers
// 216. Warpgroups 1 and 2 consume 64 query rows each exactly as fwd_h2 does (S_i overlapping
// P_{i−1}·V_{i−1}), with no block barrier, and take turns to issue their products (named
// barriers 1 and 2: a group issues after bar.sync on its own and then bar.arrive on the
// other's), so that one group's softmax runs while the other's products occupy the tensor cores
// (FA3's ping-pong scheduling).
//
// The work is `blocks` virtual blocks over the units (b·H + h)·tiles + query tile, in that order;
// the units from `split_from` on are split `splits` ways along the keys (the last wave's units,
// so that a wave left part-full runs pieces of 1/splits the length on more SMs: split_piece). A
// piece writes its rows' O/l in f32 and their lse to its slot of `opart` (fwd_store_piece), and
// joint_attn_fwd_split_combine makes O and lse of them; split_from = the unit count: none.
// Block x of the grid takes virtual blocks x, x + gridDim.x, …: with a grid of `blocks` one each;
// with fewer (persistent: one a SM) the producer loads a unit's Q and first key tiles while the
// consumers still work on the previous unit and store its rows (Q double-buffered, the ring of
// stages running on), where a new block would first wait for its launch and its loads.
//
// TMA (FwdVariant::H13): the producer is one thread issuing bulk tensor copies (tma_load_4d) from
// `maps` — a tile's Q, K or V is D/64 copies of a 64-column box, landed swizzled as
// load_tile_sw's tiles, rows past the stream zero — each stage's `full` completing on one
// arrival (with the tile's bytes expected) and the bytes landing; no producer thread waits for a
// copy or fences one (the async proxy writes what wgmma reads). The other 127 producer threads
// leave at once, and the producer's registers shrink to 24 (the consumers 240).
// ABL: bits 1, 2 and 8 are FwdAblation's, the bench's diagnostic cuts of the default forwards — 1
// forms P as S in bf16 (no maximum, exponential, sum or rescale), 2 copies nothing (the tiles stay
// as zeroed at entry), 8 takes no exponentials (softmax_exps' EXP); bit 4 (FwdVariant::H16) drops
// the groups' turns: each issues its products as soon as its softmax is done, not after the other
// group's (no named barriers).
template <int D, int KN, int STAGES, int VMUL, int POLY = 0, int NC = 2, bool ASYNC = false, bool ROWSUM = false,
          int SPEC = 0, bool TMA = false, int ABL = 0>
__device__ __forceinline__ void fwd_h3(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,
                                       const bf16* __restrict__ qa, const bf16* __restrict__ ka,
                                       const bf16* __restrict__ va, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb, int La, int Lb,
                                       int H, float scale_log2, float* __restrict__ opart, int split_from,
                                       int splits, int blocks, const AttnMaps* maps = nullptr) {
    constexpr int QT = 64 * NC, PT = 128, CT = 128 * NC;  // query rows, producer and consumer threads
    // A turn's named barrier: its group's 128 threads (bar.sync) and the previous group's (arrive).
    constexpr int TURN = 256;
    // Two P register sets (P_i written while P_{i−1}·V_{i−1} reads the other) fit beside two
    // consumer groups' S and O of 128-key tiles at d = 64 or 64-key ones at d = 128 (and, in
    // ASYNC's 232 registers, of 128-key ones at d = 128); one beside three groups' or larger
    // tiles': then P_i is packed only after that product.
    constexpr int PSETS = NC == 2 && KN / 2 + D / 2 + KN / 4 <= (ASYNC || TMA ? 160 : 128) ? 2 : 1;
    // setmaxnreg's split of the block's registers (168 a thread at entry with 384 threads, 128
    // with 512): three groups need 160, so the producer copies with rolled loops in 32; ASYNC's
    // producer never waits for its copies and copies rolled in 40, leaving two groups 232.
    constexpr bool LEAN = NC == 3 || ASYNC;
    constexpr int PREGS = NC == 3 ? 32 : TMA ? 24 : ASYNC ? 40 : 72;
    constexpr int CREGS = NC == 3 ? 160 : TMA ? 240 : ASYNC ? 232 : 216;
    static_assert(NC == 2 || NC == 3, "two or three consumer groups");
    static_assert(!TMA || (!ASYNC && NC == 2), "TMA's producer is its own kind");
    static_assert(SPEC == 0 || PSETS == 2, "the speculative softmax packs P as it goes: two P sets");
    constexpr bool NO_SOFTMAX = ABL & 1, NO_COPIES = ABL & 2, TURNS = !(ABL & 4), EXPS = !(ABL & 8);
    static_assert(ABL == 0 || (PSETS == 2 && SPEC == 0 && !ROWSUM && !ASYNC && !TMA && NC == 2),
                  "the cuts and H16 take the cp.async forwards of two groups and two P sets (H3, H4)");
    constexpr int QBYTES = QT * D * 2, KVBYTES = KN * D * 2;
    // The producer marks tile i full once tile i + LAG is issued (LAG tiles' copies in flight
    // behind it). Issuing tile i + LAG waits for the stage of tile i + LAG − STAGES to be released,
    // which the consumers do after tile i + LAG − STAGES + 1 is full: so LAG ≤ STAGES − 2, or
    // the two wait for each other (the emulator reports that deadlock at STAGES − 1). ASYNC
    // (FwdVariant::H7, H8): each producer thread's cp_async_mbar_arrive marks a tile full once its
    // copies have landed, without waiting for them: LAG 0, and two stages suffice.
    constexpr int LAG = ASYNC || TMA ? 0 : STAGES - 2;
    static_assert(ASYNC || TMA || LAG >= 1, "at least one tile in flight behind the one being published");
    static_assert(STAGES >= 2, "a stage filling while another is read");
    DYNAMIC_SMEM(unsigned char, raw);
    // Two Q tiles (unit n uses tile n mod 2, so the next unit's Q loads while this one's is read),
    // the K/V ring, and the mbarriers: q_full, q_empty per Q tile, full and empty per stage.
    unsigned char* sQ0 = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sK0 = sQ0 + 2 * QBYTES;
    unsigned char* sV0 = sK0 + STAGES * KVBYTES;
    uint64_t* q_full = reinterpret_cast<uint64_t*>(sV0 + STAGES * KVBYTES);
    uint64_t* q_empty = q_full + 2;
    uint64_t* full = q_empty + 2;
    uint64_t* empty = full + STAGES;
    // ROWSUM: 256 bytes of bf16 ones after the mbarriers (16-byte aligned: 8·(4 + 2·STAGES) bytes)
    unsigned char* sOnes = reinterpret_cast<unsigned char*>(empty + STAGES);

    const int tid = threadIdx.x, wg = tid / 128;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;

    if (tid == 0) {
        // full, q_full: every producer thread's arrival, or TMA's one with the tile's bytes
        constexpr int FILLERS = TMA ? 1 : PT;
        for (int s = 0; s < 2; s++) {
            mbar_init(&q_full[s], FILLERS);
            mbar_init(&q_empty[s], CT);
        }
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], FILLERS);
            mbar_init(&empty[s], CT);
        }
        fence_mbarrier_init();
    }
    if constexpr (ROWSUM) {
        if (tid < 64) {
            st_shared(reinterpret_cast<uint32_t*>(sOnes) + tid, 0x3F803F80u);  // two bf16 1.0
            fence_proxy_async();  // for the wgmma that read them, after the barrier
        }
    }
    if constexpr (NO_COPIES) {
        // the tiles nothing copies read as zeros (finite scores), fenced for the wgmma
        for (int i = tid; i < (2 * QBYTES + 2 * STAGES * KVBYTES) / 4; i += PT + CT)
            st_shared(reinterpret_cast<uint32_t*>(sQ0) + i, 0u);
        fence_proxy_async();
    }
    __syncthreads();

    static_assert(setmaxnreg_fits<PT + CT, PREGS, CREGS>(), "setmaxnreg over the block's registers");
    if (wg == 0) {
        setmaxnreg_dec<PREGS>();
        if constexpr (TMA) {
            if (tid == 0) fwd_tma_producer<D, KN, QT, STAGES>(sQ0, sK0, sV0, q_full, q_empty, full, empty, maps, La, Lb,
                                                              H, split_from, splits, blocks);
            return;
        }
        // Unit n of this block (virtual block v = blockIdx.x + n·gridDim.x): its Q, once the
        // consumers are done with unit n − 2's (the same tile), then its key tiles through the
        // ring, whose position g (key tiles loaded before this unit) runs on across units.
        int g = 0, n = 0;
        for (int v = blockIdx.x; v < blocks; v += gridDim.x, n++) {
            const SplitPiece sp = split_piece<QT, KN>(v, split_from, splits, La, Lb);
            const int b = sp.bh / H, h = sp.bh % H, qs = n & 1;
            const Tile qt = tile_of<QT>(sp.tile, La, Lb);
            const long long q_off = row_offset(b, qt.stream == 0 ? La : Lb, qt.row0, H, h, D);
            // Tile j of this unit has landed (the caller waited for its cp.async group): fence it
            // for the wgmma that read it, then arrive (j = −1: Q).
            auto publish = [&](int j) {
                fence_proxy_async();
                mbar_arrive(j < 0 ? &q_full[qs] : &full[(g + j) % STAGES]);
            };
            if (n >= 2) mbar_wait(&q_empty[qs], ((n / 2) - 1) & 1);
            // Q once a unit by a rolled copy (unrolled, its addresses spilled at d = 128 beside
            // the unit loop's state in the producer's 72 registers)
            unsigned char* sQ = sQ0 + qs * QBYTES;
            if constexpr (!NO_COPIES)
                load_tile_sw_lean<D, QT, PT>(sQ, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
            if constexpr (ASYNC)
                cp_async_mbar_arrive(&q_full[qs]);
            else
                cp_async_commit();
            for (int i = 0; i < sp.nkt; i++) {
                const int tg = g + i, st = tg % STAGES;
                if (tg >= STAGES) mbar_wait(&empty[st], ((tg / STAGES) - 1) & 1);
                if constexpr (!NO_COPIES)
                    load_kv_tile<D, KN, PT, VMUL, LEAN>(sK0 + st * KVBYTES, sV0 + st * KVBYTES, sp.k0 + i, ka, va,
                                                        kb, vb, La, Lb, b, H, h);
                tile_issued<ASYNC, LAG>(i, &full[st], publish);
            }
            tiles_done<ASYNC, LAG>(sp.nkt, publish);
            g += sp.nkt;
        }
        return;
    }

    setmaxnreg_inc<CREGS>();
    const int c = wg - 1, w = (tid / 32) % 4, lane = tid & 31;
    const int gr = lane >> 2, t = lane & 3;
    const uint32_t k_addr = smem_addr(sK0), v_addr = smem_addr(sV0);
    H2Regs<D, KN> R;
    uint32_t p0[KN / 16][4], p1[KN / 16][4];
    float lsum[4];  // ROWSUM: l on the tensor cores
    const uint64_t ones = ROWSUM ? ones_desc(sOnes) : 0;

    const int next_turn = 1 + (c + 1) % NC;  // the named barrier of the group issuing after this one
    // The groups' turns alternate without a break from unit to unit (each takes nkt + 1 a unit).
    auto take_turn = [&] {
        if constexpr (TURNS) named_bar_sync(1 + c, TURN);
    };
    auto pass_turn = [&] {
        if constexpr (TURNS) named_bar_arrive(next_turn, TURN);
    };
    if (TURNS && c == NC - 1) named_bar_arrive(1, TURN);  // group 0 issues first
    int g = 0, n = 0;
    for (int v = blockIdx.x; v < blocks; v += gridDim.x, n++) {
        const SplitPiece sp = split_piece<QT, KN>(v, split_from, splits, La, Lb);
        const int qs = n & 1, nkt = sp.nkt, k0 = sp.k0;
        const uint32_t q_addr = smem_addr(sQ0) + qs * QBYTES + c * 64 * 128;
#pragma unroll
        for (int i = 0; i < D / 2; i++) R.o[i] = 0.f;
        R.ms[0] = R.ms[1] = -INFINITY;
        R.l[0] = R.l[1] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; e++) lsum[e] = 0.f;
        mbar_wait(&q_full[qs], (n / 2) & 1);
        // ASYNC: the copies were not fenced for the async proxy by their issuer, which never
        // waited for them; the reader fences after acquiring them.
        if constexpr (ASYNC) fence_proxy_async();
        // One iteration, as fwd_h2's: tile i (ring position g + i), `pv` = P_{i−1}, `pn` = P_i;
        // i == nkt issues only the last tile's product. The stage of tile i − 1 is released once
        // P_{i−1}·V_{i−1} (its last reader) is complete; Q's once S of the last tile is.
        auto step = [&](int i, const uint32_t (&pv)[KN / 16][4], uint32_t (&pn)[KN / 16][4]) {
            const int prev = (g + i + STAGES - 1) % STAGES;
            const uint32_t v_prev = opaque(v_addr + prev * KVBYTES);
            if (i == nkt) {
                take_turn();
                wgmma_fence();
                fwd_issue_pv<D, KN>(R.o, pv, v_prev);
                if constexpr (ROWSUM) fwd_issue_rowsum<KN>(lsum, pv, ones);
                wgmma_commit();
                pass_turn();
                wgmma_wait<0>();
                mbar_arrive(&empty[prev]);
                return;
            }
            const int st = (g + i) % STAGES;
            mbar_wait(&full[st], ((g + i) / STAGES) & 1);
            if constexpr (ASYNC) fence_proxy_async();
            const uint32_t k_st = opaque(k_addr + st * KVBYTES), q_at = opaque(q_addr);
            float s[KN / 2];
            take_turn();
            wgmma_fence();
            fwd_issue_s<D, KN, QT>(s, q_at, k_st);
            wgmma_commit();
            if (i > 0) {
                fwd_issue_pv<D, KN>(R.o, pv, v_prev);
                if constexpr (ROWSUM) fwd_issue_rowsum<KN>(lsum, pv, ones);
            }
            wgmma_commit();
            pass_turn();
            wgmma_wait<1>();  // S_i complete; P_{i−1}·V_{i−1} may still run
            if (i == nkt - 1) mbar_arrive(&q_empty[qs]);  // Q's last reader is done
            const int kg = k0 + i;  // the key tile's index over both streams
            const int krows = min(KN, kg < ntiles<KN>(La) ? La - kg * KN : Lb - (kg - ntiles<KN>(La)) * KN);
            float alpha[2];
            if constexpr (NO_SOFTMAX) {
                pack_p<KN>(s, pn);
                wgmma_wait<0>();
                alpha[0] = alpha[1] = 1.f;
            } else if constexpr (SPEC > 0) {
                softmax_to_p_spec<D, KN, POLY, !ROWSUM, SPEC == 2>(s, alpha, R.ms, R.l, pn, krows, t, scale_log2);
                wgmma_wait<0>();
                rescale_o<D>(R.o, alpha);
            } else if constexpr (PSETS == 2) {
                softmax_to_p<D, KN, POLY, !ROWSUM, EXPS>(s, alpha, R.ms, R.l, pn, krows, t, scale_log2);
                wgmma_wait<0>();
                rescale_o<D>(R.o, alpha);
            } else {
                softmax_exps<D, KN, POLY, !ROWSUM>(s, alpha, R.ms, R.l, krows, t, scale_log2);
                wgmma_wait<0>();  // P_{i−1}·V_{i−1} has read the P registers
                rescale_o<D>(R.o, alpha);
                pack_p<KN>(s, pn);
            }
            if constexpr (ROWSUM) rescale_sum(lsum, alpha);
            if (i > 0) mbar_arrive(&empty[prev]);  // P_{i−1}·V_{i−1}, the stage's last reader, is done
        };
        if constexpr (PSETS == 2) {
            for (int i = 0; i <= nkt; i += 2) {
                step(i, p1, p0);
                if (i + 1 <= nkt) step(i + 1, p0, p1);
            }
        } else {
            for (int i = 0; i <= nkt; i++) step(i, p0, p0);
        }

        const int bh = sp.bh, b = bh / H, h = bh % H;
        const Tile qt = tile_of<QT>(sp.tile, La, Lb);
        const int row0 = 64 * c + 16 * w + gr;  // this thread's rows: row0 and row0 + 8
        if constexpr (NO_SOFTMAX) {
            // O stored as it summed (the sums of bf16(S)·V), lse 0: a quad's four l add to 1
            R.ms[0] = R.ms[1] = 0.f;
            R.l[0] = R.l[1] = 0.25f;
        }
        if constexpr (ROWSUM) {
            // every column of lsum holds the row's sum; the epilogue adds the quad's four l (exact)
            R.l[0] = 0.25f * lsum[0];
            R.l[1] = 0.25f * lsum[2];
        }
        if (sp.slot >= 0)
            fwd_store_piece<D, QT>(R.o, R.ms, R.l, opart, sp.slot, row0, qt.rows, t);
        else
            store_rows<D>(R.o, R.ms, R.l, lse + (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0,
                          (qt.stream == 0 ? oa : ob) + row_offset(b, qt.stream == 0 ? La : Lb, qt.row0, H, h, D),
                          ld, row0, qt.rows, t);
        g += nkt;
    }
    if (TURNS && c == 0) named_bar_sync(1, TURN);  // the last group's last arrive
}

// ---- Backward (BwdVariant::H1) ---------------------------------------------------------------
// attention.cu's backward (same operands, Drow from joint_attn_bwd_rowdot, dQ unscaled into the
// f32 accumulators, dK and dV in bf16) with every product on wgmma. A block is 2 warpgroups of
// 64 keys (KT = 128-key tiles); K and V stay in shared memory, dK and dV accumulate in registers,
// and the 64-row query tiles (Q, dO, lse, Drow) stream through a 2-stage cp.async pipeline. Per
// query tile, each group computes, as 64 keys × 64 queries:
//   Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ   shared × shared, K-major (the forward's S = Q·Kᵀ with roles swapped)
//   Pᵀ = 2^(Sᵀ·c − lse·log2 e) (keys past the tile masked), dSᵀ = Pᵀ∘(dPᵀ − Drow), both to bf16
//   dV += Pᵀ·dO, dK += dSᵀ·Q  registers × shared, dO and Q MN-major (as V in the forward)
// and dSᵀ goes to a swizzled shared tile (keys × 64 queries, 128-byte rows), from which
//   dQ[:, cols] += dS·K       shared (MN-major, dSᵀ read through its transpose) × shared (MN-major)
// over all 128 keys, group g taking half of the D columns (N = D/2: 32 or 64), added to the f32
// accumulator with red.global.add.v2.f32. H1 (PIPE = false) waits for each product. H2 (PIPE)
// leaves tile i's dQ product running into tile i+1, whose Sᵀ (and dPᵀ) products queue behind it
// with no wait and no barrier in between; its reductions follow Sᵀ's completion. (Reducing it as
// soon as it alone is done, between wait<1> and wait<0>, made ptxas serialize every wgmma of
// the kernel: C7514.) The dSᵀ tile is then double-buffered (dQ_i reads one while tile i+1
// writes the other).
// The backward's pieces, per warpgroup of 64 keys and a 64-query tile (bwd_h1, bwd_h3). Tiles
// are the swizzled 128-byte-row tiles of load_tile_sw: K, V of KT rows, Q, dO of 64 rows.

// acc (64 keys × QT queries) = A·Bᵀ over D: A this group's 64 rows of a KT-row tile at `a_rows`
// (K or V), B the QT-row tile at `b_rows` (Q or dO), both K-major.
template <int D, int KT, int QT = 64>
__device__ __forceinline__ void bwd_issue_rows(float (&acc)[QT / 2], uint32_t a_rows, uint32_t b_rows) {
    const uint32_t a_lo = wgmma_desc_lo(a_rows, 16), b_lo = wgmma_desc_lo(b_rows, 16);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        wgmma_ss<QT, 0, 0>(acc, wgmma_desc_step(a_lo, (kk / 4) * KT * 128 + (kk % 4) * 32, 1024, kSwizzle128),
                           wgmma_desc_step(b_lo, (kk / 4) * QT * 128 + (kk % 4) * 32, 1024, kSwizzle128), kk > 0);
}

// acc (64 keys × D) += A·B: A 64 keys × QT queries in registers (Pᵀ or dSᵀ), B the QT-row tile
// at `b_rows` (dO or Q) read MN-major.
template <int D, int QT = 64>
__device__ __forceinline__ void bwd_issue_acc(float* acc, const uint32_t (&a)[QT / 16][4], uint32_t b_rows) {
    const uint32_t b_lo = wgmma_desc_lo(b_rows, QT * 128);
#pragma unroll
    for (int c = 0; c < QT / 16; c++)
        wgmma_rs<D, 1>(acc, a[c], wgmma_desc_step(b_lo, c * 16 * 128, 1024, kSwizzle128), 1);
}

// dq (64 queries × DN columns) = dS·K over KT keys: A the dSᵀ tile at `ds` read through its
// transpose, B the K tile's columns from `k_cols`, both MN-major.
template <int DN, int KT>
__device__ __forceinline__ void bwd_issue_dq(float* dq, uint32_t ds, uint32_t k_cols) {
    const uint32_t ds_lo = wgmma_desc_lo(ds, KT * 128), k_lo = wgmma_desc_lo(k_cols, KT * 128);
#pragma unroll
    for (int c = 0; c < KT / 16; c++)
        wgmma_ss<DN, 1, 1>(dq, wgmma_desc_step(ds_lo, c * 16 * 128, 1024, kSwizzle128),
                           wgmma_desc_step(k_lo, c * 16 * 128, 1024, kSwizzle128), c > 0);
}

// Pᵀ = 2^(Sᵀ·c − lse·log2 e) from the Sᵀ fragments into p (query column 8j + 2t + (e & 1); keys
// past the tile 0; p may be s itself), kept in f32 for dSᵀ and packed to bf16 A fragments (k16
// step c = fragments j = 2c, 2c + 1).
// NEG_LOG2: sL holds −lse·log2 e (joint_attn_bwd_rowdot's nlse) rather than lse.
// POLY > 0: every POLY-th 8-query column group's exponentials on the FMA pipes (poly_exp2, as the
// forward's H4), the rest on the exponential unit.
// EXP = false (BwdAblation::NoExponentials, a bench cut): Pᵀ is the exponent floored at −126 (a
// padded query row's −∞ kept finite), one FMNMX where the exponential was (the bare exponent made
// ptxas spill 48 bytes and serialize the wgmmas).
template <int QT = 64, bool NEG_LOG2 = false, int POLY = 0, bool EXP = true>
__device__ __forceinline__ void bwd_p(const float (&s)[QT / 2], float (&p)[QT / 2], uint32_t (&pa)[QT / 16][4],
                                      const bool (&key_ok)[2], const float* sL, int t, float scale_log2) {
#pragma unroll
    for (int j = 0; j < QT / 8; j++) {
        const float2 l2 = *reinterpret_cast<const float2*>(sL + 8 * j + 2 * t);
        const float nl[2] = {NEG_LOG2 ? l2.x : -l2.x * kLog2e, NEG_LOG2 ? l2.y : -l2.y * kLog2e};
#pragma unroll
        for (int r = 0; r < 2; r++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int e = 2 * r + c;
                const float x = fmaf(s[4 * j + e], scale_log2, nl[c]);
                if constexpr (EXP)
                    p[4 * j + e] = key_ok[r] ? (POLY > 0 && j % POLY == POLY - 1 ? poly_exp2(x) : fast_exp2(x)) : 0.f;
                else
                    p[4 * j + e] = key_ok[r] ? fmaxf(x, -126.f) : 0.f;
            }
            pa[j / 2][2 * (j & 1) + r] = pack_bf16x2(p[4 * j + 2 * r], p[4 * j + 2 * r + 1]);
        }
    }
}

// dSᵀ = Pᵀ∘(dPᵀ − Drow), packed to bf16 A fragments and stored into the dSᵀ tile (row = key,
// 4-byte pairs of queries: a QT-query row spans QT/64 of the tile's 128-byte column blocks) for
// dQ; dp is only read.
// STSM (BwdVariant::H10, whose dK reads dSᵀ from the tile): no A fragments, and the tile written
// by stmatrix_x4 — four 8 × 8 blocks (two key rows' halves × two query chunks) an instruction,
// 8 a tile where st.shared took 32, each lane addressing one 16-byte row of one block.
template <int KT, int QT = 64, bool STSM = false>
__device__ __forceinline__ void bwd_ds(const float (&p)[QT / 2], const float (&dp)[QT / 2],
                                       uint32_t (&dsa)[QT / 16][4], unsigned char* ds_tile, int key0,
                                       const float* sDr, int t) {
    // The query pairs' Drow once for both key rows, read DRB pairs at a time: the compiler cannot
    // tell the stores into the dSᵀ tile from Drow, so it keeps each read behind the stores before
    // it — one read a pair waited ~30 cycles each time (32 a tile, ~430 of a warp's ~2100 cycles
    // by tools/sass-stats.sh --cycles); a batch's reads wait once.
    constexpr int DRB = 4;
    static_assert(QT / 8 % DRB == 0, "Drow batches");
#pragma unroll
    for (int j0 = 0; j0 < QT / 8; j0 += DRB) {
        float2 dr[DRB];
#pragma unroll
        for (int b = 0; b < DRB; b++) dr[b] = *reinterpret_cast<const float2*>(sDr + 8 * (j0 + b) + 2 * t);
        uint32_t v[DRB][2];
#pragma unroll
        for (int b = 0; b < DRB; b++) {
            const int j = j0 + b;
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int e = 2 * r;
                v[b][r] = pack_bf16x2(p[4 * j + e] * (dp[4 * j + e] - dr[b].x),
                                      p[4 * j + e + 1] * (dp[4 * j + e + 1] - dr[b].y));
                if constexpr (!STSM) {
                    st_shared(reinterpret_cast<uint32_t*>(ds_tile + chunk_offset<KT>(key0 + 8 * r, j) + 4 * t),
                              v[b][r]);
                    dsa[j / 2][2 * (j & 1) + r] = v[b][r];
                }
            }
        }
        if constexpr (STSM) {
            // block m = lane / 8 of an x4: key rows +8(m & 1), query chunk +(m >> 1); this lane
            // addresses its row lane % 8
            const int g = key0 & 7, lane = 4 * g + t, m = lane / 8;
            const int row = (key0 - g) + 8 * (m & 1) + lane % 8;
#pragma unroll
            for (int h = 0; h < DRB / 2; h++) {
                const uint32_t r4[4] = {v[2 * h][0], v[2 * h][1], v[2 * h + 1][0], v[2 * h + 1][1]};
                stmatrix_x4(ds_tile + chunk_offset<KT>(row, j0 + 2 * h + (m >> 1)), r4);
            }
        }
    }
}

// acc (64 keys × D) += dSᵀ·Q with dSᵀ from the shared tile: A this group's 64 key rows at `ds_rows`
// (K-major: the tile's 128-byte rows are keys, 64 queries a block of KT rows), B the QT-row Q tile
// at `b_rows` read MN-major (as bwd_issue_acc's).
template <int D, int KT, int QT>
__device__ __forceinline__ void bwd_issue_dk_tile(float* acc, uint32_t ds_rows, uint32_t b_rows) {
    const uint32_t a_lo = wgmma_desc_lo(ds_rows, 16), b_lo = wgmma_desc_lo(b_rows, QT * 128);
#pragma unroll
    for (int kk = 0; kk < QT / 16; kk++)
        wgmma_ss<D, 0, 1>(acc, wgmma_desc_step(a_lo, (kk / 4) * KT * 128 + (kk % 4) * 32, 1024, kSwizzle128),
                          wgmma_desc_step(b_lo, kk * 16 * 128, 1024, kSwizzle128), 1);
}

// dK (times the softmax scale the scores carried) and dV of this thread's keys key0, key0 + 8
// (those inside the tile), straight from the fragments: bf16 into the gradients (key rows kld and
// vld elements apart), or f32 into a split unit's partials.
template <int D, typename T>
__device__ __forceinline__ void bwd_store_kv(const float* dk, const float* dv, T* dkp, T* dvp, long long kld,
                                             long long vld, int key0, const bool (&key_ok)[2], float scale) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (!key_ok[r]) continue;
        const int key = key0 + 8 * r;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            store_pair(dkp + key * kld + 8 * j, dk[4 * j + 2 * r] * scale, dk[4 * j + 2 * r + 1] * scale);
            store_pair(dvp + key * vld + 8 * j, dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
        }
    }
}

template <int D, int VMUL, bool PIPE>
__device__ __forceinline__ void bwd_h1(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,
                                       bf16* __restrict__ dvb, float* __restrict__ dqa_acc,
                                       float* __restrict__ dqb_acc, const bf16* __restrict__ qa,
                                       const bf16* __restrict__ ka, const bf16* __restrict__ va,
                                       const bf16* __restrict__ doa, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                                       const bf16* __restrict__ dob, const float* __restrict__ lse,
                                       const float* __restrict__ drow, int La, int Lb, int H, float scale_log2,
                                       float scale) {
    constexpr int KT = 128, QT = 64, NT = 256, DN = D / 2;
    constexpr int KVBYTES = KT * D * 2, QBYTES = QT * D * 2, DSBYTES = KT * QT * 2;
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* sK = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sV = sK + KVBYTES;
    unsigned char* sQ0 = sV + KVBYTES;      // two stages
    unsigned char* sdO0 = sQ0 + 2 * QBYTES;  // two stages
    unsigned char* sdS = sdO0 + 2 * QBYTES;
    float* sL0 = reinterpret_cast<float*>(sdS + (PIPE ? 2 : 1) * DSBYTES);  // two stages of lse per query row
    float* sDr0 = sL0 + 2 * QT;                             // two stages of Drow per query row

    const int tid = threadIdx.x, wg = tid / 128, w = (tid / 32) % 4, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;

    const Tile kt = tile_of<KT>(blockIdx.x, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long k_off = row_offset(b, Lk, kt.row0, H, h, D);

    // Query tile i (Q, dO, lse, Drow) into stage st; padded query rows: zero Q and dO, lse = +inf
    // (P exactly 0), Drow = 0.
    auto issue_q = [&](int i, int st) {
        const Tile qt = tile_of<QT>(i, La, Lb);
        const int Lq = qt.stream == 0 ? La : Lb;
        const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);
        const long long r_off = (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0;
        load_tile_sw<D, QT, NT>(sQ0 + st * QBYTES, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
        load_tile_sw<D, QT, NT>(sdO0 + st * QBYTES, (qt.stream == 0 ? doa : dob) + q_off, ld, qt.rows);
        if (tid < 2 * QT) {
            const int r = tid & (QT - 1);
            float* dst = (tid < QT ? sL0 : sDr0) + st * QT + r;
            if (r < qt.rows)
                cp_async_4(dst, (tid < QT ? lse : drow) + r_off + r);
            else
                *dst = tid < QT ? INFINITY : 0.f;
        }
    };

    load_tile_sw<D, KT, NT>(sK, (kt.stream == 0 ? ka : kb) + k_off, ld, kt.rows);
    load_tile_sw<D, KT, NT>(sV, (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld), VMUL * ld,
                            kt.rows);
    issue_q(0, 0);
    cp_async_commit();

    // This thread's keys (rows of Sᵀ): 64·wg + 16w + g and + 8.
    const int key0 = 64 * wg + 16 * w + g;
    const bool key_ok[2] = {key0 < kt.rows, key0 + 8 < kt.rows};
    // Descriptor bases: this group's 64 K and V rows (halves of D = 128 KT·128 bytes apart), the
    // dSᵀ tile, and this group's D/2 columns of K as dQ's B (64 bytes into each row at D = 64,
    // the second half-tile at D = 128).
    const uint32_t k_wg0 = smem_addr(sK) + wg * 64 * 128, v_wg0 = smem_addr(sV) + wg * 64 * 128;
    const uint32_t ds_addr = smem_addr(sdS), q_addr = smem_addr(sQ0), do_addr = smem_addr(sdO0);
    const uint32_t k_cols = smem_addr(sK) + (D == 64 ? wg * 64 : wg * KT * 128);

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk[i] = dv[i] = 0.f;
    float dq[DN / 2];

    // Query tile i's dQ product (complete) into the f32 accumulator.
    auto flush_dq = [&](int i) {
        const Tile qt = tile_of<QT>(i, La, Lb);
        const int Lq = qt.stream == 0 ? La : Lb;
        float* dqp = (qt.stream == 0 ? dqa_acc : dqb_acc) + row_offset(b, Lq, qt.row0, H, h, D) + wg * DN + 2 * t;
        const int r0 = 16 * w + g;
#pragma unroll
        for (int j = 0; j < DN / 8; j++) {
            if (r0 < qt.rows) red_add2(dqp + r0 * ld + 8 * j, dq[4 * j], dq[4 * j + 1]);
            if (r0 + 8 < qt.rows) red_add2(dqp + (r0 + 8) * ld + 8 * j, dq[4 * j + 2], dq[4 * j + 3]);
        }
    };

    const int nqt = ntiles<QT>(La) + ntiles<QT>(Lb);
    for (int qt_i = 0; qt_i < nqt; qt_i++) {
        // Tile qt_i landed (issued during the previous iteration); then, past the barrier, the
        // next tile is prefetched into the other stage. Its last readers, tile qt_i − 1's dV and
        // dK products, are complete only once *both* warpgroups have waited for their own at the
        // end of that iteration: a wgmma wait covers the executing warpgroup's products alone,
        // so the prefetch must follow the barrier (before it, one group's copy could overwrite
        // Q or dO under the other group's running product).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (qt_i + 1 < nqt) issue_q(qt_i + 1, (qt_i + 1) & 1);
        cp_async_commit();
        const int st = qt_i & 1;
        const uint32_t q_st = opaque(q_addr + st * QBYTES), do_st = opaque(do_addr + st * QBYTES);
        const uint32_t k_wg = opaque(k_wg0), v_wg = opaque(v_wg0);
        const float* sL = sL0 + st * QT;
        const float* sDr = sDr0 + st * QT;

        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (64 keys × 64 queries each). At D = 128 dPᵀ is issued only
        // after Pᵀ is packed (with dV's product), so that Sᵀ and dPᵀ are never live together next
        // to dK and dV's 128 registers (both at once spill).
        constexpr bool kSplitS = D == 128;
        float s[32], dp[32];
        wgmma_fence();
        bwd_issue_rows<D, KT>(s, k_wg, q_st);
        if constexpr (!kSplitS) bwd_issue_rows<D, KT>(dp, v_wg, do_st);
        wgmma_commit();
        wgmma_wait<0>();
        if (PIPE && qt_i > 0) flush_dq(qt_i - 1);

        uint32_t pa[4][4], dsa[4][4];
        bwd_p(s, s, pa, key_ok, sL, t, scale_log2);
        wgmma_fence();
        bwd_issue_acc<D>(dv, pa, do_st);  // dV += Pᵀ·dO
        if constexpr (kSplitS) bwd_issue_rows<D, KT>(dp, v_wg, do_st);
        wgmma_commit();
        if constexpr (kSplitS) wgmma_wait<0>();
        bwd_ds<KT>(s, dp, dsa, sdS + (PIPE ? (qt_i & 1) * DSBYTES : 0), key0, sDr, t);
        wgmma_fence();
        bwd_issue_acc<D>(dk, dsa, q_st);  // dK += dSᵀ·Q
        wgmma_commit();

        // dQ[:, this group's columns] = dS·K over the 128 keys, once every group's dSᵀ is in place.
        fence_proxy_async();
        __syncthreads();
        wgmma_fence();
        bwd_issue_dq<DN, KT>(dq, opaque(ds_addr + (PIPE ? (qt_i & 1) * DSBYTES : 0)), opaque(k_cols));
        wgmma_commit();
        if constexpr (PIPE) {
            wgmma_wait<1>();  // dV, dK done (their operands' stage is refilled next); dQ may run on
        } else {
            wgmma_wait<0>();
            flush_dq(qt_i);
        }
    }
    if constexpr (PIPE) {
        wgmma_wait<0>();
        flush_dq(nqt - 1);
    }
    cp_async_wait<0>();

    bwd_store_kv<D>(dk, dv, (kt.stream == 0 ? dka : dkb) + k_off + 2 * t,
                    (kt.stream == 0 ? dva : dvb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld) + 2 * t, ld, VMUL * ld,
                    key0, key_ok, scale);
}

// bwd_store_kv for a piece of a split unit: this thread's keys key0 and key0 + 8 of dK (scaled)
// and dV in f32, into slot `slot` of the partials (KT rows of dK, then KT rows of dV, D columns).
template <int D, int KT>
__device__ __forceinline__ void bwd_store_kv_piece(const float* dk, const float* dv, float* __restrict__ kvpart,
                                                   int slot, int key0, const bool (&key_ok)[2], int t, float scale) {
    float* dst = kvpart + (long long)slot * 2 * KT * D + 2 * t;
    bwd_store_kv<D>(dk, dv, dst, dst + KT * D, D, D, key0, key_ok, scale);
}

// BwdVariant::H3 (D = 64): bwd_h1's consumers, warp-specialized. Warpgroup 0 (kBwdH3Producer
// registers by setmaxnreg) serves two consumer warpgroups (kBwdH3Consumer) with no block barrier: its warps 0–1 load K, V
// once and stream the query tiles (Q, dO, lse, Drow) through STAGES stages guarded by full/empty
// mbarriers, publishing tile i once tile i + 1 is issued; its warps 2–3 take each tile's dQ from
// shared memory (the consumers' products, written there and handed over through two more
// mbarrier pairs, double-buffered) and add it into the f32 accumulator with 16-byte vector
// reductions, so the consumers issue no reductions at all. The consumers meet once per tile on
// named barrier 1, when both halves of dSᵀ are in place for dQ. (H3's consumers at D = 128
// needed 252 registers, more than a producer warpgroup leaves them; H12 fits them in 232 by
// H6's early wait for dV's product, before dSᵀ is formed, and no PIPE.)
// The H3 kernels' setmaxnreg splits assume 168 registers a thread at launch (384 threads; build.rs
// checks the ptxas figure):
// advdmd-entry-registers: joint_attn_fwd_h3_d64 168
// advdmd-entry-registers: joint_attn_fwd_h3_d64_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h3_d128 168
// advdmd-entry-registers: joint_attn_fwd_h3_d128_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h4_d64 168
// advdmd-entry-registers: joint_attn_fwd_h4_d64_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h10_d64 168
// advdmd-entry-registers: joint_attn_fwd_h10_d64_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h13_d64 168
// advdmd-entry-registers: joint_attn_fwd_h13_d128 168
// advdmd-entry-registers: joint_attn_fwd_h14_d64 168
// advdmd-entry-registers: joint_attn_fwd_h14_d128 168
// advdmd-entry-registers: joint_attn_fwd_h15_d128 168
// advdmd-entry-registers: joint_attn_fwd_h5_d64 128
// advdmd-entry-registers: joint_attn_fwd_h5_d64_vfused 128
// advdmd-entry-registers: joint_attn_fwd_h6_d64 128
// advdmd-entry-registers: joint_attn_fwd_h6_d64_vfused 128
// advdmd-entry-registers: joint_attn_fwd_h7_d64 168
// advdmd-entry-registers: joint_attn_fwd_h7_d64_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h7_d128 168
// advdmd-entry-registers: joint_attn_fwd_h7_d128_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h8_d64 168
// advdmd-entry-registers: joint_attn_fwd_h8_d64_vfused 168
// advdmd-entry-registers: joint_attn_fwd_h9_d64 168
// advdmd-entry-registers: joint_attn_fwd_h9_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h3_d64 168
// advdmd-entry-registers: joint_attn_bwd_h3_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h4_d64 168
// advdmd-entry-registers: joint_attn_bwd_h4_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h5_d64 168
// advdmd-entry-registers: joint_attn_bwd_h5_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h6_d64 168
// advdmd-entry-registers: joint_attn_bwd_h6_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h7_d64 168
// advdmd-entry-registers: joint_attn_bwd_h7_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h8_d64 168
// advdmd-entry-registers: joint_attn_bwd_h8_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h9_d64 168
// advdmd-entry-registers: joint_attn_bwd_h9_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h11_d64 168
// advdmd-entry-registers: joint_attn_bwd_h11_d64_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h12_d128 168
// advdmd-entry-registers: joint_attn_bwd_h12_d128_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h13_d128 168
// advdmd-entry-registers: joint_attn_bwd_h13_d128_vfused 168
// advdmd-entry-registers: joint_attn_bwd_h14_d128 168
// advdmd-entry-registers: joint_attn_bwd_h14_d128_vfused 168
// The H3 backward's register split of the 384-thread block's 168 registers a thread: 96/208 (the
// first choice) does not fit (setmaxnreg_fits).
constexpr int kBwdH3Producer = 104, kBwdH3Consumer = 200;

// PIPE (BwdVariant::H4): tile i + 1's Sᵀ and dPᵀ products are issued right behind tile i's dQ
// product, so the tensor cores work on them while the consumers hand dQ_i over and release the
// stage; the top of each tile then waits only for what is still running. (H3 waits for every
// product of tile i before issuing tile i + 1's.)
// ASYNC (BwdVariant::H5, with PIPE): the loader never waits for its copies. Each loader thread
// arrives on a stage's q_full twice — once for its ordinary stores (a padded row's lse and Drow)
// and once, by cp_async_mbar_arrive, when its copies land — so it runs up to STAGES tiles ahead
// of the consumers instead of LAG.
// QT = 128 (BwdVariant::H6, with ASYNC): 128-query tiles, FlashAttention-3's tile at d = 64: Sᵀ
// and dPᵀ as m64n128 products (24 instead of 32 KB of shared reads per MFLOP), half the tiles and
// barriers a block. dQ is then split by rows — group g takes queries 64g.. over every column and
// key (A: its 64-query column block of the dSᵀ tile) — in 2 stages with one dQ tile (shared
// memory), the producer at 24 registers and the consumers at 240.
// POLY (BwdVariant::H9, H6 with POLY = 4): every POLY-th query column group's exponentials of Pᵀ
// on the FMA pipes (poly_exp2), as the forward's H4: both groups form Pᵀ at once with no product
// queued, so the exponential unit bounds that phase.
// DEFER (BwdVariant::H7 with QT = 128, H8 with 64): the two groups run half a tile apart instead of in
// step. In H3–H6 both groups wait for each other once a tile (dQ needs both halves of dSᵀ), so
// their exponentials and dSᵀ — when the tensor cores have nothing queued — fall at the same time.
// Here tile i's dQ product is issued during tile i + 1, once both halves of dSᵀ_i are in place
// (mbarrier ds_full, by then long done), and the dSᵀ buffer is rewritten once both groups' dQ
// products have read it (ds_empty); group 1 starts when group 0 has formed its first P, so one
// group's softmax runs while the other's products occupy the tensor cores.
// TMA (BwdVariant::H11, with H6's QT = 128 and ASYNC): thread 0 of the loader copies K, V and
// each tile's Q and dO by TMA (tma_load_tile; kv_full completes on its one arrival and the tiles'
// bytes, q_full on the loaders' arrivals, its own with the tile's bytes expected, and the bytes
// landing); the loaders still copy lse and Drow and fill a padded row's (−∞, 0) themselves. The
// consumers write dQ's tile as two 128-byte-swizzled blocks of 32 columns (float2 stores free of
// bank conflicts, as the padded rows were), and one flusher thread adds it into the accumulator
// by two TMA reductions a tile (rows past the stream skipped by the copy unit), where two warps
// issued 16 vector reductions a row.
// ABL (BwdAblation, the bench's diagnostic cuts of the default backward H6; 0 in every variant):
// bit 1 adds no dQ into its accumulator (the flushers take each tile and release it), bit 2
// copies nothing (the tiles, lse and Drow stay as zeroed at entry), bit 4 takes no exponentials
// (Pᵀ is the exponent, floored: bwd_p's EXP).
template <int VMUL, bool PIPE = false, bool ASYNC = false, int QT_ = 64, bool DEFER = false, int POLY = 0,
          bool DKS = false, bool TMA = false, int D_ = 64, int ABL = 0>
__device__ __forceinline__ void bwd_h3(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,
                                       bf16* __restrict__ dvb, float* __restrict__ dqa_acc,
                                       float* __restrict__ dqb_acc, const bf16* __restrict__ qa,
                                       const bf16* __restrict__ ka, const bf16* __restrict__ va,
                                       const bf16* __restrict__ doa, const bf16* __restrict__ qb,
                                       const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                                       const bf16* __restrict__ dob, const float* __restrict__ lse,
                                       const float* __restrict__ drow, int La, int Lb, int H, float scale_log2,
                                       float scale, float* __restrict__ kvpart, int split_from, int splits,
                                       const AttnBwdMaps* maps = nullptr) {
    constexpr int D = D_, KT = 128, QT = QT_, DN = D / 2, LAG = 1;
    // The softmax scale 1/√D · log2 e as the launcher passes it in scale_log2 (it refuses any
    // other scale for these kernels): an immediate operand where the parameter, at the consumers'
    // register ceiling, was reloaded from the constant bank before each of a tile's 64 products.
    constexpr float kScaleLog2 = (D == 64 ? 0.125f : 0.08838834764831845f) * kLog2e;
    (void)scale_log2;
    // D = 128 (BwdVariant::H12): H5's loader on 64-query tiles without PIPE — dK and dV take 128
    // registers a consumer thread, Sᵀ and dPᵀ 64 more, so nothing of a second tile fits beside
    // them — in 2 stages with one dQ tile (3 stages, or two dQ tiles, pass the 227 KB of shared
    // memory: K, V 64 KB, a stage of Q, dO 32 KB, dQ's f32 tile 33 KB)
    static_assert(D == 64 || (D == 128 && QT == 64 && ASYNC && !PIPE && !DEFER),
                  "D = 128: H5's loader on 64-query tiles, no PIPE or DEFER");
    // LEAN: the consumers at 240 or 232 registers, the producer (rolled copies) at 24 or 40
    constexpr bool LEAN = QT == 128 || D == 128;
    static_assert(QT == 64 || (QT == 128 && ASYNC && !PIPE), "128-query tiles: ASYNC, without PIPE");
    static_assert(!DEFER || (ASYNC && !PIPE), "the deferred dQ with the async loader, without PIPE");
    static_assert(!DKS || ((QT == 128 || D == 128) && !PIPE && !DEFER), "dK from the dSᵀ tile: H6's or H12's loop");
    static_assert(!TMA || ((QT == 128 || D == 128) && ASYNC && !DEFER), "TMA: H6's or H12's loader");
    constexpr bool NO_REDUCTIONS = ABL & 1, NO_COPIES = ABL & 2, EXPS = !(ABL & 4);
    static_assert(ABL == 0 || (D == 64 && QT == 128 && ASYNC && !PIPE && !DEFER && !DKS && !TMA && POLY == 0),
                  "the ablations cut H6");
    // dQ split by rows (each group: 64 queries × D) at QT = 128, by columns (64 queries × D/2)
    // at 64; its shared tiles: 2, or 1 at QT = 128 (with 2 stages: 227 KB)
    constexpr bool DQ_ROWS = QT == 128;
    constexpr int STAGES = QT == 64 && D == 64 ? 3 : 2, DQBUF = QT == 64 && D == 64 ? 2 : 1;
    constexpr int LT = 64, FT = 64, CT = 256;  // loader, flusher and consumer threads
    constexpr int KVBYTES = KT * D * 2, QBYTES = QT * D * 2, DSBYTES = KT * QT * 2;
    constexpr int DQLD = D + 4;  // f32 row stride of the dQ tile: float2 stores of 8 rows hit 8 banks
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* sK = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sV = sK + KVBYTES;
    unsigned char* sQ0 = sV + KVBYTES;             // STAGES stages
    unsigned char* sdO0 = sQ0 + STAGES * QBYTES;   // STAGES stages
    unsigned char* sdS0 = sdO0 + STAGES * QBYTES;  // two tiles
    float* sdQ0 = reinterpret_cast<float*>(sdS0 + 2 * DSBYTES);  // DQBUF tiles
    float* sL0 = sdQ0 + DQBUF * QT * DQLD;                       // STAGES stages of lse
    float* sDr0 = sL0 + STAGES * QT;                             // STAGES stages of Drow
    uint64_t* kv_full = reinterpret_cast<uint64_t*>(sDr0 + STAGES * QT);
    uint64_t* q_full = kv_full + 1;
    uint64_t* q_empty = q_full + STAGES;
    uint64_t* dq_full = q_empty + STAGES;
    uint64_t* dq_empty = dq_full + 2;
    uint64_t* ds_full = dq_empty + 2;  // DEFER: dSᵀ buffer b has both groups' rows
    uint64_t* ds_empty = ds_full + 2;  // DEFER: both groups' dQ products have read buffer b

    const int tid = threadIdx.x, wg = tid / 128;
    // A 1-D grid of units (b·H + h, key tile), split along the query tiles from split_from on
    // (as fwd_h3's along the keys): this block's query tiles are q0 .. q0 + nqt − 1.
    const SplitPiece sp = split_piece<KT, QT>(blockIdx.x, split_from, splits, La, Lb);
    const int bh = sp.bh, b = bh / H, h = bh % H;
    const int Lt = La + Lb;
    const long long ld = (long long)H * D;
    const Tile kt = tile_of<KT>(sp.tile, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long k_off = row_offset(b, Lk, kt.row0, H, h, D);
    const int q0 = sp.k0, nqt = sp.nkt;

    if (tid == 0) {
        mbar_init(kv_full, TMA ? 1 : LT);
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&q_full[s], ASYNC ? 2 * LT + (TMA ? 1 : 0) : LT);
            mbar_init(&q_empty[s], CT);
        }
        for (int s = 0; s < 2; s++) {
            mbar_init(&dq_full[s], CT);
            mbar_init(&dq_empty[s], TMA ? 1 : FT);
            if constexpr (DEFER) {
                mbar_init(&ds_full[s], CT);
                mbar_init(&ds_empty[s], CT);
            }
        }
        fence_mbarrier_init();
    }
    if constexpr (NO_COPIES) {
        // every tile, lse and Drow (all before the mbarriers) read as zeros, fenced for the wgmma
        uint32_t* zero = reinterpret_cast<uint32_t*>(sK);
        const int words = (int)((reinterpret_cast<unsigned char*>(kv_full) - sK) / 4);
        for (int i = tid; i < words; i += 384) st_shared(zero + i, 0u);
        fence_proxy_async();
    }
    __syncthreads();

    // PIPE holds tile i + 1's Sᵀ, dPᵀ beside tile i's P, dS and dQ: its consumers take 208
    // (at 200 they spilled 64 bytes), the producer 88 (the whole pool: 128·88 + 256·208 = 384·168)
    // QT = 128 holds Sᵀ, dPᵀ of 128 queries (128 registers) beside dK, dV: the consumers take 240
    // (at 232 they spilled 104 bytes), the producer (rolled copies clamping every row, the
    // flushers' loop) 24. D = 128 (dK, dV 128 registers beside Sᵀ, dPᵀ of 64 queries): 232 and
    // 40 (at 24 its two half-tile copies spilled 12 bytes)
    constexpr int PREGS = D == 128 ? 40 : LEAN ? 24 : PIPE ? 88 : kBwdH3Producer;
    constexpr int CREGS = D == 128 ? 232 : LEAN ? 240 : PIPE ? 208 : kBwdH3Consumer;
    static_assert(setmaxnreg_fits<384, PREGS, CREGS>(), "setmaxnreg over the block's registers");
    if (wg == 0) {
        setmaxnreg_dec<PREGS>();
        if (tid < LT) {
            // Loader: tile j's copies have landed (the caller waited for its group): fence them
            // for the wgmma that read them, then arrive (j = −1: K and V).
            auto publish = [&](int j) {
                fence_proxy_async();
                mbar_arrive(j < 0 ? kv_full : &q_full[j % STAGES]);
            };
            // K and V once, by rolled copies (unrolled, their 32 addresses spilled beside the
            // split's indices at 104 registers; a once-a-block copy loses nothing rolled)
            if constexpr (TMA) {
                if (tid == 0) {
                    mbar_arrive_expect_tx(kv_full, 2 * KVBYTES);
                    tma_load_tile<D, KT>(sK, &maps->k[kt.stream], h, kt.row0, b, kv_full);
                    tma_load_tile<D, KT>(sV, &maps->v[kt.stream], h, kt.row0, b, kv_full);
                }
            } else {
                const bf16* v_src = (kt.stream == 0 ? va : vb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld);
                if constexpr (!NO_COPIES) {
                    load_tile_sw_lean<D, KT, LT, QT == 128>(sK, (kt.stream == 0 ? ka : kb) + k_off, ld, kt.rows);
                    load_tile_sw_lean<D, KT, LT, QT == 128>(sV, v_src, VMUL * ld, kt.rows);
                }
                if constexpr (ASYNC)
                    cp_async_mbar_arrive(kv_full);
                else
                    cp_async_commit();
            }
            for (int i = 0; i < nqt; i++) {
                const int st = i % STAGES;
                if (i >= STAGES) mbar_wait(&q_empty[st], ((i / STAGES) - 1) & 1);
                const Tile qt = tile_of<QT>(q0 + i, La, Lb);
                const int Lq = qt.stream == 0 ? La : Lb;
                const long long q_off = row_offset(b, Lq, qt.row0, H, h, D);
                const long long r_off = (long long)bh * Lt + (qt.stream == 0 ? 0 : La) + qt.row0;
                if constexpr (TMA) {
                    if (tid == 0) {
                        mbar_arrive_expect_tx(&q_full[st], 2 * QBYTES);
                        tma_load_tile<D, QT>(sQ0 + st * QBYTES, &maps->q[qt.stream], h, qt.row0, b, &q_full[st]);
                        tma_load_tile<D, QT>(sdO0 + st * QBYTES, &maps->dout[qt.stream], h, qt.row0, b, &q_full[st]);
                    }
                } else if constexpr (NO_COPIES) {
                    (void)q_off;
                } else if constexpr (PIPE || LEAN) {  // rolled copies: the producer has 88 or 24 registers
                    load_tile_sw_lean<D, QT, LT, QT == 128>(sQ0 + st * QBYTES, (qt.stream == 0 ? qa : qb) + q_off, ld,
                                                       qt.rows);
                    load_tile_sw_lean<D, QT, LT, QT == 128>(sdO0 + st * QBYTES, (qt.stream == 0 ? doa : dob) + q_off, ld,
                                                       qt.rows);
                } else {
                    load_tile_sw<D, QT, LT>(sQ0 + st * QBYTES, (qt.stream == 0 ? qa : qb) + q_off, ld, qt.rows);
                    load_tile_sw<D, QT, LT>(sdO0 + st * QBYTES, (qt.stream == 0 ? doa : dob) + q_off, ld, qt.rows);
                }
                // −lse·log2 e (`lse` holds joint_attn_bwd_rowdot's nlse) and Drow (padded query
                // rows: −inf, so P is exactly 0; Drow = 0)
#pragma unroll 1
                for (int r = tid; r < QT; r += LT) {
                    if (r < qt.rows) {
                        if constexpr (!NO_COPIES) {
                            cp_async_4(sL0 + st * QT + r, lse + r_off + r);
                            cp_async_4(sDr0 + st * QT + r, drow + r_off + r);
                        }
                    } else {
                        sL0[st * QT + r] = -INFINITY;
                        sDr0[st * QT + r] = 0.f;
                    }
                }
                tile_issued<ASYNC, LAG, true>(i, &q_full[st], publish);
            }
            tiles_done<ASYNC, LAG>(nqt, publish);
        } else if constexpr (TMA) {
            // Flusher (TMA): one thread adds each tile by D/32 reductions (its 32-column blocks),
            // fenced for the async proxy that reads the consumers' stores, and releases the tile
            // once they are read
            if (tid != LT) return;
#pragma unroll 1
            for (int j = 0; j < nqt; j++) {
                mbar_wait(&dq_full[j % DQBUF], (j / DQBUF) & 1);
                fence_proxy_async();
                const Tile qt = tile_of<QT>(q0 + j, La, Lb);
                const unsigned char* src = reinterpret_cast<const unsigned char*>(sdQ0 + (j % DQBUF) * QT * DQLD);
#pragma unroll
                for (int blk = 0; blk < D / 32; blk++)
                    tma_reduce_add_4d(&maps->dq[qt.stream], 32 * blk, h, qt.row0, b, src + blk * QT * 128);
                bulk_commit();
                bulk_wait_read<0>();
                mbar_arrive(&dq_empty[j % DQBUF]);
            }
        } else {
            // Flusher: each tile's dQ (QT queries × 64 columns, f32) from shared memory into the
            // accumulator, a row's 16 float4 by 16 consecutive threads: thread f keeps float4 column
            // f mod 16 and steps FT/16 rows, its offsets 32-bit and stepped (dividing each index
            // into row and column took ~27 instructions an add)
            constexpr int C4 = D / 4, FSTEP = FT / C4;
            const int f = tid - LT, c4 = f % C4, r0 = f / C4;
            const uint32_t gstep = (uint32_t)(FSTEP * ld);
            for (int j = 0; j < nqt; j++) {
                mbar_wait(&dq_full[j % DQBUF], (j / DQBUF) & 1);
                const Tile qt = tile_of<QT>(q0 + j, La, Lb);
                const int Lq = qt.stream == 0 ? La : Lb;
                float* dq = (qt.stream == 0 ? dqa_acc : dqb_acc) + row_offset(b, Lq, qt.row0, H, h, D);
                const float* src = sdQ0 + (j % DQBUF) * QT * DQLD + r0 * DQLD + 4 * c4;
                uint32_t off = (uint32_t)(r0 * ld) + 4 * c4;
                // this thread's rows of the tile, r0, r0 + FSTEP, … < rows, as a trip count (a test
                // before each add made each a branch and a convergence region)
                const int n = qt.rows >= QT ? QT / FSTEP : max(0, qt.rows - r0 + FSTEP - 1) / FSTEP;
                if constexpr (!NO_REDUCTIONS) {
#pragma unroll 1
                    for (int it = 0; it < n; it++, off += gstep)
                        red_add4(dq + off, *reinterpret_cast<const float4*>(src + it * FSTEP * DQLD));
                }
                mbar_arrive(&dq_empty[j % DQBUF]);
            }
        }
        return;
    }

    setmaxnreg_inc<CREGS>();
    const int c = wg - 1, w = (tid / 32) % 4, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int key0 = 64 * c + 16 * w + g;  // this thread's keys (rows of Sᵀ): key0 and key0 + 8
    const bool key_ok[2] = {key0 < kt.rows, key0 + 8 < kt.rows};
    const uint32_t k_wg0 = smem_addr(sK) + c * 64 * 128, v_wg0 = smem_addr(sV) + c * 64 * 128;
    const uint32_t q_addr = smem_addr(sQ0), do_addr = smem_addr(sdO0), ds_addr = smem_addr(sdS0);
    // dQ's B: this group's D/2 columns of K (64 bytes into each row at D = 64, the second
    // half-tile at 128; DQ_ROWS: all D); its A: the dSᵀ tile (DQ_ROWS: this group's 64-query
    // column block of it)
    const uint32_t k_cols = smem_addr(sK) + (DQ_ROWS ? 0 : D == 64 ? c * 64 : c * KT * 128);
    const uint32_t ds_cols = DQ_ROWS ? c * KT * 128 : 0;

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk[i] = dv[i] = 0.f;
    mbar_wait(kv_full, 0);
    // ASYNC: copies their issuer never waited for are fenced for the async proxy by their reader
    if constexpr (ASYNC) fence_proxy_async();
    float s[QT / 2], dp[QT / 2];
    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ of tile j (its stage full)
    auto issue_rows = [&](int j) {
        const int sj = j % STAGES;
        mbar_wait(&q_full[sj], (j / STAGES) & 1);
        if constexpr (ASYNC) fence_proxy_async();
        wgmma_fence();
        bwd_issue_rows<D, KT, QT>(s, opaque(k_wg0), opaque(q_addr + sj * QBYTES));
        bwd_issue_rows<D, KT, QT>(dp, opaque(v_wg0), opaque(do_addr + sj * QBYTES));
        wgmma_commit();
    };
    // dQ of tile j (this group's DQN columns, or with DQ_ROWS its 64 rows) to the flushers through
    // shared tile j mod DQBUF, once they are done with tile j − DQBUF.
    constexpr int DQN = DQ_ROWS ? D : DN;  // dQ columns this group forms
    auto hand_over_dq = [&](int j, const float (&dq)[DQN / 2]) {
        const int qb = j % DQBUF;
        if (j >= DQBUF) mbar_wait(&dq_empty[qb], ((j / DQBUF) - 1) & 1);
        if constexpr (TMA) {
            // rows 64c + 16w + g (+ 8), columns 8e + 2t, 2t + 1 (DQ_ROWS; else rows 16w + g,
            // columns DQN·c + 8e + 2t): 32-column block e / 4 (+ DQN·c / 32) of QT 128-byte rows,
            // 16-byte chunk 2(e mod 4) + t/2 of a row at (chunk ^ row mod 8) = (chunk ^ g): the
            // thread's part (row, t/2 ^ g's low bit, the float's place) once, e's by an immediate
            // XOR with g's other bits (the addresses ptxas would otherwise hoist spilled)
            constexpr int ROWS_C = DQ_ROWS ? 64 : 0, BLOCKS_C = DQ_ROWS ? 0 : DQN / 32;
            unsigned char* base = reinterpret_cast<unsigned char*>(sdQ0 + qb * QT * DQLD) +
                                  BLOCKS_C * c * QT * 128 + (ROWS_C * c + 16 * w + g) * 128 +
                                  (((t >> 1) ^ g) & 1) * 16 + (2 * t % 4) * 4;
            const int g6 = g & 6;
#pragma unroll
            for (int e = 0; e < DQN / 8; e++) {
                unsigned char* at = base + (e / 4) * QT * 128 + ((2 * (e % 4)) ^ g6) * 16;
                st_shared(reinterpret_cast<float2*>(at), make_float2(dq[4 * e], dq[4 * e + 1]));
                st_shared(reinterpret_cast<float2*>(at + 8 * 128), make_float2(dq[4 * e + 2], dq[4 * e + 3]));
            }
            mbar_arrive(&dq_full[qb]);
            return;
        }
        float* dst = sdQ0 + qb * QT * DQLD + (DQ_ROWS ? 64 * c * DQLD : c * DN) + 2 * t;
#pragma unroll
        for (int e = 0; e < DQN / 8; e++) {
            *reinterpret_cast<float2*>(dst + (16 * w + g) * DQLD + 8 * e) = make_float2(dq[4 * e], dq[4 * e + 1]);
            *reinterpret_cast<float2*>(dst + (16 * w + g + 8) * DQLD + 8 * e) =
                make_float2(dq[4 * e + 2], dq[4 * e + 3]);
        }
        mbar_arrive(&dq_full[qb]);
    };
    // DEFER's tiles (see the template's comment): dQ_{i−1} issued in tile i, the last after the
    // loop; this group's rows of it handed to the flushers as H6 does.
    auto bwd_deferred_tiles = [&]() {
        // dQ of tile j (its dSᵀ buffer complete) into the flushers' tile; releases the buffer
        auto dq_tile = [&](int j) {
            float dq[DQN / 2];
            mbar_wait(&ds_full[j & 1], (j / 2) & 1);
            fence_proxy_async();
            wgmma_fence();
            bwd_issue_dq<DQN, KT>(dq, opaque(ds_addr + (j & 1) * DSBYTES + ds_cols), opaque(k_cols));
            wgmma_commit();
            wgmma_wait<0>();
            mbar_arrive(&ds_empty[j & 1]);
            hand_over_dq(j, dq);
        };
        // group 1 starts once group 0 has formed its first P (named barrier 2)
        if (c == 1) named_bar_sync(2, CT);
        if (c == 0 && nqt == 0) named_bar_arrive(2, CT);
        for (int i = 0; i < nqt; i++) {
            const int st = i % STAGES;
            const uint32_t q_st = opaque(q_addr + st * QBYTES), do_st = opaque(do_addr + st * QBYTES);
            issue_rows(i);
            wgmma_wait<0>();
            uint32_t pa[QT / 16][4], dsa[QT / 16][4];
            bwd_p<QT, true, POLY>(s, s, pa, key_ok, sL0 + st * QT, t, kScaleLog2);
            if (c == 0 && i == 0) named_bar_arrive(2, CT);
            wgmma_fence();
            bwd_issue_acc<D, QT>(dv, pa, do_st);
            wgmma_commit();
            if constexpr (QT == 128) wgmma_wait<0>();  // Pᵀ's fragments read (registers, as H6)
            // dSᵀ_i into buffer i mod 2 once both groups' dQ_{i−2} products have read it
            if (i >= 2) mbar_wait(&ds_empty[i & 1], ((i / 2) - 1) & 1);
            bwd_ds<KT, QT>(s, dp, dsa, sdS0 + (i & 1) * DSBYTES, key0, sDr0 + st * QT, t);
            fence_proxy_async();
            mbar_arrive(&ds_full[i & 1]);
            wgmma_fence();
            bwd_issue_acc<D, QT>(dk, dsa, q_st);
            wgmma_commit();
            wgmma_wait<0>();
            mbar_arrive(&q_empty[st]);  // dV_i and dK_i, this stage's readers, are done
            if (i >= 1) dq_tile(i - 1);
        }
        if (nqt >= 1) dq_tile(nqt - 1);
    };
    if constexpr (DEFER) {
        bwd_deferred_tiles();
    } else {
    if (PIPE && nqt > 0) issue_rows(0);
    for (int i = 0; i < nqt; i++) {
        const int st = i % STAGES;
        const uint32_t q_st = opaque(q_addr + st * QBYTES), do_st = opaque(do_addr + st * QBYTES);
        const float* sL = sL0 + st * QT;
        const float* sDr = sDr0 + st * QT;

        if (!PIPE) issue_rows(i);
        wgmma_wait<0>();
        uint32_t pa[QT / 16][4], dsa[QT / 16][4];
        // Pᵀ (into p), dV += Pᵀ·dO, dSᵀ, dK += dSᵀ·Q
        auto p_and_products = [&](float (&p)[QT / 2]) {
            bwd_p<QT, true, POLY, EXPS>(s, p, pa, key_ok, sL, t, kScaleLog2);
            wgmma_fence();
            bwd_issue_acc<D, QT>(dv, pa, do_st);
            wgmma_commit();
            if constexpr (DKS) {
                // dSᵀ to the shared tile only (by stmatrix; no fragments), while dV runs: dK's
                // product reads it there with dQ's, so no register set of dSᵀ stands
                // beside Pᵀ's, which the dV product still reads, and dV is not waited for here
                bwd_ds<KT, QT, true>(p, dp, dsa, sdS0 + (i & 1) * DSBYTES, key0, sDr, t);
                return;
            }
            // QT = 128, D = 128: Pᵀ's fragments are read before dSᵀ's are formed, so that both
            // never hold registers beside Sᵀ, dPᵀ, dK and dV (they did: the consumers spilled at 240)
            if constexpr (LEAN) wgmma_wait<0>();
            bwd_ds<KT, QT>(p, dp, dsa, sdS0 + (i & 1) * DSBYTES, key0, sDr, t);
            wgmma_fence();
            bwd_issue_acc<D, QT>(dk, dsa, q_st);
            wgmma_commit();
        };
        if constexpr (PIPE) {
            // P in registers of its own: no ordinary instruction may write the Sᵀ registers,
            // which tile i + 1's product accumulates into, within this tile's span of products
            // (ptxas serializes every wgmma otherwise, C7515)
            float p[QT / 2];
            p_and_products(p);
        } else {
            p_and_products(s);  // P in place of Sᵀ
        }

        // dQ[:, this group's columns] = dS·K (DQ_ROWS: dQ[this group's rows, :]), once both
        // groups' dSᵀ rows are in place.
        fence_proxy_async();
        named_bar_sync(1, CT);
        float dq[DQN / 2];
        wgmma_fence();
        if constexpr (DKS)
            bwd_issue_dk_tile<D, KT, QT>(dk, opaque(ds_addr + (i & 1) * DSBYTES + c * 64 * 128), q_st);
        bwd_issue_dq<DQN, KT>(dq, opaque(ds_addr + (i & 1) * DSBYTES + ds_cols), opaque(k_cols));
        wgmma_commit();
        if (PIPE && i + 1 < nqt) {
            issue_rows(i + 1);
            wgmma_wait<1>();  // dV_i, dK_i, dQ_i complete; tile i + 1's products may still run
        } else {
            wgmma_wait<0>();
        }
        // (ptxas's C7517 note for H4, H5 is the full wait it adds after this loop, before dK and
        // dV are read; in the loop, SASS keeps the wait<1>: WARPGROUP.DEPBAR.LE gsb0, 0x1)
        mbar_arrive(&q_empty[st]);  // every product reading this stage is done

        hand_over_dq(i, dq);
    }
    }

    if (sp.slot >= 0)
        bwd_store_kv_piece<D, KT>(dk, dv, kvpart, sp.slot, key0, key_ok, t, scale);
    else
        bwd_store_kv<D>(dk, dv, (kt.stream == 0 ? dka : dkb) + k_off + 2 * t,
                        (kt.stream == 0 ? dva : dvb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld) + 2 * t, ld,
                        VMUL * ld, key0, key_ok, scale);
}

// dK and dV of the split units from their pieces' partials (summed in piece order), in bf16 where
// the whole units write them (dV rows VMUL·H·D apart). Unit split_from + blockIdx.x; a thread per
// 8 columns of a key row. grid: units split, block: 256.
template <int D, int KT, int VMUL>
__device__ __forceinline__ void bwd_split_combine(bf16* __restrict__ dka, bf16* __restrict__ dva,
                                                  bf16* __restrict__ dkb, bf16* __restrict__ dvb,
                                                  const float* __restrict__ kvpart, int La, int Lb, int H,
                                                  int split_from, int splits) {
    constexpr int CH = D / 8;
    const int tiles = ntiles<KT>(La) + ntiles<KT>(Lb);
    const int unit = split_from + blockIdx.x, bh = unit / tiles, b = bh / H, h = bh % H;
    const Tile kt = tile_of<KT>(unit % tiles, La, Lb);
    const int Lk = kt.stream == 0 ? La : Lb;
    const long long ld = (long long)H * D, k_off = row_offset(b, Lk, kt.row0, H, h, D);
    bf16* dk = (kt.stream == 0 ? dka : dkb) + k_off;
    bf16* dv = (kt.stream == 0 ? dva : dvb) + v_offset<VMUL>(k_off, b, Lk, kt.row0, ld);
    const float* first = kvpart + (long long)blockIdx.x * splits * 2 * KT * D;
    for (int i = threadIdx.x; i < 2 * kt.rows * CH; i += blockDim.x) {
        const int half = i / (kt.rows * CH), r = (i / CH) % kt.rows, c = i % CH;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int p = 0; p < splits; p++) {
            const float* src = first + (long long)p * 2 * KT * D + (half * KT + r) * D + 8 * c;
            const float4 lo = load_f4(src);
            const float4 hi = load_f4(src + 4);
            acc[0] += lo.x, acc[1] += lo.y, acc[2] += lo.z, acc[3] += lo.w;
            acc[4] += hi.x, acc[5] += hi.y, acc[6] += hi.z, acc[7] += hi.w;
        }
        bf16* out = half == 0 ? dk + r * ld : dv + r * VMUL * ld;
        store16(out + 8 * c, pack_bf16x8(acc));
    }
}

}  // namespace attn_h

// Entries (arguments as attention.cu's; the _vfused ones read V, and write dV, with a token stride
// of 3·H·D, in place in a fused qkv projection). Dynamic shared memory as src/kernels/attention.rs
// computes it (FwdVariant::shared_bytes, BwdVariant::shared_bytes), from a 1 KB alignment and
// the tiles each kernel's comment lists.
// Forward H1, H2: 2 groups of 64 query rows; 128-key tiles at D = 64, 64-key at D = 128; 2 and 3
// stages.
ATTN_FWD_ENTRY(joint_attn_fwd_h1_d64, 256, 1, attn_h::fwd_h1<64, 2, 128, 2, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_h1_d64_vfused, 256, 1, attn_h::fwd_h1<64, 2, 128, 2, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_h1_d128, 256, 1, attn_h::fwd_h1<128, 2, 64, 2, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_h1_d128_vfused, 256, 1, attn_h::fwd_h1<128, 2, 64, 2, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_h2_d64, 256, 1, attn_h::fwd_h2<64, 2, 128, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_h2_d64_vfused, 256, 1, attn_h::fwd_h2<64, 2, 128, 3>)
ATTN_FWD_ENTRY(joint_attn_fwd_h2_d128, 256, 1, attn_h::fwd_h2<128, 2, 64, 1>)
ATTN_FWD_ENTRY(joint_attn_fwd_h2_d128_vfused, 256, 1, attn_h::fwd_h2<128, 2, 64, 3>)
// Forward H3: a producer and 2 consumer groups, 4 stages; split along the keys from split_from on.
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 4, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128_vfused, 384, 1, attn_h::fwd_h3<128, 64, 4, 3>)
// The split forward's combine, per head dim and query rows a unit (H3, H4: 128; H5, H6: 192).
#define FWD_SPLIT_COMBINE_ENTRY(name, D, QT)                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        name(bf16* __restrict__ oa, bf16* __restrict__ ob, float* __restrict__ lse,             \
             const float* __restrict__ opart, int La, int Lb, int H, int split_from, int splits) { \
        kernel_prologue();                                                                      \
        attn_h::fwd_split_combine<D, QT>(oa, ob, lse, opart, La, Lb, H, split_from, splits);    \
    }
FWD_SPLIT_COMBINE_ENTRY(joint_attn_fwd_split_combine_d64_q128, 64, 128)
FWD_SPLIT_COMBINE_ENTRY(joint_attn_fwd_split_combine_d64_q192, 64, 192)
FWD_SPLIT_COMBINE_ENTRY(joint_attn_fwd_split_combine_d128_q128, 128, 128)
// Forward H4 (D = 64): H3 with a quarter of the exponentials on the FMA pipes (poly_exp2).
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 4, 3, 4>)
// The default forwards (H4 at D = 64, H3 at D = 128) cut for the bench (FwdAblation, ABL above):
// 1 no softmax, 2 no copies, 3 both, 8 no exponentials. Their outputs are not attention.
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64_abl1, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64_abl2, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, false, 2>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64_abl3, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, false, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h4_d64_abl8, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, false, 8>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128_abl1, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128_abl2, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, false, 2>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128_abl3, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, false, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h3_d128_abl8, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, false, 8>)
// Forward H16: H4 at D = 64 and H3 at D = 128 without the groups' turns (ABL bit 4).
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h16_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, false, 4>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h16_d64_vfused, 384, 1,
                     attn_h::fwd_h3<64, 128, 4, 3, 4, 2, false, false, 0, false, 4>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h16_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, false, 4>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h16_d128_vfused, 384, 1,
                     attn_h::fwd_h3<128, 64, 4, 3, 0, 2, false, false, 0, false, 4>)
// Forward H10 (D = 64): H4 with the softmax's row sums on the tensor cores (P·1, ROWSUM).
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h10_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h10_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 4, 3, 4, 2, false, true>)
// Forward H11: the speculative softmax (SPEC 1) on H4 at D = 64 and on H3 at D = 128; H12: the
// same with the sum bound for the maximum (SPEC 2).
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h11_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h11_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 4, 3, 4, 2, false, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h11_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h11_d128_vfused, 384, 1, attn_h::fwd_h3<128, 64, 4, 3, 0, 2, false, false, 1>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h12_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 2>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h12_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 4, 3, 4, 2, false, false, 2>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h12_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 2>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h12_d128_vfused, 384, 1, attn_h::fwd_h3<128, 64, 4, 3, 0, 2, false, false, 2>)
// Forward H13: H4 at D = 64 and H3 at D = 128 with the producer's copies by TMA (one thread;
// V's token stride in its map, so no _vfused twin).
ATTN_FWD_TMA_ENTRY(joint_attn_fwd_h13_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 0, true>)
ATTN_FWD_TMA_ENTRY(joint_attn_fwd_h13_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 0, true>)
// Forward H15 (D = 128): H13 on 128-key tiles in 2 stages (the consumers' 240 registers hold two
// P sets beside S and O; S's products read 48 KB of shared memory per 2 MFLOP where 64-key tiles
// read 32 per 1).
ATTN_FWD_TMA_ENTRY(joint_attn_fwd_h15_d128, 384, 1, attn_h::fwd_h3<128, 128, 2, 1, 0, 2, false, false, 0, true>)
// Forward H14: H11 (the speculative softmax) with H13's TMA producer.
ATTN_FWD_TMA_ENTRY(joint_attn_fwd_h14_d64, 384, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 2, false, false, 1, true>)
ATTN_FWD_TMA_ENTRY(joint_attn_fwd_h14_d128, 384, 1, attn_h::fwd_h3<128, 64, 4, 1, 0, 2, false, false, 1, true>)
// Forward H5, H6 (D = 64): H3 with three consumer groups (192 query rows; one P register set),
// without and with H4's polynomial exponentials.
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h5_d64, 512, 1, attn_h::fwd_h3<64, 128, 4, 1, 0, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h5_d64_vfused, 512, 1, attn_h::fwd_h3<64, 128, 4, 3, 0, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h6_d64, 512, 1, attn_h::fwd_h3<64, 128, 4, 1, 4, 3>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h6_d64_vfused, 512, 1, attn_h::fwd_h3<64, 128, 4, 3, 4, 3>)
// Forward H7: H3's two consumer groups fed by a producer that never waits for its copies (ASYNC),
// so fewer stages keep the ring full: 128-key tiles in 3 stages at D = 64, in 2 at D = 128 (H3:
// 64 keys in 4). H8 (D = 64): H7 with H4's polynomial exponentials. H9 (D = 64): H8 with
// 192-key tiles (FlashAttention-3's tile at this head dim).
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h7_d64, 384, 1, attn_h::fwd_h3<64, 128, 3, 1, 0, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h7_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 3, 3, 0, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h7_d128, 384, 1, attn_h::fwd_h3<128, 128, 2, 1, 0, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h7_d128_vfused, 384, 1, attn_h::fwd_h3<128, 128, 2, 3, 0, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h8_d64, 384, 1, attn_h::fwd_h3<64, 128, 3, 1, 4, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h8_d64_vfused, 384, 1, attn_h::fwd_h3<64, 128, 3, 3, 4, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h9_d64, 384, 1, attn_h::fwd_h3<64, 192, 3, 1, 4, 2, true>)
ATTN_FWD_SPLIT_ENTRY(joint_attn_fwd_h9_d64_vfused, 384, 1, attn_h::fwd_h3<64, 192, 3, 3, 4, 2, true>)
// Backward H1, H2 (bwd_h1 without and with PIPE): 2 groups of 64 keys, 64-query tiles in 2 stages,
// one and two dSᵀ tiles.
ATTN_BWD_ENTRY(joint_attn_bwd_h1_d64, 256, 1, attn_h::bwd_h1<64, 1, false>)
ATTN_BWD_ENTRY(joint_attn_bwd_h1_d64_vfused, 256, 1, attn_h::bwd_h1<64, 3, false>)
ATTN_BWD_ENTRY(joint_attn_bwd_h1_d128, 256, 1, attn_h::bwd_h1<128, 1, false>)
ATTN_BWD_ENTRY(joint_attn_bwd_h1_d128_vfused, 256, 1, attn_h::bwd_h1<128, 3, false>)
ATTN_BWD_ENTRY(joint_attn_bwd_h2_d64, 256, 1, attn_h::bwd_h1<64, 1, true>)
ATTN_BWD_ENTRY(joint_attn_bwd_h2_d64_vfused, 256, 1, attn_h::bwd_h1<64, 3, true>)
ATTN_BWD_ENTRY(joint_attn_bwd_h2_d128, 256, 1, attn_h::bwd_h1<128, 1, true>)
ATTN_BWD_ENTRY(joint_attn_bwd_h2_d128_vfused, 256, 1, attn_h::bwd_h1<128, 3, true>)
// Backward H3 (D = 64): a producer and 2 consumer groups; split along the queries from split_from on.
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h3_d64, 384, 1, attn_h::bwd_h3<1>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h3_d64_vfused, 384, 1, attn_h::bwd_h3<3>)
// Backward H4 (D = 64): H3 with the next tile's first products issued behind dQ.
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h4_d64, 384, 1, attn_h::bwd_h3<1, true>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h4_d64_vfused, 384, 1, attn_h::bwd_h3<3, true>)
// Backward H5 (D = 64): H4 with a loader that never waits for its copies (ASYNC).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h5_d64, 384, 1, attn_h::bwd_h3<1, true, true>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h5_d64_vfused, 384, 1, attn_h::bwd_h3<3, true, true>)
// Backward H6 (D = 64): H3 on 128-query tiles with H5's loader (QT = 128, ASYNC).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64, 384, 1, attn_h::bwd_h3<1, false, true, 128>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 128>)
// H6 cut for the bench (BwdAblation, ABL above): 1 no dQ reductions, 2 no copies, 3 both, 4 no
// exponentials. Their gradients are not the backward's.
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64_abl1, 384, 1,
                     attn_h::bwd_h3<1, false, true, 128, false, 0, false, false, 64, 1>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64_abl2, 384, 1,
                     attn_h::bwd_h3<1, false, true, 128, false, 0, false, false, 64, 2>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64_abl3, 384, 1,
                     attn_h::bwd_h3<1, false, true, 128, false, 0, false, false, 64, 3>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h6_d64_abl4, 384, 1,
                     attn_h::bwd_h3<1, false, true, 128, false, 0, false, false, 64, 4>)
// Backward H9 (D = 64): H6 with a quarter of the exponentials on the FMA pipes (POLY, as forward H4).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h9_d64, 384, 1, attn_h::bwd_h3<1, false, true, 128, false, 4>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h9_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 128, false, 4>)
// Backward H10 (D = 64): H6 with dK's product reading dSᵀ from its shared tile (DKS).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h10_d64, 384, 1, attn_h::bwd_h3<1, false, true, 128, false, 0, true>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h10_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 128, false, 0, true>)
// Backward H11 (D = 64): H6 with K, V, Q and dO copied by TMA (the _vfused twin still writes dV
// inside the fused qkv).
ATTN_BWD_TMA_ENTRY(joint_attn_bwd_h11_d64, 384, 1, attn_h::bwd_h3<1, false, true, 128, false, 0, false, true>)
ATTN_BWD_TMA_ENTRY(joint_attn_bwd_h11_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 128, false, 0, false, true>)
// Backward H12 (D = 128): H5's loader (ASYNC) on 64-query tiles without PIPE, 2 stages, one dQ tile.
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h12_d128, 384, 1, attn_h::bwd_h3<1, false, true, 64, false, 0, false, false, 128>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h12_d128_vfused, 384, 1,
                     attn_h::bwd_h3<3, false, true, 64, false, 0, false, false, 128>)
// Backward H13 (D = 128): H12 with H11's TMA copies of K, V, Q, dO and TMA reductions of dQ.
ATTN_BWD_TMA_ENTRY(joint_attn_bwd_h13_d128, 384, 1, attn_h::bwd_h3<1, false, true, 64, false, 0, false, true, 128>)
ATTN_BWD_TMA_ENTRY(joint_attn_bwd_h13_d128_vfused, 384, 1,
                   attn_h::bwd_h3<3, false, true, 64, false, 0, false, true, 128>)
// Backward H14 (D = 128): H12 with dK's product reading dSᵀ from its shared tile (DKS, as H10).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h14_d128, 384, 1, attn_h::bwd_h3<1, false, true, 64, false, 0, true, false, 128>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h14_d128_vfused, 384, 1,
                     attn_h::bwd_h3<3, false, true, 64, false, 0, true, false, 128>)
// Backward H7 (D = 64): H6 with the groups half a tile apart (DEFER: dQ a tile later).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h7_d64, 384, 1, attn_h::bwd_h3<1, false, true, 128, true>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h7_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 128, true>)
// Backward H8 (D = 64): H7's deferred dQ on H3's 64-query tiles in 3 stages (async loader).
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h8_d64, 384, 1, attn_h::bwd_h3<1, false, true, 64, true>)
ATTN_BWD_SPLIT_ENTRY(joint_attn_bwd_h8_d64_vfused, 384, 1, attn_h::bwd_h3<3, false, true, 64, true>)
// The split backward's combine (bwd_h3: 128-key units at D = 64 and 128), V alone and inside a
// fused qkv.
#define BWD_SPLIT_COMBINE_ENTRY(name, D, VMUL)                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        name(bf16* __restrict__ dka, bf16* __restrict__ dva, bf16* __restrict__ dkb,            \
             bf16* __restrict__ dvb, const float* __restrict__ kvpart, int La, int Lb, int H,   \
             int split_from, int splits) {                                                      \
        kernel_prologue();                                                                      \
        attn_h::bwd_split_combine<D, 128, VMUL>(dka, dva, dkb, dvb, kvpart, La, Lb, H,          \
                                                split_from, splits);                            \
    }
BWD_SPLIT_COMBINE_ENTRY(joint_attn_bwd_split_combine_d64, 64, 1)
BWD_SPLIT_COMBINE_ENTRY(joint_attn_bwd_split_combine_d64_vfused, 64, 3)
BWD_SPLIT_COMBINE_ENTRY(joint_attn_bwd_split_combine_d128, 128, 1)
BWD_SPLIT_COMBINE_ENTRY(joint_attn_bwd_split_combine_d128_vfused, 128, 3)
