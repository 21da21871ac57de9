//! Devices and the run-time CUDA probe.
//!
//! One device abstraction chosen at run time (ARCHITECTURE.md rule 5). A binary built with the
//! `cuda` feature must still run where there is no driver: the probe asks cudarc whether the
//! driver library is present *before* any call that would make cudarc panic (CUDA.md §2), and
//! reports what it found as plain data.

#[cfg(feature = "cuda")]
pub mod cublaslt;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod emu;
pub mod emu_graph;
pub mod emu_lanes;
pub mod emu_memory;
pub mod host_memory;
pub mod kernel;
pub mod profile;
pub mod staging;
pub mod tma;

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal. The CUDA backend itself arrives with the kernel layer.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// One GPU the driver reported.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
}

/// What the CUDA probe found.
#[derive(Clone, Debug)]
pub enum CudaProbe {
    /// Built without the `cuda` feature.
    NotBuilt,
    /// The driver library (libcuda) could not be loaded.
    NoDriver,
    /// The driver loaded but reported an error or no devices.
    NoDevice(String),
    Found(Vec<GpuInfo>),
}

impl fmt::Display for CudaProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaProbe::NotBuilt => write!(f, "not built (the `cuda` feature is off)"),
            CudaProbe::NoDriver => write!(f, "no CUDA driver found"),
            CudaProbe::NoDevice(why) => write!(f, "CUDA driver present, no usable device: {why}"),
            CudaProbe::Found(gpus) => {
                let names: Vec<String> = gpus
                    .iter()
                    .map(|g| {
                        format!(
                            "cuda:{} {} (sm_{}{}, {:.1} GiB)",
                            g.ordinal,
                            g.name,
                            g.compute_capability.0,
                            g.compute_capability.1,
                            g.total_memory_bytes as f64 / (1u64 << 30) as f64
                        )
                    })
                    .collect();
                write!(f, "{}", names.join(", "))
            }
        }
    }
}

/// Probes for CUDA without ever panicking: library present → device count → per-device queries.
pub fn probe_cuda() -> CudaProbe {
    #[cfg(feature = "cuda")]
    {
        probe_cuda_driver()
    }
    #[cfg(not(feature = "cuda"))]
    {
        CudaProbe::NotBuilt
    }
}

#[cfg(feature = "cuda")]
fn probe_cuda_driver() -> CudaProbe {
    use cudarc::driver::{sys, CudaContext};
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    if !unsafe { sys::is_culib_present() } {
        return CudaProbe::NoDriver;
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n,
        Err(e) => return CudaProbe::NoDevice(format!("{e:?}")),
    };
    if count <= 0 {
        return CudaProbe::NoDevice("the driver reports 0 devices".into());
    }
    let mut gpus = Vec::new();
    for ordinal in 0..count as usize {
        let ctx = match CudaContext::new(ordinal) {
            Ok(c) => c,
            Err(e) => return CudaProbe::NoDevice(format!("cuda:{ordinal}: {e:?}")),
        };
        gpus.push(GpuInfo {
            ordinal,
            name: ctx
                .name()
                .unwrap_or_else(|e| format!("<name unavailable: {e:?}>")),
            compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
            total_memory_bytes: ctx.total_mem().unwrap_or(0),
        });
    }
    CudaProbe::Found(gpus)
}

/// Threads the CPU backend uses (rayon's global pool).
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}

/// The device work should run on: the first GPU when the probe finds one (and the CUDA backend
/// exists), else the CPU. Until the CUDA backend lands this is always the CPU.
pub fn default_device() -> Device {
    Device::Cpu
}

/// Tunes glibc's allocator for the CPU backend's pattern: every op allocates fresh multi-MB
/// buffers and frees them soon after. By default glibc serves those with mmap and unmaps them on
/// free, so each step page-faults its whole working set again; keeping them in the heap makes the
/// Shapes training step faster. glibc refuses an mmap threshold above 32 MiB (half its 64 MiB heap
/// size), so that is the threshold (asking for more silently kept the dynamic default). Call once
/// at start-up; returns whether every setting was accepted (always true off glibc).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_TOP_PAD, 256 << 20) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allocator_accepts_every_setting() {
        assert!(super::tune_allocator());
    }
}
