// The CPU SIMT emulator's CUDA surface (design/CUDA.md §4). `cuda/common.cuh` includes this
// header instead of the CUDA headers when ADVDMD_EMU is defined, so every `cuda/*.cu` compiles
// unchanged with g++ (C++17) and runs on the CPU.
//
// Execution model (runtime in emu.cpp): each thread of a block is a fiber on the calling OS
// thread; fibers switch only inside the collectives declared here (__syncthreads, the warp
// intrinsics, mma/ldmatrix), so between two collectives a thread runs alone. Blocks run one
// after another in linear order (x fastest), so atomics and results are deterministic.
//
// What this header provides: the qualifiers (__global__, __device__, __shared__, ...), the
// built-in index variables, bf16/fp16 types with round-to-nearest-even conversions, vector
// types, math and integer intrinsics, atomics, block and warp collectives, and warp-collective
// twins of the tensor-core wrappers of common.cuh (mma.m16n8k16 bf16, ldmatrix) that reproduce
// the PTX ISA fragment layouts.
#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

// ---- Qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// Static shared memory is declared with common.cuh's STATIC_SMEM, never `__shared__` directly:
// the emulator's twin keeps one copy per OS thread (the fibers of the running block share it) and
// poisons it when the first thread of a block reaches the declaration, as it poisons dynamic
// shared memory, so a read before any write of this block sees 0xFF bytes, not the last block's.
#define __shared__ static_assert(false, "declare static shared memory with STATIC_SMEM (cuda/common.cuh)");
#define warpSize 32

// ---- Built-in variables ----------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
// Set by the scheduler on every switch into a fiber (per OS thread, so concurrent launches from
// different threads, e.g. parallel tests, do not interfere).
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread uint3 blockDim;
extern __thread uint3 gridDim;

// ---- Vector types ------------------------------------------------------------------------------
#define ADVDMD_EMU_VEC2(T, name, al)          \
    struct __attribute__((aligned(al))) name { \
        T x, y;                                \
    };
#define ADVDMD_EMU_VEC4(T, name, al)          \
    struct __attribute__((aligned(al))) name { \
        T x, y, z, w;                          \
    };
ADVDMD_EMU_VEC2(float, float2, 8)
ADVDMD_EMU_VEC4(float, float4, 16)
ADVDMD_EMU_VEC2(int, int2, 8)
ADVDMD_EMU_VEC4(int, int4, 16)
ADVDMD_EMU_VEC2(unsigned, uint2, 8)
ADVDMD_EMU_VEC4(unsigned, uint4, 16)
ADVDMD_EMU_VEC2(double, double2, 16)
struct float3 {
    float x, y, z;
};
struct int3 {
    int x, y, z;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// ---- Runtime entry points (emu.cpp) -------------------------------------------------------------
namespace emu {
// One lane's published bytes at a warp rendezvous; the mma twin publishes the most: A's fragment,
// a tile count and up to 32 B fragments (a wgmma's n = 256 as one collective).
constexpr unsigned kSlotBytes = 288;
enum Op : int {
    kSyncwarp,
    kShfl,
    kShflXor,
    kShflUp,
    kShflDown,
    kBallot,
    kAny,
    kAll,
    kMatchAny,
    kMma,
    kLdmatrixX4,
    kLdmatrixX4Trans,
    kLdmatrixX2,
    kLdmatrixX2Trans,
    kStmatrixX4,
    kOpCount
};
// The block barrier; returns the number of threads whose `pred` was nonzero.
int block_barrier(int pred, const char* what, const char* file, int line);
// Named barrier `id` (1..15) completing at `count` threads: bar.sync (`wait`) or bar.arrive.
void named_barrier(int id, unsigned count, bool wait, const char* file, int line);
// mbarriers in dynamic shared memory (common.cuh's mbar_* wrappers): init with an arrival count,
// arrive, and wait for the phase of a parity to complete (the waiting thread spins, yielding; a
// pass of the scheduler in which only such waits ran and none completed is a deadlock).
void mbarrier_init(void* bar, unsigned count, const char* file, int line);
void mbarrier_arrive(void* bar, const char* file, int line);
void mbarrier_wait(void* bar, unsigned parity, const char* file, int line);
// An arrival that first adds `bytes` to the transactions the current phase waits for (a phase
// completes once its arrivals are in and its transactions complete).
void mbarrier_arrive_expect_tx(void* bar, unsigned bytes, const char* file, int line);
// TMA: a bulk tensor copy of the box of tensor map `map` (src/device/tma.rs's emulator layout) at
// `coords` (rank of them, innermost first) into shared `dst`, completing its bytes on mbarrier
// `bar`. As on the GPU it lands late: the block keeps it pending until a thread waits on `bar`
// in a phase it has not completed (then it lands, zeros outside the tensor, swizzled as the map
// says, and completes its bytes), so a read of `dst` before that wait sees the old bytes. Its
// destination is checked against in-flight wgmma reads when issued; its bytes are async-proxy
// writes (a wgmma may read them unfenced). A copy still pending when the block ends is a fault.
void tma_load(void* dst, const void* map, int rank, const int* coords, void* bar, const char* file, int line);
// TMA's reduction: the box of f32 tensor map `map` at `coords` += the swizzled tile at shared
// `src`, in the running thread's open bulk group. It reads src late — when a bulk_wait_read covers
// its group (then the adds are made, elements outside the tensor skipped) — so a rewrite of src
// before that wait shows in the result; src's words are checked for the proxy fence when it is
// issued. One still pending when its thread ends is a fault.
void tma_reduce_add(const void* map, int rank, const int* coords, const void* src, const char* file, int line);
void bulk_commit_group();
void bulk_wait_read_groups(int pending, const char* file, int line);
// Publishes `bytes` (<= kSlotBytes) from `in` for this lane, waits until every non-exited lane in
// `mask` has arrived at the same warp collective, and returns the rendezvous' 32 slots (lane j
// at base + j * kSlotBytes). `*arrived` gets the lanes that published. Call warp_release()
// once done reading the slots.
const unsigned char* warp_exchange(Op op, unsigned mask, const void* in, unsigned bytes,
                                   unsigned* arrived, const char* file, int line);
void warp_release();
// This thread's lane (linear thread id % 32).
unsigned lane_id();
// Records a usage error (the launch fails with EmuError::Fault) and never returns.
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
}  // namespace emu

// The block's dynamic shared memory (the launch's shared bytes, filled with 0xFF before every
// block so reads of unwritten data show up as NaN); nullptr when the launch asked for none.
unsigned char* emu_dynamic_smem();
namespace emu {
// Fills `bytes` at `storage` with 0xFF when this is the first call for `storage` in the running
// block (one launch's block, on this OS thread); returns `storage`.
void* static_smem_enter(void* storage, size_t bytes);
template <class A>
A* static_smem(A* storage) {
    return static_cast<A*>(static_smem_enter(storage, sizeof(A)));
}
}  // namespace emu

// ---- Block collectives -------------------------------------------------------------------------
#define __syncthreads() ((void)::emu::block_barrier(0, "__syncthreads", __FILE__, __LINE__))
#define __syncthreads_count(p) ::emu::block_barrier((p) != 0, "__syncthreads_count", __FILE__, __LINE__)
#define __syncthreads_and(p) \
    (::emu::block_barrier(!(p), "__syncthreads_and", __FILE__, __LINE__) == 0)
#define __syncthreads_or(p) (::emu::block_barrier((p) != 0, "__syncthreads_or", __FILE__, __LINE__) != 0)
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- Warp collectives -----------------------------------------------------------------------
// Semantics of sm_70+: a collective waits for every non-exited lane named in the mask (lanes
// beyond the end of a partial last warp count as exited). A lane that reads from a lane which
// did not take part (exited, not in the mask) gets the poison pattern (0xFF bytes: NaN for
// floats), where the GPU would give an undefined value.
namespace emu {
// Source lane of each shuffle flavour (PTX shfl.sync with c = ((32 - width) << 8) | 31): -1 when
// the source lies outside the lane's segment, where the lane keeps its own value.
inline int shfl_src(Op op, int lane, int b, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fault("shuffle width %d is not a power of two in 1..32", width);
    const int seg_lo = lane & ~(width - 1), seg_hi = seg_lo + width - 1;
    int j;
    switch (op) {
        case kShfl: return seg_lo + (b & (width - 1));
        case kShflXor: j = lane ^ b; break;
        case kShflUp: j = lane - b; break;
        default: j = lane + b; break;  // kShflDown
    }
    return (j < seg_lo || j > seg_hi) ? -1 : j;
}

template <class T>
T shfl(Op op, const char* file, int line, unsigned mask, T v, int b, int width) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kSlotBytes,
                  "shuffled type must be trivially copyable and fit a slot");
    unsigned arrived;
    const unsigned char* slots = warp_exchange(op, mask, &v, sizeof(T), &arrived, file, line);
    const int j = shfl_src(op, (int)lane_id(), b, width);
    T r = v;
    if (j >= 0) {
        if (arrived >> j & 1)
            std::memcpy(&r, slots + j * kSlotBytes, sizeof(T));
        else
            std::memset(&r, 0xFF, sizeof(T));
    }
    warp_release();
    return r;
}

inline unsigned vote(Op op, const char* file, int line, unsigned mask, int pred) {
    unsigned arrived;
    pred = pred != 0;
    const unsigned char* slots = warp_exchange(op, mask, &pred, sizeof pred, &arrived, file, line);
    unsigned ballot = 0;
    for (int j = 0; j < 32; ++j) {
        int p;
        std::memcpy(&p, slots + j * kSlotBytes, sizeof p);
        if ((arrived >> j & 1) && p) ballot |= 1u << j;
    }
    warp_release();
    if (op == kAny) return ballot != 0;
    if (op == kAll) return ballot == arrived;
    return ballot;
}

template <class T>
unsigned match_any(const char* file, int line, unsigned mask, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
    unsigned arrived;
    const unsigned char* slots = warp_exchange(kMatchAny, mask, &v, sizeof(T), &arrived, file, line);
    unsigned m = 0;
    for (int j = 0; j < 32; ++j)
        if ((arrived >> j & 1) && std::memcmp(slots + j * kSlotBytes, &v, sizeof(T)) == 0) m |= 1u << j;
    warp_release();
    return m;
}

inline void syncwarp(const char* file, int line, unsigned mask) {
    unsigned arrived;
    warp_exchange(kSyncwarp, mask, nullptr, 0, &arrived, file, line);
    warp_release();
}
}  // namespace emu

// The optional width argument of the shuffles: absent means 32.
#define ADVDMD_EMU_WIDTH(...) ::emu::width_arg(0 __VA_OPT__(, ) __VA_ARGS__)
namespace emu {
inline int width_arg(int) { return 32; }
inline int width_arg(int, int w) { return w; }
}  // namespace emu
#define __shfl_sync(mask, v, src, ...) \
    ::emu::shfl(::emu::kShfl, __FILE__, __LINE__, mask, v, src, ADVDMD_EMU_WIDTH(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, m, ...) \
    ::emu::shfl(::emu::kShflXor, __FILE__, __LINE__, mask, v, m, ADVDMD_EMU_WIDTH(__VA_ARGS__))
#define __shfl_up_sync(mask, v, d, ...) \
    ::emu::shfl(::emu::kShflUp, __FILE__, __LINE__, mask, v, (int)(d), ADVDMD_EMU_WIDTH(__VA_ARGS__))
#define __shfl_down_sync(mask, v, d, ...) \
    ::emu::shfl(::emu::kShflDown, __FILE__, __LINE__, mask, v, (int)(d), ADVDMD_EMU_WIDTH(__VA_ARGS__))
#define __ballot_sync(mask, p) ::emu::vote(::emu::kBallot, __FILE__, __LINE__, mask, (p) != 0)
#define __any_sync(mask, p) ((int)::emu::vote(::emu::kAny, __FILE__, __LINE__, mask, (p) != 0))
#define __all_sync(mask, p) ((int)::emu::vote(::emu::kAll, __FILE__, __LINE__, mask, (p) != 0))
#define __match_any_sync(mask, v) ::emu::match_any(__FILE__, __LINE__, mask, v)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__, ::emu::mask_arg(0 __VA_OPT__(, ) __VA_ARGS__))
namespace emu {
inline unsigned mask_arg(int) { return 0xffffffffu; }
inline unsigned mask_arg(int, unsigned m) { return m; }
}  // namespace emu

// ---- Math ---------------------------------------------------------------------------------------
// <cmath> supplies expf, logf, sqrtf, tanhf, fmaxf, fminf, fabsf, exp2f, log2f, fmaf, erff, powf,
// INFINITY, ... The fast-math intrinsics are computed exactly here (the GPU's are approximate).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x), *c = std::cos(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)std::floor(x); }
inline int __float2int_ru(float x) { return (int)std::ceil(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
    return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return a * b; }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
// A GPU faults ("misaligned address") on an access not aligned to its size; x86 does not, so the
// emulator checks where kernels load and store through helpers (these, common.cuh's
// load16 / store16, cp.async).
namespace emu {
inline void check_aligned(const void* p, size_t align, const char* what, const char* file, int line) {
    if ((uintptr_t)p % align) fault("%s (%s:%d): %p is not %zu-byte aligned", what, file, line, p, align);
}
}  // namespace emu
template <class T>
inline T emu_ldg(const T* p, const char* file, int line) {
    emu::check_aligned(p, alignof(T), "__ldg", file, line);
    return *p;
}
template <class T>
inline T emu_ldcs(const T* p, const char* file, int line) {
    emu::check_aligned(p, alignof(T), "__ldcs", file, line);
    return *p;
}
template <class T>
inline void emu_stcs(T* p, T v, const char* file, int line) {
    emu::check_aligned(p, alignof(T), "__stcs", file, line);
    *p = v;
}
#define __ldg(p) emu_ldg((p), __FILE__, __LINE__)
#define __ldcs(p) emu_ldcs((p), __FILE__, __LINE__)
#define __stcs(p, v) emu_stcs((p), (v), __FILE__, __LINE__)

// CUDA's device-side min/max overloads (the host has only std::min/std::max).
#define ADVDMD_EMU_MINMAX(T)                               \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
ADVDMD_EMU_MINMAX(int)
ADVDMD_EMU_MINMAX(unsigned)
ADVDMD_EMU_MINMAX(long)
ADVDMD_EMU_MINMAX(unsigned long)
ADVDMD_EMU_MINMAX(long long)
ADVDMD_EMU_MINMAX(unsigned long long)
#undef ADVDMD_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
// Mixed signedness, as CUDA's math header resolves them (to the unsigned type).
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(int a, long long b) { return min((long long)a, b); }
inline long long min(long long a, int b) { return min(a, (long long)b); }
inline long long max(int a, long long b) { return max((long long)a, b); }
inline long long max(long long a, int b) { return max(a, (long long)b); }

// ---- Atomics -------------------------------------------------------------------------------------
// Real atomics (relaxed), so the runtime stays correct if blocks ever run on several OS threads.
template <class T>
inline T emu_atomic_cas_loop_(T* p, T v, T (*f)(T, T)) {
    T old = *p;
    for (;;) {
        T upd = f(old, v);
        if (__atomic_compare_exchange(p, &old, &upd, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
}
inline float atomicAdd(float* p, float v) {
    return emu_atomic_cas_loop_<float>(p, v, [](float a, float b) { return a + b; });
}
inline double atomicAdd(double* p, double v) {
    return emu_atomic_cas_loop_<double>(p, v, [](double a, double b) { return a + b; });
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
#define ADVDMD_EMU_ATOMIC_MINMAX(T)                                                                      \
    inline T atomicMax(T* p, T v) { return emu_atomic_cas_loop_<T>(p, v, [](T a, T b) { return a < b ? b : a; }); } \
    inline T atomicMin(T* p, T v) { return emu_atomic_cas_loop_<T>(p, v, [](T a, T b) { return b < a ? b : a; }); }
ADVDMD_EMU_ATOMIC_MINMAX(int)
ADVDMD_EMU_ATOMIC_MINMAX(unsigned)
ADVDMD_EMU_ATOMIC_MINMAX(long long)
ADVDMD_EMU_ATOMIC_MINMAX(unsigned long long)
#undef ADVDMD_EMU_ATOMIC_MINMAX
template <class T>
inline T atomicExch(T* p, T v) {
    T old;
    __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
    return old;
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange(p, &cmp, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline int atomicAnd(int* p, int v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

// ---- bf16 and fp16 -----------------------------------------------------------------------------
namespace emu {
inline unsigned short f2bf_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // the canonical NaN cvt.rn.bf16 writes
    u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest, ties to even
    return (unsigned short)(u >> 16);
}
inline float bf_bits2f(unsigned short b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned short f2h_bits(float fv) {
    // Round to nearest even, subnormals included (F. Giesen's float_to_half_fast3_rtne).
    uint32_t f;
    std::memcpy(&f, &fv, 4);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t o;
    if (f >= (127u + 16u) << 23) {
        o = f > 0x7f800000u ? 0x7fff : 0x7c00;
    } else if (f < 113u << 23) {
        const uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        float magic, t;
        std::memcpy(&magic, &magic_bits, 4);
        std::memcpy(&t, &f, 4);
        t += magic;
        uint32_t tb;
        std::memcpy(&tb, &t, 4);
        o = (uint16_t)(tb - magic_bits);
    } else {
        const uint32_t mant_odd = (f >> 13) & 1u;
        f += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        f += mant_odd;
        o = (uint16_t)(f >> 13);
    }
    return (unsigned short)(o | (sign >> 16));
}
inline float h_bits2f(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0) {
        if (m == 0) {
            u = sign;
        } else {  // subnormal: normalise
            e = 127 - 15 + 1;
            while (!(m & 0x400u)) m <<= 1, --e;
            u = sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace emu

struct __nv_bfloat16_raw {
    unsigned short x;
};
// Mirrors cuda_bf16.h: 16-bit storage, implicit conversions from/to float, arithmetic operators.
struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(emu::f2bf_bits(f)) {}
    __nv_bfloat16(double f) : __x(emu::f2bf_bits((float)f)) {}
    __nv_bfloat16(int v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16(unsigned v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16(long long v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16(unsigned long long v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16(short v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16(unsigned short v) : __x(emu::f2bf_bits((float)v)) {}
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
    operator float() const { return emu::bf_bits2f(__x); }
    operator __nv_bfloat16_raw() const { return {__x}; }
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 emu_bf_from_bits_(unsigned short b) { return __nv_bfloat16_raw{b}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return emu_bf_from_bits_(emu::f2bf_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return emu_bf_from_bits_(emu::f2bf_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return emu_bf_from_bits_((unsigned short)(__float_as_uint(f) >> 16)); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf_bits2f(b.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return emu_bf_from_bits_(u); }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 v) { return {v, v}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return {x, y}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
#define ADVDMD_EMU_BF_BINOP(op)                                                                 \
    inline __nv_bfloat16 operator op(const __nv_bfloat16& a, const __nv_bfloat16& b) {          \
        return __float2bfloat16_rn(__bfloat162float(a) op __bfloat162float(b));                  \
    }                                                                                           \
    inline __nv_bfloat16& operator op##=(__nv_bfloat16 & a, const __nv_bfloat16& b) {            \
        return a = a op b;                                                                      \
    }
ADVDMD_EMU_BF_BINOP(+)
ADVDMD_EMU_BF_BINOP(-)
ADVDMD_EMU_BF_BINOP(*)
ADVDMD_EMU_BF_BINOP(/)
#undef ADVDMD_EMU_BF_BINOP
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return emu_bf_from_bits_((unsigned short)(a.__x ^ 0x8000u)); }
#define ADVDMD_EMU_BF_CMP(op) \
    inline bool operator op(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __bfloat162float(a) op __bfloat162float(b); }
ADVDMD_EMU_BF_CMP(==)
ADVDMD_EMU_BF_CMP(!=)
ADVDMD_EMU_BF_CMP(<)
ADVDMD_EMU_BF_CMP(>)
ADVDMD_EMU_BF_CMP(<=)
ADVDMD_EMU_BF_CMP(>=)
#undef ADVDMD_EMU_BF_CMP
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __float2bfloat16_rn(std::fma(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c)));
}
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16_rn(std::fmax((float)a, (float)b)); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16_rn(std::fmin((float)a, (float)b)); }

struct __half_raw {
    unsigned short x;
};
// Mirrors cuda_fp16.h's storage and conversions (operators: add them when a kernel needs them).
struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(emu::f2h_bits(f)) {}
    __half(double f) : __x(emu::f2h_bits((float)f)) {}
    __half(int v) : __x(emu::f2h_bits((float)v)) {}
    __half(unsigned v) : __x(emu::f2h_bits((float)v)) {}
    operator float() const { return emu::h_bits2f(__x); }
    operator __half_raw() const { return {__x}; }
};
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;
inline __half __float2half(float f) { return __half_raw{emu::f2h_bits(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{emu::f2h_bits(f)}; }
inline float __half2float(__half h) { return emu::h_bits2f(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }

// ---- Tensor-core twins of common.cuh's wrappers --------------------------------------------------
// Warp-collective: every lane publishes its operands, the warp meets, then each lane computes
// its own outputs from everybody's operands with the PTX ISA fragment layouts (common.cuh).
namespace emu {
void mma_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                       const char* file, int line);
void ldmatrix(Op op, uint32_t* r, const void* row, const char* file, int line);
void stmatrix(const uint32_t* r, void* row, const char* file, int line);
}  // namespace emu
#define mma_m16n8k16_bf16(d, a, b, c) ::emu::mma_bf16(d, a, b, c, __FILE__, __LINE__)
#define ldmatrix_x4(r, row) ::emu::ldmatrix(::emu::kLdmatrixX4, r, row, __FILE__, __LINE__)
#define ldmatrix_x4_trans(r, row) ::emu::ldmatrix(::emu::kLdmatrixX4Trans, r, row, __FILE__, __LINE__)
#define ldmatrix_x2(r, row) ::emu::ldmatrix(::emu::kLdmatrixX2, r, row, __FILE__, __LINE__)
#define ldmatrix_x2_trans(r, row) ::emu::ldmatrix(::emu::kLdmatrixX2Trans, r, row, __FILE__, __LINE__)
#define stmatrix_x4(row, r) ::emu::stmatrix(r, row, __FILE__, __LINE__)

// ---- wgmma twins (common.cuh's Hopper warpgroup MMA wrappers) ------------------------------------
// A shared address is an offset into the block's dynamic shared memory, where wgmma operands must
// live. Each wgmma computes at once: every lane reads its A fragment (from its registers, or
// through A's descriptor) and its B fragments through B's descriptor, then the warp runs the
// mma.m16n8k16 twin once per 8 columns. What a GPU would still be doing is checked instead:
// * the shared bytes a wgmma reads stay "in flight" until every thread of its warpgroup has
//   passed a wgmma_wait that covers it (commit groups counted per thread); a cp.async or
//   st_shared writing them before that is a fault (on a GPU: the product may read the new bytes);
// * shared bytes written through the generic proxy (cp.async, st_shared) are read by a wgmma
//   (the async proxy) only after a fence_proxy_async by the writer, after its write, or by the
//   reading thread, after the write; else a fault (PTX: the product may read stale bytes);
// * the .aligned instructions (wgmma, fence, commit, wait, setmaxnreg) must be executed alike by
//   all 128 threads of a warpgroup: each thread's sequence (kind, argument, line) is hashed and a
//   warpgroup whose warps differ is a fault at the block's end (PTX: undefined behaviour).
namespace emu {
uint32_t smem_offset(const void* p, const char* file, int line);
void wgmma_bf16(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int scale_d,
                int trans_a, int trans_b, const char* file, int line);
enum Aligned : int { kFence = 1, kCommit, kWait, kSetmaxnregInc, kSetmaxnregDec, kWgmma };
void aligned_op(Aligned kind, int arg, const char* file, int line);
// `wgmma_wait<N>()` and `setmaxnreg_*<N>()` with the caller's line: a macro names this, then the
// member template takes N.
struct AlignedAt {
    const char* file;
    int line;
    template <int N>
    void wait() const { aligned_op(kWait, N, file, line); }
    template <int N>
    void inc() const { aligned_op(kSetmaxnregInc, N, file, line); }
    template <int N>
    void dec() const { aligned_op(kSetmaxnregDec, N, file, line); }
};
// A plain store of `bytes` into shared memory at `smem` (st_shared): checked against in-flight
// wgmma reads and recorded for the proxy check — a wgmma may read shared bytes written through the
// generic proxy (plain stores, cp.async) only once the writer (after writing) or the reading
// thread (after the write) has executed fence_proxy_async.
void shared_write(void* smem, unsigned bytes, const char* file, int line);
void proxy_fence(const char* file, int line);
template <class T>
inline void st_shared_at(T* p, T v, const char* file, int line) {
    shared_write(p, sizeof(T), file, line);
    *p = v;
}
}  // namespace emu
#define st_shared(p, v) ::emu::st_shared_at((p), (v), __FILE__, __LINE__)
#define fence_proxy_async() ::emu::proxy_fence(__FILE__, __LINE__)
// common.cuh's N-generic wgmma_ss / wgmma_rs, with the caller's line (a macro names this, then
// the member template takes N and the transposes).
namespace emu {
struct WgmmaAt {
    const char* file;
    int line;
    template <int N, int TRANS_A, int TRANS_B>
    void ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) const {
        static_assert(N == 32 || N == 64 || N == 128 || N == 192, "wgmma_ss wrappers exist for N = 32, 64, 128, 192");
        wgmma_bf16(d, N, nullptr, desc_a, desc_b, scale_d, TRANS_A, TRANS_B, file, line);
    }
    template <int N, int TRANS_B>
    void rs(float* d, const uint32_t a[4], uint64_t desc_b, int scale_d) const {
        static_assert(N == 8 || N == 32 || N == 64 || N == 128, "wgmma wrappers exist for N = 8, 32, 64 and 128");
        wgmma_bf16(d, N, a, 0, desc_b, scale_d, 0, TRANS_B, file, line);
    }
};
}  // namespace emu
#define wgmma_ss ::emu::WgmmaAt{__FILE__, __LINE__}.ss
#define wgmma_rs ::emu::WgmmaAt{__FILE__, __LINE__}.rs
#define smem_addr(p) ::emu::smem_offset(p, __FILE__, __LINE__)
#define wgmma_fence() ::emu::aligned_op(::emu::kFence, 0, __FILE__, __LINE__)
#define wgmma_commit() ::emu::aligned_op(::emu::kCommit, 0, __FILE__, __LINE__)
#define wgmma_wait ::emu::AlignedAt{__FILE__, __LINE__}.wait
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n32k16_ss(float d[16], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 32, nullptr, desc_a, desc_b, scale_d, TRANS_A, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_B>
inline void wgmma_m64n32k16_rs(float d[16], const uint32_t a[4], uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 32, a, 0, desc_b, scale_d, 0, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n64k16_ss(float d[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 64, nullptr, desc_a, desc_b, scale_d, TRANS_A, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_B>
inline void wgmma_m64n64k16_rs(float d[32], const uint32_t a[4], uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 64, a, 0, desc_b, scale_d, 0, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n128k16_ss(float d[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 128, nullptr, desc_a, desc_b, scale_d, TRANS_A, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n192k16_ss(float d[96], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 192, nullptr, desc_a, desc_b, scale_d, TRANS_A, TRANS_B, __FILE__, __LINE__);
}
template <int TRANS_B>
inline void wgmma_m64n128k16_rs(float d[64], const uint32_t a[4], uint64_t desc_b, int scale_d) {
    ::emu::wgmma_bf16(d, 128, a, 0, desc_b, scale_d, 0, TRANS_B, __FILE__, __LINE__);
}

// ---- Named barriers, mbarriers, setmaxnreg (common.cuh's wrappers) --------------------------------
#define named_bar_sync(id, n) ::emu::named_barrier((id), (n), true, __FILE__, __LINE__)
#define named_bar_arrive(id, n) ::emu::named_barrier((id), (n), false, __FILE__, __LINE__)
#define mbar_init(bar, count) ::emu::mbarrier_init((bar), (count), __FILE__, __LINE__)
#define mbar_arrive(bar) ::emu::mbarrier_arrive((bar), __FILE__, __LINE__)
#define mbar_wait(bar, parity) ::emu::mbarrier_wait((bar), (parity), __FILE__, __LINE__)
// The thread's pending copies land, then the arrival (the hardware's: once they have landed).
#define cp_async_mbar_arrive(bar) (::emu::cp_async_land_all(), ::emu::mbarrier_arrive((bar), __FILE__, __LINE__))
inline void fence_mbarrier_init() {}
#define mbar_arrive_expect_tx(bar, bytes) ::emu::mbarrier_arrive_expect_tx((bar), (bytes), __FILE__, __LINE__)
namespace emu {
inline void tma_load_4d_at(void* dst, const void* map, int c0, int c1, int c2, int c3, void* bar, const char* file,
                           int line) {
    const int c[4] = {c0, c1, c2, c3};
    tma_load(dst, map, 4, c, bar, file, line);
}
}  // namespace emu
namespace emu {
inline void tma_reduce_add_4d_at(const void* map, int c0, int c1, int c2, int c3, const void* src, const char* file,
                                 int line) {
    const int c[4] = {c0, c1, c2, c3};
    tma_reduce_add(map, 4, c, src, file, line);
}
struct BulkWaitAt {
    const char* file;
    int line;
    template <int N>
    void wait() const {
        bulk_wait_read_groups(N, file, line);
    }
};
}  // namespace emu
#define tma_reduce_add_4d(map, c0, c1, c2, c3, src) \
    ::emu::tma_reduce_add_4d_at((map), (c0), (c1), (c2), (c3), (src), __FILE__, __LINE__)
inline void bulk_commit() { ::emu::bulk_commit_group(); }
#define bulk_wait_read ::emu::BulkWaitAt{__FILE__, __LINE__}.wait
#define tma_load_4d(dst, map, c0, c1, c2, c3, bar) \
    ::emu::tma_load_4d_at((dst), (map), (c0), (c1), (c2), (c3), (bar), __FILE__, __LINE__)
#define setmaxnreg_inc ::emu::AlignedAt{__FILE__, __LINE__}.inc
#define setmaxnreg_dec ::emu::AlignedAt{__FILE__, __LINE__}.dec

// ---- Launch support for the generated trampolines (build.rs) -------------------------------------
namespace emu {
// An argument's value from its pointer, copied bytewise: the pointer need only be as aligned as
// the launcher's 8-byte slots (a TmaMap asks 128).
template <class T>
T arg_value(const void* p) {
    T v;
    std::memcpy(static_cast<void*>(&v), p, sizeof(T));
    return v;
}
template <class... A, std::size_t... I>
void invoke_(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(arg_value<std::remove_cv_t<std::remove_reference_t<A>>>(args[I])...);
}
// Calls kernel `k` with each argument read from `args[i]` (a pointer to the value), exactly as
// cuLaunchKernel reads its `kernelParams`.
template <class... A>
void invoke(void (*k)(A...), void** args) {
    invoke_(k, args, std::index_sequence_for<A...>{});
}
template <class... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
}  // namespace emu

// ---- cp.async twins (common.cuh's cp_async_* wrappers) ------------------------------------------
// As on the GPU, a copy lands late: it stays pending with the issuing thread until a
// cp_async_wait<N>() covers its commit group (the N newest committed groups stay pending, copies
// not yet committed too), or until the thread's cp_async_mbar_arrive (which lands them all, then
// arrives). Until then its destination keeps its old bytes (for dynamic shared memory at first
// the 0xFF poison), so a read before the wait reads them. The source is read when it lands; the
// zfill form writes 16 zero bytes when !valid. The destination is checked against in-flight wgmma
// reads when the copy is issued, and recorded for the proxy check when it lands.
namespace emu {
void cp_async_issue(void* smem, const void* gmem, unsigned bytes, bool valid, const char* file, int line);
void cp_async_commit_group();
void cp_async_wait_groups(int pending);
void cp_async_land_all();
}  // namespace emu
#define cp_async_16(smem, gmem) ::emu::cp_async_issue((smem), (gmem), 16, true, __FILE__, __LINE__)
#define cp_async_16_zfill(smem, gmem, valid) ::emu::cp_async_issue((smem), (gmem), 16, (valid), __FILE__, __LINE__)
#define cp_async_4(smem, gmem) ::emu::cp_async_issue((smem), (gmem), 4, true, __FILE__, __LINE__)
inline void cp_async_commit() { ::emu::cp_async_commit_group(); }
template <int N>
inline void cp_async_wait() {
    ::emu::cp_async_wait_groups(N);
}
