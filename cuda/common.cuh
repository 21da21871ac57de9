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

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
// Round to nearest even, as every bf16 output of this project is written.
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// Loads element i of a tensor stored as f32 or bf16, as f32.
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16* p, long long i) { return bf2f(p[i]); }
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(bf16* p, long long i, float v) { p[i] = f2bf(v); }

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
// visible to the block). The emulator's twins (emu.h) copy synchronously.
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
