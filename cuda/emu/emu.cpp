// The CPU SIMT emulator's runtime (design/CUDA.md §4): fibers, the block scheduler, block and
// warp barriers, deadlock reports, and the warp-collective tensor-core twins. The CUDA surface
// kernels compile against is emu.h; the Rust side (src/device/emu.rs) calls advdmd_emu_launch
// through the trampolines build.rs generates.
//
// One launch runs on the calling OS thread: its blocks one after another, each block's threads
// as fibers with their own stacks. A fiber runs until it reaches a collective it must wait at,
// then switches back to the scheduler, which resumes the next runnable fiber. All state is per OS
// thread, so launches from several threads (parallel tests) run side by side.
//
// The order in which a pass of the scheduler resumes the runnable fibers, and the order of the
// blocks, is the launch's schedule: forward (thread and block index order, the default), reverse,
// or a seeded shuffle drawn anew for every pass and block. A kernel is correct only if every
// order gives the same result; one that reads shared memory another thread writes without a
// barrier between them usually gives a different result (or reads the 0xFF poison) under another
// order, which is how the emulator exposes the data races it cannot see directly.
#include "emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstddef>
#include <algorithm>
#include <map>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread uint3 blockDim;
__thread uint3 gridDim;

namespace emu {
namespace {

// ---- Context switching ----------------------------------------------------------------------
// x86-64: a minimal switch saving the callee-saved registers and the FP control words (a
// ucontext swap makes a sigprocmask system call, 100× slower, and a warp shuffle costs 64
// switches). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void advdmd_emu_switch(void** save_sp, void* load_sp);
extern "C" void advdmd_emu_fiber_start();
asm(R"(
    .text
    .globl advdmd_emu_switch
    .hidden advdmd_emu_switch
    .type advdmd_emu_switch,@function
advdmd_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size advdmd_emu_switch, .-advdmd_emu_switch

    .globl advdmd_emu_fiber_start
    .hidden advdmd_emu_fiber_start
    .type advdmd_emu_fiber_start,@function
advdmd_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size advdmd_emu_fiber_start, .-advdmd_emu_fiber_start
)");

struct Ctx {
    void* sp = nullptr;
};
inline void ctx_switch(Ctx* from, Ctx* to) { advdmd_emu_switch(&from->sp, to->sp); }
// A fresh context that calls fn(arg) on the stack [lo, lo + size); fn must never return.
void ctx_init(Ctx* c, void* lo, size_t size, void (*fn)(void*), void* arg) {
    uintptr_t top = ((uintptr_t)lo + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 80);  // 16-aligned; the start stub then calls fn aligned
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(&sp[0], csr, 8);                    // mxcsr, x87 control word
    sp[1] = 0;                                      // r15
    sp[2] = 0;                                      // r14
    sp[3] = (uint64_t)fn;                           // r13
    sp[4] = (uint64_t)arg;                          // r12
    sp[5] = 0;                                      // rbx
    sp[6] = 0;                                      // rbp
    sp[7] = (uint64_t)&advdmd_emu_fiber_start;      // return address
    c->sp = sp;
}
#else
struct Ctx {
    ucontext_t uc;
};
thread_local void (*t_start_fn)(void*);
thread_local void* t_start_arg;
void ucontext_entry() { t_start_fn(t_start_arg); }
inline void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
void ctx_init(Ctx* c, void* lo, size_t size, void (*fn)(void*), void* arg) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    t_start_fn = fn;  // the same for every fiber of a launch
    t_start_arg = arg;
    makecontext(&c->uc, ucontext_entry, 0);
}
#endif

// ---- Fiber stacks ----------------------------------------------------------------------------
// 256 KiB of address space per thread, touched lazily, with a guard page below so that a kernel
// overflowing its stack crashes instead of silently corrupting the next fiber's stack.
constexpr size_t kStackBytes = 256 << 10;

struct StackPool {
    std::vector<void*> stacks;  // each kStackBytes + one guard page
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    ~StackPool() {
        for (void* s : stacks) munmap(s, kStackBytes + page);
    }
    // The usable low end of stack i, mapping more stacks as needed; nullptr if mmap fails.
    void* get(size_t i) {
        while (stacks.size() <= i) {
            void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            mprotect(m, page, PROT_NONE);
            stacks.push_back(m);
        }
        return (char*)stacks[i] + page;
    }
};
thread_local StackPool t_stacks;

// ---- Launch state ----------------------------------------------------------------------------
enum class St : uint8_t { Ready, AtBlock, AtWarp, AtNamed, Done };

// Named barriers: bar.sync / bar.arrive ids 1..15 (0 is __syncthreads).
constexpr int kNamedBarriers = 16;

struct Rdv;

// A cp.async not landed yet: its commit group is the number of groups its thread had committed
// when it was issued.
struct PendingCopy {
    unsigned char* dst;
    const unsigned char* src;
    unsigned bytes, group;
    bool valid;
    const char* file;
    int line;
};

// A bulk tensor copy (TMA) not landed yet: the tensor map's bytes (its issuer's parameter copy
// may be gone when it lands), its coordinates, destination and mbarrier.
struct PendingBulk {
    unsigned char map[128];
    int coords[5];
    unsigned char* dst;
    void* bar;
    const char* file;
    int line;
};

// A TMA reduction whose shared source is not read yet, in its thread's bulk group `group` (the
// map's bytes copied, as PendingBulk's).
struct PendingReduce {
    unsigned char map[128];
    int coords[5];
    const unsigned char* src;
    unsigned group;
    const char* file;
    int line;
};

struct Fiber {
    Ctx ctx;
    std::vector<PendingCopy> copies;
    unsigned groups;  // cp.async groups committed
    std::vector<PendingReduce> reduces;
    unsigned bulk_groups;  // bulk groups committed
    St st;
    uint3 tid;
    unsigned warp, lane;
    Rdv* rdv;  // the warp rendezvous this lane takes part in, until warp_release
    int named;     // the named barrier it waits at (St::AtNamed)
    bool spinning; // last yielded in an mbarrier wait that had not completed
    // wgmma bookkeeping: commit groups so far, groups covered by the waits so far, and the
    // .aligned instructions executed (a hash of their kinds, arguments and lines, and how many).
    unsigned commits, waited;
    uint64_t aligned_hash;
    unsigned aligned_count;
    // Where it waits (for barrier checks and deadlock reports).
    const char* what;
    const char* file;
    int line;
};

// One warp collective in progress: the lanes of `mask` meet and exchange kSlotBytes each.
struct Rdv {
    Op op;
    unsigned mask, arrived;
    bool complete;
    int readers;  // lanes that still have to read the slots
    const char* file;
    int line;
    alignas(16) unsigned char slots[32][kSlotBytes];
};

struct Warp {
    unsigned exists;  // lanes present (a partial last warp has fewer than 32)
    unsigned exited;
    std::vector<Rdv*> live;
};

const char* const kOpNames[kOpCount] = {
    "__syncwarp",      "__shfl_sync",       "__shfl_xor_sync", "__shfl_up_sync",
    "__shfl_down_sync", "__ballot_sync",     "__any_sync",      "__all_sync",
    "__match_any_sync", "mma_m16n8k16_bf16", "ldmatrix_x4",     "ldmatrix_x4_trans",
    "ldmatrix_x2",      "ldmatrix_x2_trans", "stmatrix_x4",
};

enum Code : int { kOk = 0, kBadLaunch = 1, kDeadlock = 2, kFault = 3 };

struct Launch {
    const char* name = nullptr;
    void (*tramp)(void**) = nullptr;
    void** args = nullptr;
    unsigned nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<Rdv*> free_rdvs;
    unsigned cur = 0;
    unsigned done = 0;
    Ctx sched;
    // The schedule (advdmd_emu_launch's `order`: 0 forward, 1 reverse, 2 shuffled by `seed`) and
    // the fiber order of the current pass.
    int order = 0;
    uint64_t seed = 0;
    std::vector<unsigned> pass_order;
    // Block barrier.
    unsigned bar_arrived = 0;
    int bar_count = 0, bar_result = 0;
    const char* bar_file = nullptr;
    int bar_line = 0;
    bool bar_divergent = false;
    // Named barriers: arrivals so far and the count they complete at (0: idle).
    unsigned named_arrived[kNamedBarriers] = {};
    unsigned named_count[kNamedBarriers] = {};
    // Spin detection: set by a spinning mbarrier wait before it yields, and when one completes.
    bool yield_was_spin = false, spin_done = false;
    // Dynamic shared memory.
    unsigned char* smem = nullptr;
    size_t smem_cap = 0, smem_bytes = 0;
    // In-flight wgmma reads: per 16-byte chunk of dynamic shared memory, how many element reads
    // of products not yet waited for touch it, and the line of the last such product; per
    // warpgroup, the chunks each commit group read and how many groups are known complete.
    std::vector<uint32_t> chunk_readers;
    std::vector<int> chunk_line;
    struct WarpgroupReads {
        struct Group {
            std::vector<uint32_t> chunks;
            unsigned passed = 0;  // threads of the warpgroup past a wait that covers the group
        };
        std::map<unsigned, Group> groups;
    };
    std::vector<WarpgroupReads> wg_reads;
    // The proxy check: per 4-byte word of dynamic shared memory, when (an epoch of this block's
    // clock, 0: not since the block began) and by which thread and line it was last written
    // through the generic proxy; per thread, the epoch of its last fence_proxy_async.
    uint64_t epoch = 0;
    std::vector<uint64_t> word_epoch;
    std::vector<uint32_t> word_writer;
    std::vector<int> word_line;
    std::vector<const char*> word_file;
    std::vector<uint64_t> fence_epoch;
    // Bulk tensor copies pending (the block's, not a thread's: they land when a thread waits on
    // their mbarrier), and each mbarrier's outstanding transaction bytes (by shared offset).
    std::vector<PendingBulk> bulk;
    std::unordered_map<size_t, int64_t> mbar_tx;
    // The first error.
    int code = kOk;
    std::string err;

    ~Launch() {
        for (auto& w : warps)
            for (Rdv* r : w.live) delete r;
        for (Rdv* r : free_rdvs) delete r;
        std::free(smem);
    }
};

// The state of launches on this OS thread (kept between launches to reuse its allocations) and
// the launch in progress (null outside one).
thread_local Launch t_state;
thread_local Launch* g = nullptr;

inline Fiber& cur_fiber() { return g->fibers[g->cur]; }

// Suspends the running fiber until the scheduler resumes it.
inline void yield() { ctx_switch(&cur_fiber().ctx, &g->sched); }

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

std::string where() {
    return fmt("kernel %s, block (%u,%u,%u) of grid (%u,%u,%u), block dims (%u,%u,%u)", g->name,
               blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, blockDim.x,
               blockDim.y, blockDim.z);
}

// Ends the launch with an error from inside a fiber: the fiber is abandoned mid-kernel.
[[noreturn]] void fail(int code, std::string msg) {
    if (g->code == kOk) {
        g->code = code;
        g->err = std::move(msg);
    }
    for (;;) yield();  // the scheduler stops at the error and never resumes this fiber
}

void set_ready(Fiber& f) {
    f.st = St::Ready;
}

// Completes rdv `r` of warp `w` if every non-exited lane of its mask has arrived; wakes the
// waiting lanes other than the running fiber.
bool try_complete(Warp& w, unsigned warp_index, Rdv* r) {
    const unsigned need = r->mask & w.exists & ~w.exited;
    if ((r->arrived & need) != need) return false;
    r->complete = true;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(r->arrived >> l & 1)) continue;
        Fiber& f = g->fibers[warp_index * 32 + l];
        if (f.st == St::AtWarp) set_ready(f);
    }
    return true;
}

void fiber_entry(void*) {
    g->tramp(g->args);
    Fiber& f = cur_fiber();
    if (!f.reduces.empty())
        fault("a thread ended with %zu TMA reductions whose shared source was not yet read, the first "
              "issued at %s:%d (no bulk_wait_read covered it: the block's shared memory may be gone "
              "before they read it)",
              f.reduces.size(), f.reduces[0].file, f.reduces[0].line);
    f.st = St::Done;
    ++g->done;
    Warp& w = g->warps[f.warp];
    w.exited |= 1u << f.lane;
    // Lanes waiting only for this one at a warp collective may go on (sm_70+ semantics).
    for (Rdv* r : w.live)
        if (!r->complete) try_complete(w, f.warp, r);
    for (;;) yield();
}

// "3" or "3-17": runs of consecutive ids.
std::string ranges(const std::vector<unsigned>& ids) {
    std::string s;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (!s.empty()) s += ",";
        s += j == i ? fmt("%u", ids[i]) : fmt("%u-%u", ids[i], ids[j]);
        i = j + 1;
    }
    return s;
}

// Groups the threads of the block by what they are doing, for error messages.
std::string block_picture() {
    struct Group {
        std::string label;
        std::vector<unsigned> ids;
    };
    std::vector<Group> groups;
    for (unsigned i = 0; i < g->nthreads; ++i) {
        const Fiber& f = g->fibers[i];
        std::string label;
        switch (f.st) {
            case St::Done: label = "have exited"; break;
            case St::Ready:
                label = f.spinning ? fmt("spin at %s (%s:%d)", f.what, f.file, f.line) : "are runnable";
                break;
            case St::AtNamed: label = fmt("wait at %s %d (%s:%d)", f.what, f.named, f.file, f.line); break;
            case St::AtBlock: label = fmt("wait at %s (%s:%d)", f.what, f.file, f.line); break;
            case St::AtWarp: {
                const Warp& w = g->warps[f.warp];
                const unsigned missing = f.rdv->mask & w.exists & ~w.exited & ~f.rdv->arrived;
                label = fmt("wait at %s (%s:%d) with mask 0x%08x for lanes 0x%08x of warp %u", f.what,
                            f.file, f.line, f.rdv->mask, missing, f.warp);
                break;
            }
        }
        auto it = groups.begin();
        while (it != groups.end() && it->label != label) ++it;
        if (it == groups.end()) {
            groups.push_back({label, {}});
            it = groups.end() - 1;
        }
        it->ids.push_back(i);
    }
    std::string s;
    for (auto& gr : groups) s += fmt("\n  threads %s %s", ranges(gr.ids).c_str(), gr.label.c_str());
    return s;
}

Rdv* new_rdv() {
    if (g->free_rdvs.empty()) return new Rdv;
    Rdv* r = g->free_rdvs.back();
    g->free_rdvs.pop_back();
    return r;
}

// Runs one block to completion; false on deadlock or fault (g->code, g->err set).
// The .aligned rule at the block's end: the threads of each whole warpgroup executed the same
// sequence of wgmma / fence / commit / wait / setmaxnreg instructions.
bool warpgroups_aligned() {
    Launch& L = *g;
    for (unsigned wg = 0; 128 * (wg + 1) <= L.nthreads; ++wg) {
        const Fiber& first = L.fibers[128 * wg];
        for (unsigned i = 128 * wg + 1; i < 128 * (wg + 1); ++i) {
            const Fiber& f = L.fibers[i];
            if (f.aligned_hash == first.aligned_hash && f.aligned_count == first.aligned_count) continue;
            L.code = kFault;
            L.err = where() + fmt(": threads %u and %u of warpgroup %u executed different sequences of "
                                  ".aligned instructions (wgmma, fence, commit, wait, setmaxnreg: %u and %u "
                                  "of them). PTX requires every thread of the warpgroup to execute the same "
                                  "one: one in a branch that differs between its warps is undefined",
                                  128 * wg, i, wg, first.aligned_count, f.aligned_count);
            return false;
        }
    }
    return true;
}

// splitmix64: the shuffled schedule's random stream.
uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// 0..n−1 in the schedule's order; `salt` makes each shuffle (a pass of a block, or a grid) its own.
void schedule_order(std::vector<unsigned>& out, unsigned n, int order, uint64_t seed, uint64_t salt) {
    out.resize(n);
    for (unsigned i = 0; i < n; ++i) out[i] = order == 1 ? n - 1 - i : i;
    if (order != 2) return;
    uint64_t state = mix64(seed ^ mix64(salt));
    for (unsigned i = n; i > 1; --i) {
        state = mix64(state);
        std::swap(out[i - 1], out[state % i]);
    }
}

// Which block of this OS thread is running (counts every block of every launch), and the block
// in which each static shared array was last poisoned.
thread_local uint64_t t_block_serial = 0;
thread_local std::unordered_map<void*, uint64_t> t_static_smem_block;

bool run_block(uint64_t block_linear) {
    Launch& L = *g;
    ++t_block_serial;
    if (L.smem_bytes) std::memset(L.smem, 0xFF, L.smem_bytes);
    L.chunk_readers.assign(L.smem_bytes / 16 + 1, 0);
    L.chunk_line.assign(L.smem_bytes / 16 + 1, 0);
    L.wg_reads.assign((L.nthreads + 127) / 128, Launch::WarpgroupReads{});
    L.epoch = 0;
    L.word_epoch.assign(L.smem_bytes / 4 + 1, 0);
    L.word_writer.assign(L.smem_bytes / 4 + 1, 0);
    L.word_line.assign(L.smem_bytes / 4 + 1, 0);
    L.word_file.assign(L.smem_bytes / 4 + 1, nullptr);
    L.fence_epoch.assign(L.nthreads, 0);
    L.bulk.clear();
    L.mbar_tx.clear();
    for (auto& w : L.warps) {
        for (Rdv* r : w.live) L.free_rdvs.push_back(r);
        w.live.clear();
        w.exited = 0;
    }
    L.done = 0;
    L.bar_arrived = 0;
    L.bar_divergent = false;
    for (int b = 0; b < kNamedBarriers; ++b) L.named_arrived[b] = L.named_count[b] = 0;
    for (unsigned i = 0; i < L.nthreads; ++i) {
        Fiber& f = L.fibers[i];
        f.st = St::Ready;
        f.rdv = nullptr;
        f.spinning = false;
        f.commits = f.waited = 0;
        f.copies.clear();
        f.groups = 0;
        f.reduces.clear();
        f.bulk_groups = 0;
        f.aligned_hash = 0;
        f.aligned_count = 0;
        ctx_init(&f.ctx, t_stacks.get(i), kStackBytes, fiber_entry, nullptr);
    }
    // Under a shuffle a random half of the block's warps is slow: a pass holds them back, so the
    // others run ahead to wherever they must wait for them (a barrier, a collective, an mbarrier
    // only they complete), and only a pass that changed nothing is followed by a full pass, which
    // runs every runnable thread — and only a full pass can find a deadlock. A warp that reads
    // shared memory after a barrier then runs after the other warps' next writes to it.
    const uint64_t slow = L.order == 2 ? mix64(L.seed ^ mix64(~block_linear)) : 0;
    bool full = L.order != 2;
    for (uint64_t pass = 0; L.done < L.nthreads; ++pass) {
        bool ran = false, progress = false, held = false;
        const uint64_t salt = block_linear << 32 ^ pass;
        if (L.order != 0 || pass == 0) schedule_order(L.pass_order, L.nthreads, L.order, L.seed, salt);
        const uint64_t hold = full ? 0 : slow;
        for (unsigned i : L.pass_order) {
            Fiber& f = L.fibers[i];
            if (f.st != St::Ready) continue;
            if (hold >> (f.warp % 64) & 1) {
                held = true;
                continue;
            }
            L.cur = i;
            threadIdx = f.tid;
            L.yield_was_spin = L.spin_done = false;
            ctx_switch(&L.sched, &f.ctx);
            ran = true;
            progress |= !L.yield_was_spin || L.spin_done;
            if (L.code != kOk) return false;
        }
        if (held) {
            full = !ran || !progress;
            continue;
        }
        if (L.order == 2) full = !progress;
        // A pass in which every thread that ran only re-tested an mbarrier that did not complete
        // changed nothing: the next one would repeat it forever.
        if (ran && !progress) {
            L.code = kDeadlock;
            L.err = where() + ": no thread can make progress (mbarrier waits that nothing can "
                              "complete):" + block_picture();
            return false;
        }
        if (!ran && L.done < L.nthreads) {
            bool exited_at_bar = false;
            for (unsigned i = 0; i < L.nthreads; ++i) exited_at_bar |= L.fibers[i].st == St::Done;
            L.code = kDeadlock;
            L.err = where() + ": no thread can make progress:" + block_picture();
            if (exited_at_bar && L.bar_arrived)
                L.err += "\n  (CUDA requires every thread of the block to reach each __syncthreads; "
                         "threads that exit early make it undefined behaviour)";
            return false;
        }
    }
    if (!L.bulk.empty()) {
        L.code = kFault;
        L.err = where() + fmt(": the block ended with %zu bulk tensor copies pending, the first issued at %s:%d "
                              "(no thread waited on its mbarrier: on a GPU it may land after the block's "
                              "shared memory is gone)",
                              L.bulk.size(), L.bulk[0].file, L.bulk[0].line);
        return false;
    }
    for (int b = 0; b < kNamedBarriers; ++b)
        if (L.named_arrived[b]) {
            L.code = kDeadlock;
            L.err = where() + fmt(": the block ended with %u of %u threads arrived at named barrier %d "
                                  "(an arrive nothing waited for)",
                                  L.named_arrived[b], L.named_count[b], b);
            return false;
        }
    return warpgroups_aligned();
}

}  // namespace

// ---- Collectives (called from kernel code, on a fiber) -----------------------------------------
int block_barrier(int pred, const char* what, const char* file, int line) {
    Launch& L = *g;
    Fiber& f = cur_fiber();
    if (L.bar_arrived == 0) {
        L.bar_count = 0;
        L.bar_file = file;
        L.bar_line = line;
    } else if (line != L.bar_line || std::strcmp(file, L.bar_file) != 0) {
        L.bar_divergent = true;
    }
    f.what = what;
    f.file = file;
    f.line = line;
    L.bar_count += pred;
    if (++L.bar_arrived < L.nthreads) {
        f.st = St::AtBlock;
        yield();
        return L.bar_result;
    }
    if (L.bar_divergent) {
        f.st = St::AtBlock;  // so that the picture shows this thread's barrier too
        fail(kDeadlock, where() + ": threads meet at different __syncthreads (divergent barrier):" +
                            block_picture());
    }
    L.bar_arrived = 0;
    L.bar_divergent = false;
    L.bar_result = L.bar_count;
    for (unsigned i = 0; i < L.nthreads; ++i)
        if (L.fibers[i].st == St::AtBlock) set_ready(L.fibers[i]);
    return L.bar_result;
}

void named_barrier(int id, unsigned count, bool wait, const char* file, int line) {
    Launch& L = *g;
    Fiber& f = cur_fiber();
    const char* what = wait ? "bar.sync" : "bar.arrive";
    if (id < 1 || id >= kNamedBarriers)
        fault("%s (%s:%d): barrier id %d is not in 1..15 (0 is __syncthreads)", what, file, line, id);
    if (count == 0 || count % 32 || count > L.nthreads)
        fault("%s (%s:%d): thread count %u must be a nonzero multiple of 32, at most the block's %u",
              what, file, line, count, L.nthreads);
    if (L.named_arrived[id] && L.named_count[id] != count)
        fault("%s (%s:%d): barrier %d used with count %u while %u threads are arrived for count %u",
              what, file, line, id, count, L.named_arrived[id], L.named_count[id]);
    L.named_count[id] = count;
    if (++L.named_arrived[id] == count) {
        L.named_arrived[id] = 0;
        for (unsigned i = 0; i < L.nthreads; ++i)
            if (L.fibers[i].st == St::AtNamed && L.fibers[i].named == id) set_ready(L.fibers[i]);
        return;
    }
    if (!wait) return;
    f.st = St::AtNamed;
    f.named = id;
    f.what = what;
    f.file = file;
    f.line = line;
    yield();
}

// An mbarrier's 8 bytes here: pending arrivals (u32), the count it was initialized with (u16) and
// the number of completed phases (u16).
struct Mbar {
    uint32_t pending;
    uint16_t expected, phase;
};
static_assert(sizeof(Mbar) == 8, "an mbarrier is 8 bytes");

static Mbar* mbar_at(void* bar, const char* what, const char* file, int line) {
    unsigned char* c = static_cast<unsigned char*>(bar);
    if (!g->smem || c < g->smem || c + 8 > g->smem + g->smem_bytes || (c - g->smem) % 8)
        fault("%s (%s:%d): %p is not an 8-byte aligned slot of the block's dynamic shared memory",
              what, file, line, bar);
    return static_cast<Mbar*>(bar);
}

static size_t mbar_offset(const void* bar) { return (size_t)(static_cast<const unsigned char*>(bar) - g->smem); }

void mbarrier_init(void* bar, unsigned count, const char* file, int line) {
    if (count == 0 || count >= 0xFFFF) fault("mbarrier init (%s:%d): count %u", file, line, count);
    Mbar* m = mbar_at(bar, "mbarrier init", file, line);
    *m = Mbar{count, (uint16_t)count, 0};
    g->mbar_tx.erase(mbar_offset(bar));
}

// The phase completes once its arrivals are in and no transaction bytes are outstanding.
static void mbar_complete_if_done(Mbar* m, const void* bar) {
    auto tx = g->mbar_tx.find(mbar_offset(bar));
    if (m->pending != 0 || (tx != g->mbar_tx.end() && tx->second != 0)) return;
    m->pending = m->expected;
    m->phase++;
}

void mbarrier_arrive(void* bar, const char* file, int line) {
    Mbar* m = mbar_at(bar, "mbarrier arrive", file, line);
    if (m->expected == 0xFFFF || m->expected == 0)
        fault("mbarrier arrive (%s:%d): the mbarrier was not initialized", file, line);
    if (m->pending == 0)
        fault("mbarrier arrive (%s:%d): the phase has all %u arrivals already and waits for its transaction "
              "bytes: one arrival too many",
              file, line, m->expected);
    --m->pending;
    mbar_complete_if_done(m, bar);
    g->spin_done = true;  // a state change: other threads' waits may now complete
}

void mbarrier_arrive_expect_tx(void* bar, unsigned bytes, const char* file, int line) {
    mbar_at(bar, "mbarrier arrive.expect_tx", file, line);
    if (bytes >= (1u << 20))
        fault("mbarrier arrive.expect_tx (%s:%d): %u bytes, past the 2^20 - 1 a phase can count", file, line, bytes);
    g->mbar_tx[mbar_offset(bar)] += bytes;
    mbarrier_arrive(bar, file, line);
}

static bool land_bulk_for(const void* bar);

void mbarrier_wait(void* bar, unsigned parity, const char* file, int line) {
    Fiber& f = cur_fiber();
    Mbar* m = mbar_at(bar, "mbarrier wait", file, line);
    if (m->expected == 0xFFFF || m->expected == 0)
        fault("mbarrier wait (%s:%d): the mbarrier was not initialized", file, line);
    // The phase of parity `parity` is complete once the current phase's parity differs from it.
    while ((m->phase & 1u) == (parity & 1u)) {
        if (land_bulk_for(bar)) continue;  // the copies it waits for land now
        f.spinning = true;
        f.what = "mbarrier wait";
        f.file = file;
        f.line = line;
        g->yield_was_spin = true;
        yield();
    }
    if (f.spinning) g->spin_done = true;
    f.spinning = false;
}

const unsigned char* warp_exchange(Op op, unsigned mask, const void* in, unsigned bytes,
                                   unsigned* arrived, const char* file, int line) {
    Launch& L = *g;
    Fiber& f = cur_fiber();
    Warp& w = L.warps[f.warp];
    const unsigned bit = 1u << f.lane;
    if (!(mask & bit))
        fault("%s (%s:%d) with mask 0x%08x called by lane %u, which is not in the mask", kOpNames[op],
              file, line, mask, f.lane);
    Rdv* r = nullptr;
    for (Rdv* x : w.live)
        if (!x->complete && x->mask == mask) r = x;
    if (!r) {
        r = new_rdv();
        r->op = op;
        r->mask = mask;
        r->arrived = 0;
        r->complete = false;
        r->readers = 0;
        r->file = file;
        r->line = line;
        w.live.push_back(r);
    } else if (r->op != op) {
        fault("warp %u: lanes 0x%08x are at %s (%s:%d) while lane %u calls %s (%s:%d) with the "
              "same mask 0x%08x",
              f.warp, r->arrived, kOpNames[r->op], r->file, r->line, f.lane, kOpNames[op], file, line,
              mask);
    }
    if (bytes) std::memcpy(r->slots[f.lane], in, bytes);
    r->arrived |= bit;
    r->readers++;
    f.rdv = r;
    f.what = kOpNames[op];
    f.file = file;
    f.line = line;
    if (!try_complete(w, f.warp, r)) {
        f.st = St::AtWarp;
        yield();
    }
    *arrived = r->arrived;
    return &r->slots[0][0];
}

void warp_release() {
    Fiber& f = cur_fiber();
    Rdv* r = f.rdv;
    f.rdv = nullptr;
    if (--r->readers > 0) return;
    auto& live = g->warps[f.warp].live;
    for (size_t i = 0; i < live.size(); ++i)
        if (live[i] == r) {
            live[i] = live.back();
            live.pop_back();
            break;
        }
    g->free_rdvs.push_back(r);
}

unsigned lane_id() { return cur_fiber().lane; }

void fault(const char* f, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    if (!g) {  // not inside a launch: nothing to report to
        std::fprintf(stderr, "advdmd emulator: %s\n", buf);
        std::abort();
    }
    const Fiber& fb = cur_fiber();
    fail(kFault, where() + fmt(", thread (%u,%u,%u): ", fb.tid.x, fb.tid.y, fb.tid.z) + buf);
}

// ---- Tensor cores ------------------------------------------------------------------------------
// `nj` mma m16n8k16 tiles of one warp that share A (a wgmma's n/8 tiles, or one mma.sync): tile j's
// B fragment b[j], its C c[4j..4j+3] and D d[4j..4j+3]. One warp collective for all of them.
constexpr int kMaxTiles = 32;  // a wgmma's n = 256
static void mma_tiles(float* d, int nj, const uint32_t a[4], const uint32_t (*b)[2], const float* c,
                      const char* file, int line) {
    struct In {
        uint32_t a[4];
        uint32_t nj;
        uint32_t b[kMaxTiles][2];
    } in;
    static_assert(sizeof(In) <= kSlotBytes, "mma operands fit a slot");
    if (nj < 1 || nj > kMaxTiles) fault("mma (%s:%d): %d tiles, not 1 to %d", file, line, nj, kMaxTiles);
    std::memcpy(in.a, a, sizeof in.a);
    in.nj = (uint32_t)nj;
    std::memcpy(in.b, b, sizeof(uint32_t[2]) * nj);
    float out[4 * kMaxTiles];
    std::memcpy(out, c, sizeof(float) * 4 * nj);  // c may be d
    unsigned arrived;
    const unsigned char* s = warp_exchange(kMma, 0xffffffffu, &in, offsetof(In, b) + sizeof(uint32_t[2]) * nj,
                                           &arrived, file, line);
    if (arrived != 0xffffffffu)
        fault("mma_m16n8k16_bf16 (%s:%d) needs all 32 lanes; lanes 0x%08x took part", file, line,
              arrived);
    for (unsigned l = 0; l < 32; ++l) {
        uint32_t n;
        std::memcpy(&n, s + l * kSlotBytes + offsetof(In, nj), sizeof n);
        if (n != in.nj)
            fault("mma (%s:%d): lane %u multiplies %u tiles, lane %u %u", file, line, lane_id(), in.nj, l, n);
    }
    // A is 16×16 row-major, each B 16×8 (k × n); fragments as in common.cuh with g = lane/4,
    // t = lane%4. This lane's outputs need rows g and g + 8 of A (held by lanes 4g..4g+3) and
    // columns 2t and 2t + 1 of each B (column n held by lanes 4n..4n+3): only those are unpacked.
    auto lo = [](uint32_t w) { return bf_bits2f((unsigned short)(w & 0xffff)); };
    auto hi = [](uint32_t w) { return bf_bits2f((unsigned short)(w >> 16)); };
    auto word = [&](unsigned l, size_t off) {
        uint32_t w;
        std::memcpy(&w, s + l * kSlotBytes + off, sizeof w);
        return w;
    };
    const unsigned gr = lane_id() >> 2, t = lane_id() & 3;
    float A[2][16];  // A[r][k]: row g + 8r
    for (unsigned q = 0; q < 4; ++q) {
        uint32_t x[4];
        for (unsigned i = 0; i < 4; ++i) x[i] = word(4 * gr + q, offsetof(In, a) + 4 * i);
        A[0][2 * q] = lo(x[0]), A[0][2 * q + 1] = hi(x[0]);
        A[1][2 * q] = lo(x[1]), A[1][2 * q + 1] = hi(x[1]);
        A[0][2 * q + 8] = lo(x[2]), A[0][2 * q + 9] = hi(x[2]);
        A[1][2 * q + 8] = lo(x[3]), A[1][2 * q + 9] = hi(x[3]);
    }
    for (int j = 0; j < nj; ++j) {
        float B[2][16];  // B[c][k]: column 2t + c of tile j
        for (unsigned cc = 0; cc < 2; ++cc)
            for (unsigned q = 0; q < 4; ++q) {
                const unsigned l = 4 * (2 * t + cc) + q;
                const uint32_t b0 = word(l, offsetof(In, b) + 8 * j), b1 = word(l, offsetof(In, b) + 8 * j + 4);
                B[cc][2 * q] = lo(b0), B[cc][2 * q + 1] = hi(b0);
                B[cc][2 * q + 8] = lo(b1), B[cc][2 * q + 9] = hi(b1);
            }
        for (int i = 0; i < 4; ++i) {
            // d[i] is (row g + 8·(i / 2), column 2t + i % 2). Products of bf16 values are exact
            // in f32; the sum runs in k order.
            float acc = out[4 * j + i];
            for (int k = 0; k < 16; ++k) acc += A[i >> 1][k] * B[i & 1][k];
            out[4 * j + i] = acc;
        }
    }
    warp_release();
    std::memcpy(d, out, sizeof(float) * 4 * nj);
}

void mma_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                       const char* file, int line) {
    const uint32_t tile[1][2] = {{b[0], b[1]}};
    mma_tiles(d, 1, a, tile, c, file, line);
}

void ldmatrix(Op op, uint32_t* r, const void* row, const char* file, int line) {
    const bool x4 = op == kLdmatrixX4 || op == kLdmatrixX4Trans;
    const bool trans = op == kLdmatrixX4Trans || op == kLdmatrixX2Trans;
    const unsigned lane = lane_id();
    if ((x4 || lane < 16) && ((uintptr_t)row & 15))
        fault("%s (%s:%d): row address %p is not 16-byte aligned", kOpNames[op], file, line, row);
    unsigned arrived;
    const unsigned char* s = warp_exchange(op, 0xffffffffu, &row, sizeof row, &arrived, file, line);
    if (arrived != 0xffffffffu)
        fault("%s (%s:%d) needs all 32 lanes; lanes 0x%08x took part", kOpNames[op], file, line, arrived);
    auto row_of = [&](unsigned l) {
        const unsigned char* p;
        std::memcpy(&p, s + l * kSlotBytes, sizeof p);
        return p;
    };
    const unsigned n = x4 ? 4 : 2;
    uint32_t out[4];
    for (unsigned j = 0; j < n; ++j) {
        uint16_t lo, hi;
        if (!trans) {  // (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j
            const unsigned char* p = row_of(j * 8 + lane / 4) + 4 * (lane % 4);
            std::memcpy(&lo, p, 2);
            std::memcpy(&hi, p + 2, 2);
        } else {  // (rows 2(l%4), 2(l%4)+1, col l/4) of matrix j
            std::memcpy(&lo, row_of(j * 8 + 2 * (lane % 4)) + 2 * (lane / 4), 2);
            std::memcpy(&hi, row_of(j * 8 + 2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
        }
        out[j] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    warp_release();
    std::memcpy(r, out, n * sizeof(uint32_t));
}

// Every lane publishes its row address and its four registers; lane l then writes the 16 bytes of
// row l % 8 of matrix l / 8 (register l / 8 of lanes 4(l % 8) … 4(l % 8) + 3), through the
// generic proxy as an st.shared would.
void stmatrix(const uint32_t* r, void* row, const char* file, int line) {
    struct Pub {
        void* row;
        uint32_t v[4];
    } pub{row, {r[0], r[1], r[2], r[3]}};
    static_assert(sizeof(Pub) <= kSlotBytes, "a lane's stmatrix operands fit its slot");
    if ((uintptr_t)row & 15)
        fault("stmatrix_x4 (%s:%d): row address %p is not 16-byte aligned", file, line, row);
    unsigned arrived;
    const unsigned char* s = warp_exchange(kStmatrixX4, 0xffffffffu, &pub, sizeof pub, &arrived, file, line);
    if (arrived != 0xffffffffu)
        fault("stmatrix_x4 (%s:%d) needs all 32 lanes; lanes 0x%08x took part", file, line, arrived);
    const unsigned lane = lane_id(), m = lane / 8, q = lane % 8;
    uint32_t bytes[4];
    for (unsigned k = 0; k < 4; ++k) {
        Pub o;
        std::memcpy(&o, s + (4 * q + k) * kSlotBytes, sizeof o);
        bytes[k] = o.v[m];
    }
    warp_release();
    shared_write(row, 16, file, line);
    std::memcpy(row, bytes, 16);
}

}  // namespace emu

unsigned char* emu_dynamic_smem() { return emu::g ? emu::g->smem : nullptr; }

void* emu::static_smem_enter(void* storage, size_t bytes) {
    uint64_t& poisoned_in = t_static_smem_block[storage];
    if (poisoned_in != t_block_serial) {
        std::memset(storage, 0xFF, bytes);
        poisoned_in = t_block_serial;
    }
    return storage;
}

// ---- wgmma twins --------------------------------------------------------------------------------
namespace emu {
uint32_t smem_offset(const void* p, const char* file, int line) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (!g || c < g->smem || c > g->smem + g->smem_bytes)
        fault("smem_addr (%s:%d): %p is not in the block's dynamic shared memory", file, line, p);
    return (uint32_t)(c - g->smem);
}

// Element (i, k) of a wgmma operand named by `desc` (common.cuh lists the layouts): i the M or N
// index, k the K index; `mn_major` for the transposed layouts.
static const unsigned char* wgmma_element(uint64_t desc, bool mn_major, unsigned i, unsigned k,
                                          const char* file, int line) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
    const uint32_t lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    const unsigned mode = (unsigned)(desc >> 62);
    const uint32_t w = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
    uint32_t off;
    if (w == 0)
        off = mn_major ? (i / 8) * sbo + 2 * (i % 8) + (k / 8) * lbo + (k % 8) * 16
                       : (i / 8) * sbo + (i % 8) * 16 + (k / 8) * lbo + 2 * (k % 8);
    else
        off = mn_major ? (i / (w / 2)) * lbo + 2 * (i % (w / 2)) + (k / 8) * sbo + (k % 8) * w
                       : (i / 8) * sbo + (i % 8) * w + 2 * k;
    uint32_t addr = start + off;
    if (w) addr ^= ((addr >> 7) & (w / 16 - 1)) << 4;
    if (addr + 2 > g->smem_bytes)
        fault("wgmma (%s:%d): operand element (%u, %u) at shared byte %u is beyond the %zu bytes of "
              "dynamic shared memory",
              file, line, i, k, addr, g->smem_bytes);
    return g->smem + addr;
}

static unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

void aligned_op(Aligned kind, int arg, const char* file, int line) {
    Fiber& f = cur_fiber();
    const uint64_t x = ((uint64_t)kind << 56) ^ ((uint64_t)(uint32_t)arg << 24) ^ (uint64_t)(uint32_t)line;
    f.aligned_hash = (f.aligned_hash ^ x) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull;
    ++f.aligned_count;
    if (kind == kCommit) ++f.commits;
    if (kind != kWait) return;
    // This thread's groups older than its newest `arg` are complete. On a GPU the whole warpgroup
    // passes a wait together; here its threads pass one by one, so a group's reads leave flight
    // once every thread of the warpgroup has passed a wait covering it.
    const unsigned wg = linear_tid() / 128;
    const unsigned members = std::min(128u, g->nthreads - 128 * wg);
    Launch::WarpgroupReads& wr = g->wg_reads[wg];
    const unsigned done = f.commits > (unsigned)arg ? f.commits - (unsigned)arg : 0;
    for (; f.waited < done; ++f.waited) {
        auto& grp = wr.groups[f.waited];
        if (++grp.passed < members) continue;
        for (uint32_t c : grp.chunks) --g->chunk_readers[c];
        wr.groups.erase(f.waited);
    }
}

// Whether shared bytes [p, p + bytes) may be written now: no wgmma product still reads them.
static void check_inflight(const unsigned char* p, unsigned bytes, const char* what, const char* file, int line) {
    const size_t off = (size_t)(p - g->smem);
    for (size_t c = off / 16; c <= (off + bytes - 1) / 16; ++c)
        if (g->chunk_readers[c])
            fault("%s (%s:%d) writes shared bytes %zu.. that a wgmma product (line %d) still reads: "
                  "no thread of its warpgroup has waited for it yet (a wgmma.wait_group orders only the "
                  "executing warpgroup's own products)",
                  what, file, line, off, g->chunk_line[c]);
}

// Records a generic-proxy write of shared bytes [p, p + bytes) by the running thread.
static void record_write(const unsigned char* p, unsigned bytes, const char* file, int line) {
    const size_t off = (size_t)(p - g->smem);
    const uint64_t now = ++g->epoch;
    for (size_t w = off / 4; w <= (off + bytes - 1) / 4; ++w) {
        g->word_epoch[w] = now;
        g->word_writer[w] = g->cur;
        g->word_line[w] = line;
        g->word_file[w] = file;
    }
}

static bool in_dynamic_smem(const void* p, unsigned bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    return g && c >= g->smem && c + bytes <= g->smem + g->smem_bytes;
}

void shared_write(void* smem, unsigned bytes, const char* file, int line) {
    if (!in_dynamic_smem(smem, bytes)) return;  // static shared memory
    const unsigned char* p = static_cast<unsigned char*>(smem);
    check_inflight(p, bytes, "st_shared", file, line);
    record_write(p, bytes, file, line);
}

void cp_async_issue(void* smem, const void* gmem, unsigned bytes, bool valid, const char* file, int line) {
    check_aligned(smem, bytes, "cp.async's shared address", file, line);
    if (valid) check_aligned(gmem, bytes, "cp.async's global address", file, line);
    if (in_dynamic_smem(smem, bytes)) check_inflight(static_cast<unsigned char*>(smem), bytes, "cp.async", file, line);
    Fiber& f = cur_fiber();
    f.copies.push_back(PendingCopy{static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem),
                                   bytes, f.groups, valid, file, line});
}

void cp_async_commit_group() { ++cur_fiber().groups; }

// The copy being landed, for the fault report (a copy reads its source when it lands, in
// whichever wait covers it, not where it was issued).
thread_local const PendingCopy* volatile t_landing = nullptr;  // (volatile: kept across the copy)

static void land(const PendingCopy& c) {
    if (c.valid) {
        t_landing = &c;
        std::memcpy(c.dst, c.src, c.bytes);
        t_landing = nullptr;
    } else
        std::memset(c.dst, 0, c.bytes);
    if (in_dynamic_smem(c.dst, c.bytes)) record_write(c.dst, c.bytes, c.file, c.line);
}

// Lands (by `land_one`, in issue order) the items of every one of `committed` groups but the
// `pending` newest, keeping the rest: cp.async's copies, the bulk group's reductions.
template <class T, class Land>
static void land_groups(std::vector<T>& items, unsigned committed, int pending, Land land_one) {
    const unsigned keep_from = committed > (unsigned)pending ? committed - (unsigned)pending : 0;
    size_t kept = 0;
    for (size_t i = 0; i < items.size(); ++i) {
        if (items[i].group < keep_from)
            land_one(items[i]);
        else
            items[kept++] = items[i];
    }
    items.resize(kept);
}

// Lands the copies of every committed group but the `pending` newest (in issue order).
void cp_async_wait_groups(int pending) {
    Fiber& f = cur_fiber();
    land_groups(f.copies, f.groups, pending, land);
}

void cp_async_land_all() {
    Fiber& f = cur_fiber();
    for (const PendingCopy& c : f.copies) land(c);
    f.copies.clear();
}

// src/device/tma.rs's emulator layout of a tensor map (its TmaMap's 128 bytes).
struct EmuTensorMap {
    uint64_t magic;
    uint64_t base;        // the global address
    uint64_t dims[5];     // elements, innermost first
    uint64_t strides[5];  // bytes (strides[0]: the element size)
    uint32_t box[5];
    uint32_t rank, elem_bytes, swizzle;  // swizzle: 0 or 128 (bytes)
};
static_assert(sizeof(EmuTensorMap) == 128, "a tensor map is 128 bytes");
constexpr uint64_t kTensorMapMagic = 0x50414d524f534e54ull;  // "TNSORMAP"

static const EmuTensorMap& tensor_map(const void* p, int rank, const char* file, int line) {
    const EmuTensorMap& m = *static_cast<const EmuTensorMap*>(p);
    if (m.magic != kTensorMapMagic)
        fault("tma load (%s:%d): the tensor map was not encoded for the emulator (src/device/tma.rs)", file, line);
    if ((int)m.rank != rank)
        fault("tma load (%s:%d): a rank-%d copy of a rank-%u tensor map", file, line, rank, m.rank);
    return m;
}

static uint64_t box_bytes(const EmuTensorMap& m) {
    uint64_t n = m.elem_bytes;
    for (uint32_t k = 0; k < m.rank; ++k) n *= m.box[k];
    return n;
}

void tma_load(void* dst, const void* map, int rank, const int* coords, void* bar, const char* file, int line) {
    const EmuTensorMap& m = tensor_map(map, rank, file, line);
    mbar_at(bar, "tma load's mbarrier", file, line);
    const uint64_t bytes = box_bytes(m);
    unsigned char* d = static_cast<unsigned char*>(dst);
    if (!in_dynamic_smem(d, (unsigned)bytes))
        fault("tma load (%s:%d): the %llu-byte box at %p is not inside the block's dynamic shared memory", file,
              line, (unsigned long long)bytes, dst);
    const size_t off = (size_t)(d - g->smem), align = m.swizzle == 128 ? 1024 : 128;
    if (off % align)
        fault("tma load (%s:%d): shared destination at byte %zu is not %zu-byte aligned%s", file, line, off, align,
              m.swizzle == 128 ? " (the 128-byte swizzle's pattern)" : "");
    check_inflight(d, (unsigned)bytes, "tma load", file, line);
    PendingBulk p;
    std::memcpy(p.map, map, sizeof p.map);
    for (int k = 0; k < 5; ++k) p.coords[k] = k < rank ? coords[k] : 0;
    p.dst = d;
    p.bar = bar;
    p.file = file;
    p.line = line;
    g->bulk.push_back(p);
}

// Lands a bulk copy: the box element by element (zeros outside the tensor), swizzled by the
// shared address's bits as the 128-byte swizzle does, as async-proxy writes; then completes its
// bytes on its mbarrier.
static void land_bulk(const PendingBulk& p) {
    const EmuTensorMap& m = *reinterpret_cast<const EmuTensorMap*>(p.map);
    const uint32_t eb = m.elem_bytes, rows = (uint32_t)(box_bytes(m) / (eb * m.box[0]));
    const size_t off0 = (size_t)(p.dst - g->smem);
    for (uint32_t row = 0; row < rows; ++row) {
        // The row's coordinates in dims 1.. (the box's row-major order, dim 1 fastest).
        int64_t at[5] = {0, 0, 0, 0, 0};
        bool inside = true;
        uint32_t rest = row;
        uint64_t src_off = 0;
        for (uint32_t k = 1; k < m.rank; ++k) {
            at[k] = (int64_t)p.coords[k] + rest % m.box[k];
            rest /= m.box[k];
            inside &= at[k] >= 0 && at[k] < (int64_t)m.dims[k];
            src_off += (uint64_t)at[k] * m.strides[k];
        }
        for (uint32_t e = 0; e < m.box[0]; ++e) {
            const int64_t x = (int64_t)p.coords[0] + e;
            size_t addr = off0 + ((size_t)row * m.box[0] + e) * eb;
            if (m.swizzle == 128) addr ^= ((addr >> 7) & 7) << 4;
            unsigned char* to = g->smem + addr;
            if (inside && x >= 0 && x < (int64_t)m.dims[0])
                std::memcpy(to, reinterpret_cast<const unsigned char*>(m.base) + src_off + (uint64_t)x * eb, eb);
            else
                std::memset(to, 0, eb);
            for (size_t w = addr / 4; w <= (addr + eb - 1) / 4; ++w) g->word_epoch[w] = 0;
        }
    }
    Mbar* mb = static_cast<Mbar*>(p.bar);
    g->mbar_tx[mbar_offset(p.bar)] -= (int64_t)box_bytes(m);
    mbar_complete_if_done(mb, p.bar);
    g->spin_done = true;
}

static void check_proxy(const unsigned char* e, const char* file, int line, const char* what = "wgmma");

void tma_reduce_add(const void* map, int rank, const int* coords, const void* src, const char* file, int line) {
    const EmuTensorMap& m = tensor_map(map, rank, file, line);
    if (m.elem_bytes != 4) fault("tma reduce (%s:%d): the emulator's reductions add f32 only", file, line);
    const uint64_t bytes = box_bytes(m);
    const unsigned char* s = static_cast<const unsigned char*>(src);
    if (!in_dynamic_smem(s, (unsigned)bytes))
        fault("tma reduce (%s:%d): the %llu-byte box at %p is not inside the block's dynamic shared memory", file,
              line, (unsigned long long)bytes, src);
    const size_t off = (size_t)(s - g->smem), align = m.swizzle == 128 ? 1024 : 128;
    if (off % align)
        fault("tma reduce (%s:%d): shared source at byte %zu is not %zu-byte aligned", file, line, off, align);
    for (uint64_t w = 0; w < bytes; w += 4) check_proxy(s + w, file, line, "tma reduce");
    Fiber& f = cur_fiber();
    PendingReduce r;
    std::memcpy(r.map, map, sizeof r.map);
    for (int k = 0; k < 5; ++k) r.coords[k] = k < rank ? coords[k] : 0;
    r.src = s;
    r.group = f.bulk_groups;
    r.file = file;
    r.line = line;
    f.reduces.push_back(r);
}

void bulk_commit_group() { ++cur_fiber().bulk_groups; }

// A reduction's adds: each element of the box inside the tensor += its swizzled shared word.
static void land_reduce(const PendingReduce& r) {
    const EmuTensorMap& m = *reinterpret_cast<const EmuTensorMap*>(r.map);
    const uint32_t rows = (uint32_t)(box_bytes(m) / (4 * m.box[0]));
    const size_t off0 = (size_t)(r.src - g->smem);
    for (uint32_t row = 0; row < rows; ++row) {
        bool inside = true;
        uint32_t rest = row;
        uint64_t dst_off = 0;
        for (uint32_t k = 1; k < m.rank; ++k) {
            const int64_t at = (int64_t)r.coords[k] + rest % m.box[k];
            rest /= m.box[k];
            inside &= at >= 0 && at < (int64_t)m.dims[k];
            dst_off += (uint64_t)at * m.strides[k];
        }
        if (!inside) continue;
        for (uint32_t e = 0; e < m.box[0]; ++e) {
            const int64_t x = (int64_t)r.coords[0] + e;
            if (x < 0 || x >= (int64_t)m.dims[0]) continue;
            size_t addr = off0 + ((size_t)row * m.box[0] + e) * 4;
            if (m.swizzle == 128) addr ^= ((addr >> 7) & 7) << 4;
            float v;
            std::memcpy(&v, g->smem + addr, 4);
            *reinterpret_cast<float*>(m.base + dst_off + (uint64_t)x * 4) += v;
        }
    }
}

// Reads the sources (and makes the adds) of every committed bulk group but the `pending` newest.
void bulk_wait_read_groups(int pending, const char*, int) {
    Fiber& f = cur_fiber();
    land_groups(f.reduces, f.bulk_groups, pending, land_reduce);
}

// Lands every pending bulk copy that completes on `bar` (in issue order); whether there was any.
static bool land_bulk_for(const void* bar) {
    std::vector<PendingBulk> mine;
    size_t kept = 0;
    for (size_t i = 0; i < g->bulk.size(); ++i) {
        if (g->bulk[i].bar == bar)
            mine.push_back(g->bulk[i]);
        else
            g->bulk[kept++] = g->bulk[i];
    }
    g->bulk.resize(kept);
    for (const PendingBulk& p : mine) land_bulk(p);
    return !mine.empty();
}

void proxy_fence(const char*, int) { g->fence_epoch[g->cur] = ++g->epoch; }

// Whether a wgmma of the running thread may read the shared word holding `e` (the proxy check).
static void check_proxy(const unsigned char* e, const char* file, int line, const char* what) {
    const size_t w = (size_t)(e - g->smem) / 4;
    const uint64_t written = g->word_epoch[w];
    if (!written || g->fence_epoch[g->word_writer[w]] > written || g->fence_epoch[g->cur] > written) return;
    const Fiber& wr = g->fibers[g->word_writer[w]];
    fault("%s (%s:%d) reads shared byte %zu, written through the generic proxy by thread (%u,%u,%u) "
          "(%s:%d) with no fence_proxy_async since, by the writer or by this thread (the async "
          "proxy may read stale bytes)",
          what, file, line, (size_t)(e - g->smem), wr.tid.x, wr.tid.y, wr.tid.z, g->word_file[w], g->word_line[w]);
}

void wgmma_bf16(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int scale_d,
                int trans_a, int trans_b, const char* file, int line) {
    aligned_op(kWgmma, n, file, line);
    const unsigned linear = linear_tid();
    const unsigned w = (linear >> 5) & 3, lane = lane_id(), gr = lane >> 2, q = lane & 3;
    std::vector<uint32_t> chunks;  // the shared chunks this thread's part of the product reads
    chunks.reserve(8 + n / 2);      // two element pairs a fragment word: A's 4 words, B's n/4
    auto pair = [&](uint64_t desc, bool mn, unsigned i, unsigned k) {
        unsigned short lo, hi;
        const unsigned char* e0 = wgmma_element(desc, mn, i, k, file, line);
        const unsigned char* e1 = wgmma_element(desc, mn, i, k + 1, file, line);
        check_proxy(e0, file, line);
        check_proxy(e1, file, line);
        std::memcpy(&lo, e0, 2);
        std::memcpy(&hi, e1, 2);
        // (a chunk once when both elements lie in it: the counts only need to stay positive)
        const uint32_t c0 = (uint32_t)((e0 - g->smem) / 16), c1 = (uint32_t)((e1 - g->smem) / 16);
        chunks.push_back(c0);
        if (c1 != c0) chunks.push_back(c1);
        return (uint32_t)lo | ((uint32_t)hi << 16);
    };
    uint32_t a[4];
    if (a_regs) {
        std::memcpy(a, a_regs, sizeof a);
    } else {
        const unsigned r = 16 * w + gr;
        a[0] = pair(desc_a, trans_a, r, 2 * q);
        a[1] = pair(desc_a, trans_a, r + 8, 2 * q);
        a[2] = pair(desc_a, trans_a, r, 2 * q + 8);
        a[3] = pair(desc_a, trans_a, r + 8, 2 * q + 8);
    }
    if (n < 8 || n > 8 * kMaxTiles || n % 8) fault("wgmma (%s:%d): n = %d is not a multiple of 8 in 8..256", file, line, n);
    uint32_t b[kMaxTiles][2];
    float c[4 * kMaxTiles];
    for (int j = 0; j < n / 8; ++j) {
        const unsigned col = 8 * j + gr;
        b[j][0] = pair(desc_b, trans_b, col, 2 * q);
        b[j][1] = pair(desc_b, trans_b, col, 2 * q + 8);
        for (int i = 0; i < 4; ++i) c[4 * j + i] = scale_d ? d[4 * j + i] : 0.f;
    }
    // the n/8 tiles in one warp collective (their B fragments all read before it, as the
    // product's reads are all in flight from its issue on)
    mma_tiles(d, n / 8, a, b, c, file, line);
    // The reads stay in flight with this thread's next commit group until the whole warpgroup
    // has waited for it (see aligned_op).
    std::vector<uint32_t>& reads = g->wg_reads[linear / 128].groups[cur_fiber().commits].chunks;
    for (uint32_t ch : chunks) {
        reads.push_back(ch);
        ++g->chunk_readers[ch];
        g->chunk_line[ch] = line;
    }
}
}  // namespace emu

// ---- Faults -------------------------------------------------------------------------------------
// A kernel touching memory outside every buffer (emulator buffers end against an inaccessible page,
// src/device/emu_memory.rs) or overflowing a fiber's stack gets SIGSEGV. The handler says which
// kernel, block and thread did it, then hands the signal on to the handler it replaced (Rust's,
// which tells its own stack overflows apart and otherwise restores the default: the access runs
// again and the process dies of it, as a test must).
namespace emu {
struct sigaction prev_segv, prev_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (g) {
        char msg[640];
        const int n = std::snprintf(
            msg, sizeof msg,
            "emulator: %s at address %p in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): an "
            "access outside every buffer (an emulator buffer's end meets an inaccessible page) "
            "or a fiber stack overflow\n",
            sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info ? info->si_addr : nullptr, g->name ? g->name : "?",
            blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        if (n > 0) (void)!write(2, msg, (size_t)std::min(n, (int)sizeof msg - 1));
        if (const PendingCopy* c = t_landing) {
            const int m = std::snprintf(msg, sizeof msg, "emulator: (landing the cp.async of %u bytes from %p issued at %s:%d)\n",
                                        c->bytes, (const void*)c->src, c->file, c->line);
            if (m > 0) (void)!write(2, msg, (size_t)std::min(m, (int)sizeof msg - 1));
        }
    }
    const struct sigaction& prev = sig == SIGSEGV ? prev_segv : prev_bus;
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) return prev.sa_sigaction(sig, info, uctx);
    if (!(prev.sa_flags & SA_SIGINFO) && prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN)
        return prev.sa_handler(sig);
    signal(sig, SIG_DFL);  // returning re-runs the access under the default action
}

// Once per process: the handler, on the thread's alternate signal stack (a fiber stack overflow
// leaves no room on the faulting stack). Once per OS thread: an alternate stack if it has none
// (Rust gives its threads one; threads made elsewhere may not).
void install_fault_report() {
    static const bool installed = [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &prev_segv);
        sigaction(SIGBUS, &sa, &prev_bus);
        return true;
    }();
    (void)installed;
    thread_local bool has_altstack = [] {
        stack_t cur{};
        if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return true;
        const size_t bytes = 64 << 10;
        void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        stack_t alt{};
        alt.ss_sp = m;
        alt.ss_size = bytes;
        return sigaltstack(&alt, nullptr) == 0;  // (kept for the thread's life)
    }();
    (void)has_altstack;
}
}  // namespace emu

// ---- Launch entry point (src/device/emu.rs) -----------------------------------------------------
// Runs `tramp` (the generated trampoline of kernel `name`) over the grid. Returns 0, or an error
// code (1 bad launch, 2 deadlock, 3 fault) with a message in `err`. Never aborts.
extern "C" int advdmd_emu_launch(void (*tramp)(void**), const char* name, const unsigned grid[3],
                                 const unsigned block[3], unsigned smem_bytes, void** args, int order,
                                 uint64_t seed, char* err, size_t err_len) {
    using namespace emu;
    auto report = [&](int code, const std::string& msg) {
        if (err && err_len) std::snprintf(err, err_len, "%s", msg.c_str());
        return code;
    };
    if (g) return report(kBadLaunch, "emulator launch from inside a running kernel");
    install_fault_report();
    const unsigned long long nthreads = (unsigned long long)block[0] * block[1] * block[2];
    if (order < 0 || order > 2) return report(kBadLaunch, fmt("schedule %d is not 0, 1 or 2", order));
    if (!grid[0] || !grid[1] || !grid[2] || !nthreads || nthreads > 1024)
        return report(kBadLaunch, fmt("grid (%u,%u,%u) block (%u,%u,%u): every dimension must be "
                                      "nonzero and a block at most 1024 threads",
                                      grid[0], grid[1], grid[2], block[0], block[1], block[2]));
    Launch& L = t_state;
    L.name = name;
    L.tramp = tramp;
    L.args = args;
    L.nthreads = (unsigned)nthreads;
    L.order = order;
    L.seed = seed;
    L.code = kOk;
    L.err.clear();
    if (L.smem_cap < smem_bytes) {
        std::free(L.smem);
        L.smem = (unsigned char*)std::aligned_alloc(128, (smem_bytes + 127) & ~127u);
        L.smem_cap = L.smem ? smem_bytes : 0;
        if (!L.smem) return report(kBadLaunch, fmt("cannot allocate %u bytes of shared memory", smem_bytes));
    }
    L.smem_bytes = smem_bytes;
    L.fibers.resize(L.nthreads);
    for (unsigned i = 0; i < L.nthreads; ++i) {
        Fiber& f = L.fibers[i];
        f.tid = uint3{i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
        f.warp = i / 32;
        f.lane = i % 32;
        if (!t_stacks.get(i)) return report(kBadLaunch, "cannot map fiber stacks");
    }
    const unsigned nwarps = (L.nthreads + 31) / 32;
    for (auto& w : L.warps) {
        for (Rdv* r : w.live) L.free_rdvs.push_back(r);
        w.live.clear();
    }
    L.warps.resize(nwarps);
    for (unsigned w = 0; w < nwarps; ++w) {
        const unsigned lanes = std::min(32u, L.nthreads - 32 * w);
        L.warps[w].exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    }
    gridDim = uint3{grid[0], grid[1], grid[2]};
    blockDim = uint3{block[0], block[1], block[2]};
    g = &L;
    int code = kOk;
    const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    // Forward and reverse walk the blocks by index; a shuffle draws a permutation of them (of
    // each window of 2^24 blocks in turn, for a larger grid).
    const uint64_t window = 1ull << 24;
    std::vector<unsigned> within;
    for (uint64_t n = 0; n < blocks && code == kOk; ++n) {
        uint64_t b = order == 1 ? blocks - 1 - n : n;
        if (order == 2) {
            const uint64_t start = n - n % window;
            if (n == start)
                schedule_order(within, (unsigned)std::min(window, blocks - start), order, seed, ~start);
            b = start + within[n - start];
        }
        blockIdx = uint3{(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                         (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
        if (!run_block(b)) code = L.code;
    }
    g = nullptr;
    return code == kOk ? kOk : report(code, L.err);
}
