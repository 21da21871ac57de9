//! How the benchmarks measure: wall-clock medians after warm-up, the process's peak resident
//! memory, the machine description, and the two ceilings every figure is set beside (a square
//! f32 GEMM through the engine's own GEMM path, and a parallel memcpy), both timed in the same
//! run as the figures, so contention on a shared machine weighs on both alike.

use crate::kernels::gemm::{sgemm, MatRef};
use crate::tensor::{Rng, Tensor};
use rayon::prelude::*;
use std::time::Instant;

/// Wall-clock times of repeated runs of one piece of work.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Every timed run, in ms, in the order they ran.
    pub runs_ms: Vec<f64>,
}

impl Timing {
    /// The median (the mean of the middle two for an even count); the figure every bench reports,
    /// because a contended machine produces outliers on the slow side only.
    pub fn median_ms(&self) -> f64 {
        let mut v = self.runs_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    }
}

/// Untimed runs before the timed ones.
pub const WARMUP: usize = 1;

/// Runs `work` `warmup` times untimed (first-touch page faults, lazily built state, caches),
/// then `iters` times timed.
pub fn time_runs(warmup: usize, iters: usize, mut work: impl FnMut()) -> Timing {
    for _ in 0..warmup {
        work();
    }
    let runs_ms = (0..iters)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    Timing { runs_ms }
}

/// [`time_runs`] for work that can fail: the first error ends the runs and is returned.
pub fn time_fallible(
    warmup: usize,
    iters: usize,
    mut work: impl FnMut() -> crate::Result<()>,
) -> crate::Result<Timing> {
    let mut failure = None;
    let timing = time_runs(warmup, iters, || {
        if failure.is_none() {
            failure = work().err();
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(timing),
    }
}

/// One `Vm*` field of `/proc/self/status`, in bytes (Linux only).
fn proc_status_bytes(field: &str) -> Option<u64> {
    crate::device::host_memory::proc_kb_field("/proc/self/status", field)
}

/// The peak resident memory a piece of work adds on top of what the process holds when it
/// starts: `VmHWM` (peak RSS) after the work minus `VmRSS` before it. This is the CPU stand-in
/// for a GPU allocator's peak; it counts every page the work touched, weights' gradients and the
/// autograd tape's activations included.
///
/// Two things would hide the work's memory, and the start undoes both: the allocator keeps freed
/// memory resident for reuse (`device::tune_allocator`), so the free heap pages are first given
/// back (`malloc_trim(0)`); and an earlier, higher peak would mask this one, so the peak is reset
/// to the current RSS (writing 5 to `/proc/self/clear_refs`).
pub struct PeakRss {
    baseline: Option<u64>,
    reset: bool,
}

impl PeakRss {
    pub fn start() -> PeakRss {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the OS; no live allocation moves.
        unsafe {
            libc::malloc_trim(0);
        }
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        PeakRss {
            baseline: proc_status_bytes("VmRSS:"),
            reset,
        }
    }

    /// Peak RSS growth so far, in bytes (`None` where `/proc` is unavailable).
    pub fn growth_bytes(&self) -> Option<u64> {
        let peak = proc_status_bytes("VmHWM:")?;
        Some(peak.saturating_sub(self.baseline?))
    }

    /// What the figure is, for the report.
    pub fn method(&self) -> &'static str {
        if self.reset {
            "peak RSS growth: VmHWM after the runs minus VmRSS before them (free heap pages trimmed and VmHWM reset via /proc/self/clear_refs at their start)"
        } else {
            "peak RSS growth: VmHWM after the runs minus VmRSS before them (VmHWM could not be reset: may include earlier peaks)"
        }
    }
}

/// The machine the CPU figures come from.
#[derive(Clone, Debug)]
pub struct CpuInfo {
    /// `model name` of `/proc/cpuinfo`, or "unknown CPU".
    pub model: String,
    /// Rayon's worker threads (what every parallel kernel uses).
    pub threads: usize,
}

impl CpuInfo {
    pub fn detect() -> CpuInfo {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        CpuInfo {
            model,
            threads: crate::device::cpu_threads(),
        }
    }

    pub fn describe(&self) -> String {
        format!("CPU: {} ({} threads)", self.model, self.threads)
    }
}

/// Side of the square GEMM whose throughput is the compute ceiling.
pub const GEMM_CEILING_SIZE: usize = 1024;

/// The measured compute ceiling: TFLOP/s of an `n³` f32 GEMM through `kernels::gemm::sgemm`, the
/// path every linear layer and attention product takes. Labelled "measured GEMM ceiling" in
/// reports; it is not the chip's peak.
pub fn gemm_ceiling_tflops(n: usize, iters: usize) -> f64 {
    let mut rng = Rng::new(0x6e6d);
    let a = Tensor::randn(&[n, n], &mut rng);
    let b = Tensor::randn(&[n, n], &mut rng);
    let mut c = vec![0f32; n * n];
    let t = time_runs(2, iters.max(3), || {
        sgemm(
            n,
            n,
            n,
            1.0,
            MatRef::rows(a.f32s(), n),
            MatRef::rows(b.f32s(), n),
            &mut c,
            n,
            false,
            true,
        );
    });
    std::hint::black_box(&c);
    tflops(2.0 * (n as f64).powi(3), t.median_ms())
}

/// Elements copied per rayon task by the memcpy ceiling: big enough to stream, small enough to
/// spread over every thread.
const COPY_CHUNK: usize = 1 << 16;

/// The measured bandwidth ceiling: GB/s of a rayon-parallel copy of `n` f32 (bytes read plus
/// bytes written over the time), the best a memory-bound CPU kernel here can do.
pub fn memcpy_ceiling(n: usize, iters: usize) -> (usize, Timing) {
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let t = time_runs(1, iters, || {
        dst.par_chunks_mut(COPY_CHUNK)
            .zip(src.par_chunks(COPY_CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    std::hint::black_box(&dst);
    (2 * 4 * n, t)
}

pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e9)
}

pub fn gbps(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e6)
}
