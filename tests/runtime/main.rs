//! The kernel device's runtime, beside its kernels: uploads (`copies`), CUDA graphs (`graph`),
//! programmatic dependent launches (`pdl`), two streams
//! (`streams`) and the op profile (`profile`). Each runs on the emulator always and on a GPU when
//! there is one (tools/gpu-check.sh's `runtime` step); on a GPU they meet what the emulator can
//! only model — the driver's capture rules, event timing, the real second stream.

mod copies;
mod graph;
mod pdl;
mod profile;
mod streams;

use advdmd::device::kernel::KernelDevice;

/// The emulator, and the GPU when there is one (else said once per test: `what` tests).
fn devices(what: &str) -> Vec<KernelDevice> {
    let mut v = vec![KernelDevice::emulator()];
    match KernelDevice::gpu_if_available() {
        Some(g) => v.push(g),
        None => println!("no GPU: {what} tests run on the emulator only"),
    }
    v
}
