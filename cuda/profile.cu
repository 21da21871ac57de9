// The op profiler's gate (src/device/cuda.rs, `ProfileGate`): a one-thread kernel that holds its
// stream until the host writes `epoch` (or more) into a word of pinned host memory, or until
// `timeout_ns` has passed. The profiler queues one ahead of every few dozen ops and releases it
// once the ops behind it are queued, so the GPU runs them back to back and each op's time is its
// own, not the host's launch gap (the host feeding the 512 px AdvDMD iteration is slower than the
// GPU running it). The timeout bounds what a blocking host call the profiler did not release
// before would cost. No CPU twin: the emulator's profile times ops on the host clock and never
// queues it (its body is empty there).
#include "common.cuh"

extern "C" __global__ void profile_gate(const unsigned* flag, unsigned epoch, unsigned long long timeout_ns) {
    kernel_prologue();
#ifndef ADVDMD_EMU
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    now = start;
    while (*reinterpret_cast<const volatile unsigned*>(flag) < epoch && now - start < timeout_ns) {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
#else
    (void)flag, (void)epoch, (void)timeout_ns;
#endif
}
