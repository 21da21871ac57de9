// Test kernels of the CPU SIMT emulator (tests/emu.rs). build.rs compiles this directory into the
// emulator library only; nvcc never sees it, so these never reach the product's fatbins.
#include "common.cuh"

// out[row] = sum of row `row` of x (rows × n, n arbitrary): a block-stride loop, warp shuffles and
// __syncthreads through common.cuh's block_sum; out2[row] = the same sum by a shfl_down tree with
// a __syncthreads_count of the nonzero elements as a cross-check of the block barrier's reduction.
extern "C" __global__ void emu_test_block_sum(const float* __restrict__ x, float* __restrict__ out,
                                              int* __restrict__ nonzero, int n) {
    STATIC_SMEM(float, scratch, [32]);
    const long long row = blockIdx.x;
    float v = 0.f;
    int nz = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        v += x[row * n + i];
        nz += x[row * n + i] != 0.f;
    }
    const float s = block_sum(v, scratch);
    const int count = __syncthreads_count(nz);
    if (threadIdx.x == 0) {
        out[row] = s;
        nonzero[row] = count;  // threads holding a nonzero, not elements: checked as such
    }
}

// Per-lane results of the warp intrinsics for one block of `blockDim.x` threads (any count, the
// last warp may be partial). out has 12 ints per thread.
extern "C" __global__ void emu_test_warp_ops(int* __restrict__ out) {
    const int t = threadIdx.x, lane = t & 31;
    int* o = out + 12 * t;
    const int v = 100 * t;
    o[0] = __shfl_sync(FULL_MASK, v, 3);
    o[1] = __shfl_xor_sync(FULL_MASK, v, 5);
    o[2] = __shfl_down_sync(FULL_MASK, v, 4);
    o[3] = __shfl_up_sync(FULL_MASK, v, 4);
    o[4] = __shfl_xor_sync(FULL_MASK, v, 9, 8);   // partner outside the 8-lane segment: own value
    o[5] = __shfl_sync(FULL_MASK, v, 13, 8);      // lane 5 of each 8-lane segment
    o[6] = (int)__ballot_sync(FULL_MASK, lane % 3 == 0);
    o[7] = __any_sync(FULL_MASK, lane == 7);
    o[8] = __all_sync(FULL_MASK, lane < 40);
    // A partial mask: only the even lanes take part.
    if (lane % 2 == 0) {
        const unsigned even = 0x55555555u;
        o[9] = __shfl_xor_sync(even, v, 2);
        o[10] = (int)__ballot_sync(even, lane < 8);
    } else {
        o[9] = -1;
        o[10] = -1;
    }
    __syncwarp();
    o[11] = (int)__shfl_down_sync(FULL_MASK, (float)v, 1);
}

// Partial warp: float warp_sum over a block whose last warp is not full. Lanes that do not exist
// read as NaN, so sums[w] is finite only for full warps.
extern "C" __global__ void emu_test_partial_warp(float* __restrict__ sums) {
    const float s = warp_sum(1.0f);
    if ((threadIdx.x & 31) == 0) sums[threadIdx.x >> 5] = s;
}

// C (M×N) = A (M×K) · B (K×N), f32, 16×16 tiles staged in dynamic shared memory (2·16·16 floats);
// any M, N, K. Block (16, 16), grid (ceil(N/16), ceil(M/16)).
extern "C" __global__ void emu_test_matmul(const float* __restrict__ a, const float* __restrict__ b,
                                           float* __restrict__ c, int M, int N, int K) {
    DYNAMIC_SMEM(float, smem);
    float* As = smem;
    float* Bs = smem + 16 * 16;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * 16 + ty, col = blockIdx.x * 16 + tx;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += 16) {
        As[ty * 16 + tx] = (row < M && k0 + tx < K) ? a[(long long)row * K + k0 + tx] : 0.f;
        Bs[ty * 16 + tx] = (k0 + ty < K && col < N) ? b[(long long)(k0 + ty) * N + col] : 0.f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 16; ++k) acc += As[ty * 16 + k] * Bs[k * 16 + tx];
        __syncthreads();
    }
    if (row < M && col < N) c[(long long)row * N + col] = acc;
}

// D (16×16, f32) = A (16×16, bf16, row-major) · B (16×16, bf16, row-major k×n) + C (f32), on one
// warp: two m16n8k16 MMAs (n = 0..7 and 8..15). A's fragments come from ldmatrix_x4; B's from
// mode 0: ldmatrix_x4_trans of B, 1: ldmatrix_x2_trans per n-tile, 2: ldmatrix_x2 of Bᵀ (n×k).
extern "C" __global__ void emu_test_mma(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                        const float* __restrict__ c, float* __restrict__ d, int mode) {
    STATIC_SMEM(__align__(16) bf16, sA, [16 * 16]);
    STATIC_SMEM(__align__(16) bf16, sB, [16 * 16]);
    STATIC_SMEM(__align__(16) bf16, sBt, [16 * 16]);
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) {
        sA[i] = a[i];
        sB[i] = b[i];
        sBt[(i % 16) * 16 + i / 16] = b[i];
    }
    __syncwarp();
    // Matrix j = lane / 8 of A's x4: rows 8(j % 2).., cols 8(j / 2)..; this lane gives row lane % 8.
    const int j = lane / 8, r = lane % 8;
    uint32_t fa[4];
    ldmatrix_x4(fa, &sA[(r + 8 * (j % 2)) * 16 + 8 * (j / 2)]);
    uint32_t fb[2][2];
    if (mode == 0) {
        // Matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
        uint32_t t[4];
        ldmatrix_x4_trans(t, &sB[(r + 8 * (j % 2)) * 16 + 8 * (j / 2)]);
        fb[0][0] = t[0], fb[0][1] = t[1], fb[1][0] = t[2], fb[1][1] = t[3];
    } else if (mode == 1) {
        for (int nt = 0; nt < 2; ++nt)  // matrices (k 0-7) and (k 8-15) of n-tile nt
            ldmatrix_x2_trans(fb[nt], &sB[(r + 8 * (j % 2)) * 16 + 8 * nt]);
    } else {
        for (int nt = 0; nt < 2; ++nt)  // Bᵀ rows n = 8nt + r, cols k 0-7 and 8-15
            ldmatrix_x2(fb[nt], &sBt[(8 * nt + r) * 16 + 8 * (j % 2)]);
    }
    const int g = lane / 4, t = lane % 4;
    for (int nt = 0; nt < 2; ++nt) {
        float acc[4] = {c[g * 16 + 8 * nt + 2 * t], c[g * 16 + 8 * nt + 2 * t + 1],
                        c[(g + 8) * 16 + 8 * nt + 2 * t], c[(g + 8) * 16 + 8 * nt + 2 * t + 1]};
        mma_m16n8k16_bf16(acc, fa, fb[nt], acc);
        d[g * 16 + 8 * nt + 2 * t] = acc[0];
        d[g * 16 + 8 * nt + 2 * t + 1] = acc[1];
        d[(g + 8) * 16 + 8 * nt + 2 * t] = acc[2];
        d[(g + 8) * 16 + 8 * nt + 2 * t + 1] = acc[3];
    }
}

// stmatrix_x4 of a warp's fragments, read back as the rows they addressed: lane l holds in r[j]
// the values 64j + 8(l/4) + 2(l%4) (+1) — matrix j's (row l/4, cols 2(l%4), 2(l%4)+1) — and gives
// row (l%8) of matrix (l/8) the address of shared row ((8(l/8) + l%8) ^ 5) of a 32 × 8 bf16 block
// (rows permuted, so addresses are not taken for granted); out gets the block, then ldmatrix_x4
// of the same addresses back into lane order (out2: 32 lanes × 4 registers).
extern "C" __global__ void emu_test_stmatrix(uint16_t* __restrict__ out, uint32_t* __restrict__ out2) {
    STATIC_SMEM(__align__(16) uint16_t, sM, [32 * 8]);
    const unsigned lane = threadIdx.x, g = lane / 4, t = lane % 4;
    uint32_t r[4];
    for (unsigned j = 0; j < 4; ++j) {
        const unsigned v = 64 * j + 8 * g + 2 * t;
        r[j] = v | (v + 1) << 16;
    }
    void* row = &sM[((8 * (lane / 8) + lane % 8) ^ 5) * 8];
    stmatrix_x4(row, r);
    __syncwarp();
    for (unsigned i = lane; i < 32 * 8; i += 32) out[i] = sM[i];
    uint32_t back[4];
    ldmatrix_x4(back, row);
    for (unsigned j = 0; j < 4; ++j) out2[4 * lane + j] = back[j];
}

// Reads dynamic shared memory before writing it: the poison (0xFF bytes) shows as NaN.
extern "C" __global__ void emu_test_smem_poison(float* __restrict__ out) {
    DYNAMIC_SMEM(float, s);
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
    s[threadIdx.x] = 1.f;  // the next block must see the poison again
}

// bf16 and fp16 round-to-nearest-even: y[i] = bits of bf16(x[i]), h[i] = bits of half(x[i]).
extern "C" __global__ void emu_test_convert(const float* __restrict__ x, uint16_t* __restrict__ y,
                                            uint16_t* __restrict__ h, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bf16 b = f2bf(x[i]);
    y[i] = *reinterpret_cast<const uint16_t*>(&b);
    const __half hv = __float2half_rn(x[i]);
    h[i] = __half_as_ushort(hv);
}

// Deliberate deadlock: half the warp waits at a barrier the other half never reaches.
extern "C" __global__ void emu_test_deadlock(float* __restrict__ x) {
    if (threadIdx.x < 16) __syncthreads();
    x[threadIdx.x] = 1.f;
}

// Deliberately divergent barriers: the two halves of the block meet at different __syncthreads.
extern "C" __global__ void emu_test_divergent(float* __restrict__ x) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    x[threadIdx.x] = 1.f;
}

// Deliberate warp deadlock: a full-mask shuffle that lanes 16..31 never reach while they wait at
// __syncthreads.
extern "C" __global__ void emu_test_warp_deadlock(float* __restrict__ x) {
    float v = x[threadIdx.x];
    if (threadIdx.x < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
    __syncthreads();
    x[threadIdx.x] = v;
}

// Three parameters of mixed kinds, for the argument-count check; writes a + b + c to out[0].
extern "C" __global__ void __launch_bounds__(32) emu_test_args(long long* out, long long a, unsigned b,
                                                               float c) {
    if (threadIdx.x == 0) out[0] = a + b + (long long)c;
}

// Deliberate misuse: every lane calls a shuffle whose mask names lane 0 only.
extern "C" __global__ void emu_test_bad_mask(float* __restrict__ x) {
    x[threadIdx.x] = __shfl_sync(1u, x[threadIdx.x], 0);
}

// A warp-specialized pipeline (the shape of attention_hopper.cu's fwd_h3): warp 0 produces
// `n` items of 32 floats through 2 shared stages guarded by full/empty mbarriers; warps 1 and 2
// consume alternate items in turns passed through named barriers 1 and 2 (bar.sync on their own,
// bar.arrive on the other's), each lane adding its element into out[lane] (one writer per turn).
// Dynamic shared memory: 2·32 floats + 4 mbarriers.
extern "C" __global__ void emu_test_pipeline(float* __restrict__ out, int n) {
    DYNAMIC_SMEM(unsigned char, raw);
    float* stage = reinterpret_cast<float*>(raw);
    uint64_t* full = reinterpret_cast<uint64_t*>(raw + 2 * 32 * 4);
    uint64_t* empty = full + 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; s++) {
            mbar_init(&full[s], 32);
            mbar_init(&empty[s], 64);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    if (warp == 0) {
        for (int i = 0; i < n; i++) {
            const int s = i % 2;
            if (i >= 2) mbar_wait(&empty[s], ((i / 2) - 1) & 1);
            stage[s * 32 + lane] = (float)(i * 32 + lane);
            mbar_arrive(&full[s]);
        }
        return;
    }
    const int c = warp - 1;  // consumer 0 or 1
    if (c == 1) named_bar_arrive(1, 64);  // consumer 0 takes the first turn
    for (int i = 0; i < n; i++) {
        const int s = i % 2;
        mbar_wait(&full[s], (i / 2) & 1);
        named_bar_sync(1 + c, 64);
        if (i % 2 == c) out[lane] += stage[s * 32 + lane];
        named_bar_arrive(2 - c, 64);
        mbar_arrive(&empty[s]);
    }
    if (c == 0) named_bar_sync(1, 64);  // consumer 1's last arrive
}

// An mbarrier wait that nothing completes: a deadlock, reported with where the threads spin.
extern "C" __global__ void emu_test_mbar_deadlock(float* __restrict__ x) {
    DYNAMIC_SMEM(uint64_t, bar);
    if (threadIdx.x == 0) {
        mbar_init(bar, 64);
        fence_mbarrier_init();
    }
    __syncthreads();
    mbar_arrive(bar);  // 32 of the 64 arrivals
    mbar_wait(bar, 0);
    x[threadIdx.x] = 1.f;
}

// A bar.arrive that no bar.sync consumes before the block ends.
extern "C" __global__ void emu_test_named_dangling(float* __restrict__ x) {
    if (threadIdx.x < 32) named_bar_arrive(3, 64);
    x[threadIdx.x] = 2.f;
}

// A wgmma's shared operand overwritten by cp.async before any thread of its warpgroup waited for
// the product (`early` = 1), or after (0: fine). 128 threads, dynamic shared memory 5 KB (A and
// B, 64×16 bf16 each, after 1 KB of alignment slack); the values do not matter, the addresses do.
extern "C" __global__ void emu_test_wgmma_war(float* __restrict__ out, const float* __restrict__ src, int early) {
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* s = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    for (int e = threadIdx.x; e < 2 * 64 * 16; e += 128) reinterpret_cast<bf16*>(s)[e] = f2bf(1.f);
    __syncthreads();
    const uint32_t base = smem_addr(s);
    float d[32];
    wgmma_fence();
    // K-major, no swizzle: core matrices of 8 rows × 16 bytes, LBO between the two k halves,
    // SBO between 8-row groups.
    wgmma_m64n64k16_ss<0, 0>(d, wgmma_desc(base, 128, 256, 0), wgmma_desc(base + 2048, 128, 256, 0), 0);
    wgmma_commit();
    if (early && threadIdx.x == 0) cp_async_16(s, src);  // A's first bytes, product still running
    wgmma_wait<0>();
    __syncthreads();
    if (!early && threadIdx.x == 0) cp_async_16(s, src);
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = d[0];
}

// A wgmma wait executed by warps 0–1 of the warpgroup and not by warps 2–3 (`diverge` = 1).
extern "C" __global__ void emu_test_wgmma_divergent_wait(float* __restrict__ out, int diverge) {
    wgmma_fence();
    wgmma_commit();
    if (!diverge || threadIdx.x < 64) wgmma_wait<0>();
    out[threadIdx.x] = 1.f;
}

// Thread 0 writes a value to shared memory (dynamic, or static with `in_static`) that the other
// threads read; with `sync` a __syncthreads separates the write from the reads, without it they
// race. out[b·n + t]: what thread t of block b read; order[b]: the position at which block b ran
// (a shared counter).
extern "C" __global__ void emu_test_race(float* __restrict__ out, int* __restrict__ order,
                                         int* __restrict__ counter, int sync, int in_static) {
    STATIC_SMEM(float, st, [1]);
    DYNAMIC_SMEM(float, dyn);
    float* s = in_static ? st : dyn;
    if (threadIdx.x == 0) {
        s[0] = 1.f + blockIdx.x;
        order[blockIdx.x] = (*counter)++;  // blocks run one at a time here
    }
    if (sync) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[0];
}

// A wgmma reading operands written by st_shared (the generic proxy): `mode` 0 no fence_proxy_async
// (a fault), 1 each writer fences after its stores, 2 each reader fences after the barrier, 3 the
// writers fence before their stores (a fault). 128 threads, 5 KB of dynamic shared memory.
extern "C" __global__ void emu_test_wgmma_proxy(float* __restrict__ out, int mode) {
    DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* s = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
    if (mode == 3) fence_proxy_async();
    for (int e = threadIdx.x; e < 2 * 64 * 16; e += 128) st_shared(reinterpret_cast<bf16*>(s) + e, f2bf(1.f));
    if (mode == 1) fence_proxy_async();
    __syncthreads();
    if (mode == 2) fence_proxy_async();
    const uint32_t base = smem_addr(s);
    float d[32];
    wgmma_fence();
    wgmma_m64n64k16_ss<0, 0>(d, wgmma_desc(base, 128, 256, 0), wgmma_desc(base + 2048, 128, 256, 0), 0);
    wgmma_commit();
    wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

// common.cuh's block_sum without its first barrier: a second call's partials may overwrite the
// first call's before every warp has read them (a write-after-read race no single order shows).
__device__ float block_sum_racy(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// out[2·row] = Σ x, out[2·row + 1] = Σ x² over row `row` of x (rows × n) by block_sum_racy
// (`racy`) or block_sum.
extern "C" __global__ void emu_test_two_sums(const float* __restrict__ x, float* __restrict__ out, int n, int racy) {
    DYNAMIC_SMEM(float, scratch);
    const float* r = x + (long long)blockIdx.x * n;
    float s = 0.f, q = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        s += r[i];
        q += r[i] * r[i];
    }
    const float a = racy ? block_sum_racy(s, scratch) : block_sum(s, scratch);
    const float b = racy ? block_sum_racy(q, scratch) : block_sum(q, scratch);
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = a;
        out[2 * blockIdx.x + 1] = b;
    }
}

// When cp.async copies land: each of 32 threads copies 16 bytes (4 floats of `src`) into each of
// three regions, group 0, group 1 and a copy it never commits, and reads its own destinations back
// along the way: out[6t ..] = group 0 before any wait, group 0 and group 1 after wait<1>, group 1
// and the uncommitted copy after wait<0>, the uncommitted copy after cp_async_mbar_arrive.
// 2 KB of dynamic shared memory (the mbarrier at byte 1536).
extern "C" __global__ void emu_test_cp_async_late(float* __restrict__ out, const float* __restrict__ src) {
    DYNAMIC_SMEM(float, s);
    uint64_t* bar = reinterpret_cast<uint64_t*>(s + 3 * 128);
    const int t = threadIdx.x;
    if (t == 0) mbar_init(bar, 32);
    __syncthreads();
    float* o = out + 6 * t;
    cp_async_16(s + 4 * t, src + 4 * t);
    cp_async_commit();
    cp_async_16(s + 128 + 4 * t, src + 128 + 4 * t);
    cp_async_commit();
    o[0] = s[4 * t];
    cp_async_wait<1>();
    o[1] = s[4 * t];
    o[2] = s[128 + 4 * t];
    cp_async_16(s + 256 + 4 * t, src + 256 + 4 * t);
    cp_async_wait<0>();
    o[3] = s[128 + 4 * t];
    o[4] = s[256 + 4 * t];
    cp_async_mbar_arrive(bar);
    o[5] = s[256 + 4 * t];
    mbar_wait(bar, 0);
}

// out[i] = i for i < n + extra: with `extra` > 0 the block runs past the end of an n-element
// buffer (tests/emu.rs expects the guard page to stop it).
extern "C" __global__ void emu_test_overrun(float* __restrict__ out, int n, int extra) {
    for (int i = threadIdx.x; i < n + extra; i += blockDim.x) out[i] = (float)i;
}

// One 16-byte access at `src` + `offset` bytes by thread 0: `how` 0 cp_async_16 (into 16 bytes of
// dynamic shared memory, then out), 1 load16, 2 __ldg of a float4. A GPU faults on an offset
// that is not a multiple of 16; so must the emulator.
extern "C" __global__ void emu_test_misaligned(float* __restrict__ out, const unsigned char* __restrict__ src,
                                               int offset, int how) {
    DYNAMIC_SMEM(float, s);
    if (threadIdx.x != 0) return;
    const unsigned char* p = src + offset;
    if (how == 0) {
        cp_async_16(s, p);
        cp_async_commit();
        cp_async_wait<0>();
        for (int i = 0; i < 4; i++) out[i] = s[i];
    } else if (how == 1) {
        const pack16 v = load16(p);
        for (int i = 0; i < 4; i++) out[i] = __uint_as_float(v.w[i]);
    } else {
        const float4 v = __ldg(reinterpret_cast<const float4*>(p));
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    }
}

// A bulk tensor copy (TMA) of the 64 × 16 box of `map` at rows c2.. of head 1 into a swizzled
// tile at byte `at` of dynamic shared memory (1024 + `at` + 16 bytes: the mbarrier after the
// tile). Thread 0 arms the mbarrier with the box's 2048 bytes and issues the copy, then reads
// the tile's first element before waiting (out[16 · 64]: the poison while the copy is pending);
// with `wait`, every thread waits and the block copies the tile's raw (swizzled) bytes to out.
extern "C" __global__ void emu_test_tma(const __grid_constant__ TmaMap map, uint16_t* __restrict__ out, int c2,
                                        int at, int wait) {
    DYNAMIC_SMEM(unsigned char, raw);
    uint16_t* tile = reinterpret_cast<uint16_t*>(raw + at);
    uint64_t* bar = reinterpret_cast<uint64_t*>(raw + 1024 + at);
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, 16 * 64 * 2);
        tma_load_4d(tile, &map, 0, 1, c2, 0, bar);
        out[16 * 64] = tile[0];
    }
    if (!wait) return;
    mbar_wait(bar, 0);
    for (int i = threadIdx.x; i < 16 * 64; i += blockDim.x) out[i] = tile[i];
}
