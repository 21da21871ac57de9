// Shared by every kernel file: the bf16 type and conversions, warp/block reductions, and the
// tensor-core wrappers. The same file compiles under nvcc (GPU) and under g++ with ADVDMD_EMU
// defined (the CPU SIMT emulator, cuda/emu/), where emu.h supplies the CUDA built-ins and
// warp-collective twins of the tensor-core wrappers with the PTX ISA's fragment layouts.
#pragma once

#ifdef ADVDMD_EMU
#include "emu/emu.h"
#include <cstring>
#else
#include <cuda_bf16.h>
#include <stdint.h>
#endif

typedef __nv_bfloat16 bf16;

#define FULL_MASK 0xffffffffu

// Dynamic shared memory as a typed pointer (the emulator hands out a poisoned per-block buffer).
#ifdef ADVDMD_EMU
#define DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_smem())
#else
#define DYNAMIC_SMEM(T, name)                                   \
    extern __shared__ __align__(16) unsigned char advdmd_smem_[]; \
    T* name = reinterpret_cast<T*>(advdmd_smem_)
#endif

// Static shared memory: `STATIC_SMEM(float, scratch, [32])` is `__shared__ float scratch[32]`
// (`dims` may be empty for a scalar). The emulator's twin poisons it at each block's first use.
#ifdef ADVDMD_EMU
#define STATIC_SMEM(T, name, dims)                   \
    static thread_local T name##_emu_storage_ dims; \
    auto& name = *emu::static_smem(&name##_emu_storage_)
#else
#define STATIC_SMEM(T, name, dims) __shared__ T name dims
#endif

// Every kernel's first statement (build.rs fails the build on a kernel that does not begin with
// it). Programmatic dependent launch (sm_90; `ADVDMD_PDL=1`, src/device/cuda.rs): a kernel
// launched with the programmatic-serialization attribute may be scheduled while the grid before it
// on the stream is still running. `griddepcontrol.wait` blocks until that grid has completed and
// its writes are visible — before any global access, so nothing races — and
// `griddepcontrol.launch_dependents` lets the next kernel's blocks be scheduled once every block
// of this grid has started (they then wait at their own prologue): the launch latency and the
// next grid's block scheduling overlap this grid's last wave. Both are no-ops in a kernel launched
// without the attribute, and under the emulator, which runs launches one after another.
__device__ __forceinline__ void kernel_prologue() {
#if !defined(ADVDMD_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
// Round to nearest even, as every bf16 output of this project is written.
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// Loads element i of a tensor stored as f32 or bf16, as f32.
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16* p, long long i) { return bf2f(p[i]); }
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(bf16* p, long long i, float v) { p[i] = f2bf(v); }

// A value another block wrote in this launch, read from L2 rather than through this SM's L1
// (the last-block reductions: disc_head.cu's param_grad_tail, column_lanes.cuh's column_tail).
__device__ __forceinline__ float load_volatile(const float* p) { return *reinterpret_cast<const volatile float*>(p); }

// Whether this block is the last of `blocks` blocks sharing *ticket to get here: the count
// starts at zero and the last block sets it back to zero, so a launcher hands a launch tickets
// that are zero and that no launch running beside it holds (a ring, `KernelDevice::column_tickets`).
// The fences make each block's earlier writes visible before its count, and the counted blocks'
// writes visible to the last one (the threadFenceReduction pattern). Every thread of the block
// calls it.
__device__ __forceinline__ bool last_block_to_finish(unsigned* ticket, unsigned blocks) {
    STATIC_SMEM(unsigned, last, );
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        last = atomicAdd(ticket, 1u) == blocks - 1 ? 1u : 0u;
        if (last) *ticket = 0u;
    }
    __syncthreads();
    if (last) __threadfence();
    return last != 0u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 floats of shared memory; the call begins and ends with a barrier so
// it can be used twice in a row.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// ---- Tensor cores: mma.sync m16n8k16 (bf16 in, f32 accumulate) and ldmatrix ----------------
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"),
// with g = lane / 4 and t = lane % 4:
//   A (16×16, row-major) a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)  a[3]: (g+8, 2t+8..)
//   B (16×8, "col")      b[0]: (k = 2t..2t+1, n = g)              b[1]: (k = 2t+8.., n = g)
//   C, D (16×8, f32)     c[0], c[1]: (g, 2t), (g, 2t+1)           c[2], c[3]: (g+8, 2t), (g+8, 2t+1)
// Each uint32_t holds two bf16, the lower-indexed element in the low half.
#ifndef ADVDMD_EMU
// d = a·b + c
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
}

// ldmatrix .x4 / .x2 (optionally .trans) of 8×8 b16 matrices from shared memory. Lane l passes
// the address of row (l % 8) of matrix (l / 8) (lanes 16–31 are ignored for .x2). Without .trans,
// lane l receives in r[j] the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j; with .trans,
// elements (rows 2(l%4), 2(l%4)+1, col l/4).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
}
// stmatrix .x4 (sm_90): ldmatrix_x4's inverse — lane l passes the address of row (l % 8) of
// matrix (l / 8) and holds in r[j] the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j: an
// mma or wgmma accumulator's bf16 fragments stored as 16-byte rows, one instruction for four
// 8 × 8 blocks where st.shared takes one a lane and block.
__device__ __forceinline__ void stmatrix_x4(void* row, const uint32_t r[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smem_addr(row)), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
}
#endif

// Two floats packed as bf16x2 (lo in the low half), the register format of the fragments above.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    bf16 l = f2bf(lo), h = f2bf(hi);
    uint16_t lb = *reinterpret_cast<uint16_t*>(&l), hb = *reinterpret_cast<uint16_t*>(&h);
    return (uint32_t)lb | ((uint32_t)hb << 16);
}

// ---- 16-byte vectors: 8 bf16 or 4 f32 moved by one load/store instruction --------------------
struct __align__(16) pack16 {
    uint32_t w[4];
};

__device__ __forceinline__ float bits_to_float(uint32_t u) {
#ifdef ADVDMD_EMU
    float f;
    memcpy(&f, &u, 4);
    return f;
#else
    return __uint_as_float(u);
#endif
}

// The 8 bf16 of a pack as floats, and back (round to nearest even).
__device__ __forceinline__ void unpack_bf16x8(const pack16& p, float f[8]) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = bits_to_float(p.w[i] << 16);
        f[2 * i + 1] = bits_to_float(p.w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ pack16 pack_bf16x8(const float f[8]) {
    pack16 p;
#pragma unroll
    for (int i = 0; i < 4; i++) p.w[i] = pack_bf16x2(f[2 * i], f[2 * i + 1]);
    return p;
}
__device__ __forceinline__ pack16 load16(const void* p) { return *reinterpret_cast<const pack16*>(p); }
__device__ __forceinline__ void store16(void* p, const pack16& v) { *reinterpret_cast<pack16*>(p) = v; }
// Four floats at a 16-byte aligned address.
__device__ __forceinline__ float4 load_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store_f4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
#ifdef ADVDMD_EMU
// (the emulator's: the caller's line in the fault when the address is not 16-byte aligned)
#define load16(p) (emu::check_aligned((p), 16, "load16", __FILE__, __LINE__), load16(p))
#define store16(p, v) (emu::check_aligned((p), 16, "store16", __FILE__, __LINE__), store16((p), (v)))
#define load_f4(p) (emu::check_aligned((p), 16, "load_f4", __FILE__, __LINE__), load_f4(p))
#define store_f4(p, v) (emu::check_aligned((p), 16, "store_f4", __FILE__, __LINE__), store_f4((p), (v)))
#endif

// `x`, as a value the compiler cannot see through: it is recomputed where it is used instead of
// hoisted. For loop-invariant shared addresses that feed wgmma descriptors: hoisted out of a
// loop, every 64-bit descriptor built from them stays live across it (2 registers each), which
// spilled the d = 128 wgmma backward.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
#ifdef ADVDMD_EMU
    return x;
#else
    uint32_t y;
    asm volatile("mov.u32 %0, %1;" : "=r"(y) : "r"(x));
    return y;
#endif
}

// Whether pointers allow 16-byte accesses.
__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ---- cp.async: asynchronous global → shared copies (sm_80+) ---------------------------------
// cp_async_16 copies 16 bytes (both addresses 16-byte aligned) bypassing L1 (.cg); the _zfill
// form writes 16 zero bytes instead when !valid (src-size 0: nothing is read, but `gmem` should
// still be a mapped address); cp_async_4 copies 4 bytes (.ca, 4-byte aligned). Copies issued
// since the last cp_async_commit() form a group; cp_async_wait<N>() returns once at most N of
// this thread's groups are still pending (a __syncthreads after it makes every thread's copies
// visible to the block). The emulator's twins (emu.h) land a copy at the wait that covers it.
#ifndef ADVDMD_EMU
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif
// cp_async_mbar_arrive(bar): one arrival on the mbarrier `bar` (see mbar_* below), made by the
// hardware once every cp.async this thread issued before it has landed (.noinc: the arrival
// counts toward the barrier's initial count, so a barrier of n such threads is initialized with
// n). The issuing thread never waits: a producer keeps issuing while its copies are in flight.
// The emulator lands the thread's pending copies, then arrives.
#ifndef ADVDMD_EMU
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
#endif

// ---- wgmma: Hopper warpgroup MMA (sm_90a; a file that uses it says `advdmd-arch: 90a`) ------
// A warpgroup (4 consecutive warps, the first at a multiple of 4: 128 threads) computes
// D[64×N] (+)= A[64×16]·B[16×N] with wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16.
// Shared-memory operands are named by a 64-bit matrix descriptor (PTX ISA, "Matrix Descriptor
// Format"): bits 0–13 start address >> 4, 16–29 leading-dimension byte offset (LBO) >> 4,
// 32–45 stride-dimension byte offset (SBO) >> 4, 62–63 swizzle (0 none, 1 128 B, 2 64 B, 3 32 B).
// The canonical layouts, as byte offsets of element (i, k) from the start address, i the M (A)
// or N (B) index and k the K index (< 16), W the swizzle width in bytes (CUTLASS's GMMA atoms):
//   K-major, swizzled:   (i/8)·SBO + (i%8)·W + 2k                         (LBO unused)
//   K-major, none:       (i/8)·SBO + (i%8)·16 + (k/8)·LBO + 2(k%8)
//   MN-major, swizzled:  (i/(W/2))·LBO + 2(i%(W/2)) + (k/8)·SBO + (k%8)·W
//   MN-major, none:      (i/8)·SBO + 2(i%8) + (k/8)·LBO + (k%8)·16
// then, when swizzled, bits [4, 4+b) of the shared address are XORed with bits [7, 7+b),
// b = log2(W/16): a swizzled tile must start at a multiple of 8·W bytes. A is K-major unless
// trans_a, B (stored N × K) K-major unless trans_b.
// D fragment (N/2 floats per thread; thread t of the group, w = t/32, g = (t%32)/4, q = t%4):
//   d[4j], d[4j+1] = D(16w+g, 8j+2q), D(16w+g, 8j+2q+1);  d[4j+2], d[4j+3]: row 16w+g+8.
// The _rs form takes A from registers: warp w holds rows 16w..16w+15 as an mma.m16n8k16 A
// fragment. The calls are asynchronous: wgmma_fence() before the first (and after any other
// write to the accumulators or A registers), wgmma_commit() after a batch, wgmma_wait<N>()
// before reading the accumulators; shared memory written by ordinary stores needs
// fence_proxy_async() (then a barrier) before a wgmma reads it. The emulator's twins compute at
// once with the mma.m16n8k16 twin.
enum WgmmaSwizzle : int { kSwizzleNone = 0, kSwizzle128 = 1, kSwizzle64 = 2, kSwizzle32 = 3 };

__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_address, uint32_t lbo, uint32_t sbo,
                                               int swizzle) {
    return (uint64_t)((smem_address >> 4) & 0x3FFF) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | ((uint64_t)(swizzle & 3) << 62);
}

// wgmma_desc's low word (start address and leading byte offset) of a tile's first k-step; a
// later step's descriptor adds its byte offset / 16 (wgmma_desc_step). One add a product where
// wgmma_desc takes four or five (the products of an attention tile spent ~10 instructions each
// on their descriptors). Exact while the tile is 16-byte aligned and tile + offset < 256 KB:
// the 14-bit address field never carries into the offset's (shared memory's window: 228 KB).
__device__ __forceinline__ uint32_t wgmma_desc_lo(uint32_t smem_address, uint32_t lbo) {
    return ((smem_address >> 4) & 0x3FFF) | (((lbo >> 4) & 0x3FFF) << 16);
}
__device__ __forceinline__ uint64_t wgmma_desc_step(uint32_t lo, uint32_t byte_offset, uint32_t sbo, int swizzle) {
    return (uint64_t)(lo + (byte_offset >> 4)) | ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) |
           ((uint64_t)(swizzle & 3) << 62);
}

#ifndef ADVDMD_EMU
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// A plain store into shared memory that a wgmma reads later: the emulator's twin checks it
// against the products still reading those bytes and records it for the proxy-fence check.
template <class T>
__device__ __forceinline__ void st_shared(T* p, T v) {
    *p = v;
}

// d (+)= A·B, 64×32×16, both operands in shared memory; scale_d = 0 ignores d's old value.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float d[16], uint64_t desc_a, uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// d (+)= A·B, 64×8×16, A from registers (this warp's 16 rows as an mma A fragment): the narrowest
// product, for row sums of A against a B of ones.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n8k16_rs(float d[4], const uint32_t a[4], uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, %10;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}

// d (+)= A·B, 64×32×16, A from registers (this warp's 16 rows as an mma A fragment).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n32k16_rs(float d[16], const uint32_t a[4], uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}

// d (+)= A·B, 64×64×16, both operands in shared memory; scale_d = 0 ignores d's old value.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float d[32], uint64_t desc_a, uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// d (+)= A·B, 64×64×16, A from registers (this warp's 16 rows as an mma A fragment).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float d[32], const uint32_t a[4], uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}

// d (+)= A·B, 64×128×16, both operands in shared memory; scale_d = 0 ignores d's old value.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float d[64], uint64_t desc_a, uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// d (+)= A·B, 64×192×16, both operands in shared memory; scale_d = 0 ignores d's old value.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n192k16_ss(float d[96], uint64_t desc_a, uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// d (+)= A·B, 64×128×16, A from registers (this warp's 16 rows as an mma A fragment).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float d[64], const uint32_t a[4], uint64_t desc_b,
                                                    int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}

#endif

// ---- Warp specialization (sm_90): named barriers, mbarriers, setmaxnreg (sm_90a) --------------
// named_bar_sync(id, n) / named_bar_arrive(id, n): bar.sync / bar.arrive on barrier id (1..15; 0
// is __syncthreads) completing once n threads (a multiple of 32, whole warps) have arrived; arrive
// does not wait. mbar_*: an 8-byte mbarrier in shared memory, initialized by one thread with its
// arrival count (then fence_mbarrier_init() and a __syncthreads before anyone else uses it); each
// phase completes after `count` arrivals; mbar_wait(bar, parity) returns once the phase of that
// parity has completed (phases alternate 0, 1, 0, ...: the k-th completion, 0-based, has parity
// k & 1; waiting with parity 1 on a fresh barrier returns at once). Arrive releases and wait
// acquires at CTA scope. setmaxnreg_{inc,dec}<N>: the warpgroup's per-thread register budget
// (sm_90a; all warps of the group execute it). The emulator's twins (emu.h) count and spin.
#ifndef ADVDMD_EMU
__device__ __forceinline__ void named_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

// ---- TMA (sm_90): tensor maps and bulk tensor copies ---------------------------------------------
// TmaMap: the 128 opaque bytes of a CUtensorMap, encoded on the host (src/device/tma.rs: by the
// driver's cuTensorMapEncodeTiled on a GPU, in the emulator's own layout under it) and passed as a
// `const __grid_constant__` kernel parameter, where the copy unit reads it (param space, no global
// copy to upload or fence). A tensor of rank 4, bf16, 128-byte swizzle: box rows of 64 elements
// land as the 128-byte rows of chunk_offset's swizzled tiles (16-byte chunk c of row r at
// (c ^ r mod 8)·16, by the shared address's bits, so the destination is 1024-byte aligned).
// mbar_arrive_expect_tx(bar, bytes): the thread's arrival on `bar`, adding `bytes` to the
// transactions its phase waits for. tma_load_4d(dst, map, c0, c1, c2, c3, bar): the box at
// coordinates (c0 innermost; elements outside the tensor read as zero) into shared `dst`, one
// thread's instruction; it completes the box's bytes (all of them, zeros included) on `bar` once
// they have landed — written through the async proxy, so a wgmma reads them with no fence.
struct __align__(128) TmaMap {
    unsigned long long opaque[16];
};
#ifndef ADVDMD_EMU
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const TmaMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
        : "memory");
}
#endif

// tma_reduce_add_4d(map, c0, c1, c2, c3, src): the box of an f32 `map` at the coordinates += the
// tile at shared `src` (1024-byte aligned, swizzled as the map says), elements outside the tensor
// skipped, each add atomic (made in L2); read through the async proxy, so the generic stores that
// wrote src need a fence_proxy_async before the issue. One thread's instruction, in its bulk
// group: bulk_commit() closes the group; bulk_wait_read<N>() returns once the shared reads of all
// but the N newest groups are done (src may then be rewritten).
#ifndef ADVDMD_EMU
__device__ __forceinline__ void tma_reduce_add_4d(const TmaMap* map, int c0, int c1, int c2, int c3, const void* src) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
            reinterpret_cast<uint64_t>(map)),
        "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(src))
        : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
#endif

// Whether a block of THREADS (one producer warpgroup, the rest consumers) may move to PRODUCER and
// CONSUMER registers per thread: setmaxnreg.inc takes registers from the block's own pool and
// blocks until there are enough, so the two budgets must fit what the block was launched with —
// at most 65536 / THREADS per thread, rounded down to a multiple of 8 (168 for 384 threads: 72/216
// and 88/208 fit, 96/208 hangs every consumer warp that finds the pool empty).
template <int THREADS, int PRODUCER, int CONSUMER>
__host__ __device__ constexpr bool setmaxnreg_fits() {
    return 128 * PRODUCER + (THREADS - 128) * CONSUMER <= THREADS * ((65536 / THREADS) & ~7);
}
#ifndef ADVDMD_EMU
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

// N-generic forms (N = 32, 64 or 128; also 8 with A from registers, 192 with both operands in
// shared memory) for kernels templated on a tile width. The emulator's (emu.h) are macros, so that
// its faults name the calling line.
#ifndef ADVDMD_EMU
template <int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
    static_assert(N == 32 || N == 64 || N == 128 || N == 192, "wgmma_ss wrappers exist for N = 32, 64, 128, 192");
    if constexpr (N == 32)
        wgmma_m64n32k16_ss<TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d);
    else if constexpr (N == 64)
        wgmma_m64n64k16_ss<TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d);
    else if constexpr (N == 128)
        wgmma_m64n128k16_ss<TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d);
    else
        wgmma_m64n192k16_ss<TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d);
}
template <int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t a[4], uint64_t desc_b, int scale_d) {
    static_assert(N == 8 || N == 32 || N == 64 || N == 128, "wgmma wrappers exist for N = 8, 32, 64 and 128");
    if constexpr (N == 8)
        wgmma_m64n8k16_rs<TRANS_B>(d, a, desc_b, scale_d);
    else if constexpr (N == 32)
        wgmma_m64n32k16_rs<TRANS_B>(d, a, desc_b, scale_d);
    else if constexpr (N == 64)
        wgmma_m64n64k16_rs<TRANS_B>(d, a, desc_b, scale_d);
    else
        wgmma_m64n128k16_rs<TRANS_B>(d, a, desc_b, scale_d);
}
#endif
