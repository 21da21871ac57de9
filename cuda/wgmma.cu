// advdmd-arch: 90a
//
// The Hopper warpgroup MMA (common.cuh's wgmma wrappers) on one 64×64 output tile: the check that
// the descriptors, the 128-byte-swizzled canonical layouts and the accumulator fragment layout
// this project writes down are the ones the hardware uses — the ground a wgmma attention stands
// on. Under the emulator it checks the twins the same way (tests/kernels/wgmma.rs).
//
// C[64×64] = A·Bᵀ (B stored N × K, K-major) or A·B (B stored K × N, MN-major), A 64 × K row-major,
// K a multiple of 64, f32 out. Operands are staged with plain stores into shared memory in the
// swizzled layouts the attention would use for Q/K (K-major: rows of 64 k, 128 bytes, 8-row
// groups of 1 KB, one 8 KB atom per 64 k) and V (MN-major: one 128-byte row per k).
// a_mode: 0 A K-major in shared memory, 1 A from registers, 2 A MN-major in shared memory (the
// backward's dS read through its transpose). n_halves: C as two 64×32 products, the second's B
// descriptor starting 32 columns into the tile (4 row groups further when K-major, 64 bytes into
// each swizzled row when MN-major): the column split of the backward's dQ.
#include "common.cuh"

// Byte offset of (row i, k < 64) in a 128-byte-swizzled K-major atom of 64 rows.
__device__ __forceinline__ uint32_t sw128_k_major(int i, int k) {
    const uint32_t o = (uint32_t)((i / 8) * 1024 + (i % 8) * 128 + 2 * k);
    return o ^ (((o >> 7) & 7) << 4);
}

// Byte offset of (k, column n < 64) in a 128-byte-swizzled MN-major tile: one 128-byte row per k.
__device__ __forceinline__ uint32_t sw128_mn_major(int k, int n) {
    const uint32_t o = (uint32_t)(k * 128 + 2 * n);
    return o ^ (((o >> 7) & 7) << 4);
}

// This thread's register A fragment of k-step s, read from A (64 × k_len, row-major) in global
// memory: rows 16w + g and + 8, columns 16s + 2q (+1) and + 8 (the m64nNk16 register-A layout).
__device__ __forceinline__ void a_fragment(uint32_t (&af)[4], const bf16* a, int k_len, int s, int w, int g, int q) {
    const bf16* r0 = a + (long long)(16 * w + g) * k_len + 16 * s + 2 * q;
    const bf16* r1 = r0 + 8LL * k_len;
    af[0] = pack_bf16x2(bf2f(r0[0]), bf2f(r0[1]));
    af[1] = pack_bf16x2(bf2f(r1[0]), bf2f(r1[1]));
    af[2] = pack_bf16x2(bf2f(r0[8]), bf2f(r0[9]));
    af[3] = pack_bf16x2(bf2f(r1[8]), bf2f(r1[9]));
}

// A (64 × k_len, row-major in global memory) into shared memory at `sa`: K-major (8 KB atoms of
// 64 k) or, with `mn_major`, one 128-byte swizzled row per k (the backward's dSᵀ read through its
// transpose).
__device__ __forceinline__ void stage_a(unsigned char* sa, const bf16* a, int k_len, bool mn_major) {
    for (int e = threadIdx.x; e < 64 * k_len; e += blockDim.x) {
        const int i = e / k_len, k = e % k_len;
        const uint32_t o = mn_major ? sw128_mn_major(k, i) : (k / 64) * 8192 + sw128_k_major(i, k % 64);
        st_shared(reinterpret_cast<bf16*>(sa + o), a[e]);
    }
}

// B into shared memory at `sb`, N columns of the product: stored N × K and K-major (N·128 bytes
// per 64 k), or K × N and MN-major (64-column halves k_len·128 bytes apart).
template <int N>
__device__ __forceinline__ void stage_b(unsigned char* sb, const bf16* b, int k_len, bool mn_major) {
    for (int e = threadIdx.x; e < N * k_len; e += blockDim.x) {
        uint32_t o;
        if (mn_major) {
            const int k = e / N, n = e % N;
            o = (n / 64) * k_len * 128 + sw128_mn_major(k, n % 64);
        } else {
            const int n = e / k_len, k = e % k_len;
            o = (k / 64) * (N * 128) + sw128_k_major(n, k % 64);
        }
        st_shared(reinterpret_cast<bf16*>(sb + o), b[e]);
    }
}

// A and B staged in dynamic shared memory (swizzled tiles on a 1 KB boundary, B right after A) for
// every warpgroup thread; returns their shared addresses.
template <int N>
__device__ __forceinline__ void stage_operands(const bf16* a, const bf16* b, int k_len, bool a_mn_major,
                                               bool b_mn_major, uint32_t& a_base, uint32_t& b_base) {
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* sa = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    unsigned char* sb = sa + 64 * k_len * 2;
    stage_a(sa, a, k_len, a_mn_major);
    stage_b<N>(sb, b, k_len, b_mn_major);
    fence_proxy_async();
    __syncthreads();
    a_base = smem_addr(sa);
    b_base = smem_addr(sb);
}

// The accumulators d (m64nNk16 layout) into C (64 × N, row-major).
template <int N>
__device__ __forceinline__ void store_c(float* c, const float* d, int w, int g, int q) {
    for (int j = 0; j < N / 8; j++) {
        const int row = 16 * w + g, col = 8 * j + 2 * q;
        c[row * N + col] = d[4 * j];
        c[row * N + col + 1] = d[4 * j + 1];
        c[(row + 8) * N + col] = d[4 * j + 2];
        c[(row + 8) * N + col + 1] = d[4 * j + 3];
    }
}

extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_m64n64(const bf16* a, const bf16* b, float* c, int k_len, int b_mn_major, int a_mode,
                       int n_halves) {
    kernel_prologue();
    uint32_t a_base, b_base;
    stage_operands<64>(a, b, k_len, a_mode == 2, b_mn_major, a_base, b_base);

    const int tid = threadIdx.x, w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
    float d[32], h[2][16];
    for (int i = 0; i < 32; i++) d[i] = 0.f;
    for (int i = 0; i < 16; i++) h[0][i] = h[1][i] = 0.f;
    for (int s = 0; s < k_len / 16; s++) {
        // K-major: step s is 32 bytes into atom s/4; MN-major: 16 rows of 128 bytes further.
        const uint64_t da = a_mode == 2 ? wgmma_desc(a_base + s * 2048, 8192, 1024, kSwizzle128)
                                        : wgmma_desc(a_base + (s / 4) * 8192 + (s % 4) * 32, 16, 1024, kSwizzle128);
        uint64_t db[2];
        for (int half = 0; half < 2; half++) {
            const uint32_t off = half ? (b_mn_major ? 64 : 4 * 1024) : 0;
            db[half] = b_mn_major ? wgmma_desc(b_base + off + s * 2048, 8192, 1024, kSwizzle128)
                                  : wgmma_desc(b_base + off + (s / 4) * 8192 + (s % 4) * 32, 16, 1024,
                                               kSwizzle128);
        }
        // scale_d = 0 on the first step: the old accumulators are ignored (they are zero anyway).
        const int scale_d = s > 0;
        wgmma_fence();
        if (a_mode == 1) {
            uint32_t af[4];
            a_fragment(af, a, k_len, s, w, g, q);
            wgmma_fence();
            if (n_halves) {
                for (int half = 0; half < 2; half++) {
                    if (b_mn_major)
                        wgmma_rs<32, 1>(h[half], af, db[half], scale_d);
                    else
                        wgmma_rs<32, 0>(h[half], af, db[half], scale_d);
                }
            } else if (b_mn_major) {
                wgmma_m64n64k16_rs<1>(d, af, db[0], scale_d);
            } else {
                wgmma_m64n64k16_rs<0>(d, af, db[0], scale_d);
            }
        } else if (n_halves) {
            for (int half = 0; half < 2; half++) {
                if (a_mode == 2 && b_mn_major)
                    wgmma_ss<32, 1, 1>(h[half], da, db[half], scale_d);
                else if (a_mode == 2)
                    wgmma_ss<32, 1, 0>(h[half], da, db[half], scale_d);
                else if (b_mn_major)
                    wgmma_ss<32, 0, 1>(h[half], da, db[half], scale_d);
                else
                    wgmma_ss<32, 0, 0>(h[half], da, db[half], scale_d);
            }
        } else {
            if (a_mode == 2 && b_mn_major)
                wgmma_m64n64k16_ss<1, 1>(d, da, db[0], scale_d);
            else if (a_mode == 2)
                wgmma_m64n64k16_ss<1, 0>(d, da, db[0], scale_d);
            else if (b_mn_major)
                wgmma_m64n64k16_ss<0, 1>(d, da, db[0], scale_d);
            else
                wgmma_m64n64k16_ss<0, 0>(d, da, db[0], scale_d);
        }
        wgmma_commit();
    }
    wgmma_wait<0>();
    if (n_halves)
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++) d[4 * j + e] = h[j / 4][4 * (j % 4) + e];
    store_c<64>(c, d, w, g, q);
}

// The same check at N = 128, the width the attention uses for S at D = 64 (K-major B: 128 key
// rows, 16 KB per 64 k) and for P·V and the backward's dV/dK at D = 128 (MN-major B: two 64-column
// halves, the second k_len·128 bytes after the first — the only place the descriptor's leading
// byte offset is read). A K-major in shared memory (a_mode 0) or from registers (a_mode 1).
// C[64×128]; b is 128 × K (K-major) or K × 128 (MN-major).
extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_m64n128(const bf16* a, const bf16* b, float* c, int k_len, int b_mn_major, int a_mode) {
    kernel_prologue();
    uint32_t a_base, b_base;
    stage_operands<128>(a, b, k_len, false, b_mn_major, a_base, b_base);

    const int tid = threadIdx.x, w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
    float d[64];
    for (int i = 0; i < 64; i++) d[i] = 0.f;
    for (int s = 0; s < k_len / 16; s++) {
        const uint64_t da = wgmma_desc(a_base + (s / 4) * 8192 + (s % 4) * 32, 16, 1024, kSwizzle128);
        const uint64_t db = b_mn_major ? wgmma_desc(b_base + s * 2048, k_len * 128, 1024, kSwizzle128)
                                       : wgmma_desc(b_base + (s / 4) * 16384 + (s % 4) * 32, 16, 1024, kSwizzle128);
        const int scale_d = s > 0;
        wgmma_fence();
        if (a_mode == 1) {
            uint32_t af[4];
            a_fragment(af, a, k_len, s, w, g, q);
            wgmma_fence();
            if (b_mn_major)
                wgmma_rs<128, 1>(d, af, db, scale_d);
            else
                wgmma_rs<128, 0>(d, af, db, scale_d);
        } else if (b_mn_major) {
            wgmma_ss<128, 0, 1>(d, da, db, scale_d);
        } else {
            wgmma_ss<128, 0, 0>(d, da, db, scale_d);
        }
        wgmma_commit();
    }
    wgmma_wait<0>();
    store_c<128>(c, d, w, g, q);
}

// N = 192, the key tile of the H9 forward at D = 64 (S = Q·Kᵀ: A and B both K-major in shared
// memory, 24 KB of B per 64 k): the one form the attention uses at this width.
// C[64×192]; b is 192 × K.
extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_m64n192(const bf16* a, const bf16* b, float* c, int k_len) {
    kernel_prologue();
    uint32_t a_base, b_base;
    stage_operands<192>(a, b, k_len, false, false, a_base, b_base);

    const int tid = threadIdx.x, w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
    float d[96];
    for (int i = 0; i < 96; i++) d[i] = 0.f;
    for (int s = 0; s < k_len / 16; s++) {
        const uint64_t da = wgmma_desc(a_base + (s / 4) * 8192 + (s % 4) * 32, 16, 1024, kSwizzle128);
        const uint64_t db = wgmma_desc(b_base + (s / 4) * 192 * 128 + (s % 4) * 32, 16, 1024, kSwizzle128);
        wgmma_fence();
        wgmma_ss<192, 0, 0>(d, da, db, s > 0);
        wgmma_commit();
    }
    wgmma_wait<0>();
    store_c<192>(c, d, w, g, q);
}
