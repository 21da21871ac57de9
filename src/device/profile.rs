//! The kernel device's built-in op profiler: where a piece of work's device time goes, op by op,
//! in one ordinary run (`KernelDevice::profile`, `advdmd bench … --profile`).
//!
//! Every op queued while a profile runs (a kernel launch, a cuBLASLt GEMM, a memset, a graph
//! replay) is followed by a timestamp on its stream: a CUDA event on a GPU, the host clock under
//! the emulator. An op's time is the gap between its timestamp and the previous one on the same
//! stream, so it includes any idle time before it on that stream (on the side stream, waiting at a
//! fork; before a copy, timed apart as "idle (host work before a copy)"). On a GPU the main
//! stream's ops are held behind a gate kernel until the host has queued the next few dozen
//! (`ProfileGate`, cuda/profile.cu), so a host slower than the GPU adds no launch gaps to the ops:
//! the gaps are the kernels' durations, and the gates' waits are summed apart (`host_wait_ms`). No replays, no serialisation: unlike Nsight Compute, the whole forward and
//! backward of a 2-billion-parameter model is profiled in the time it takes to run it. Ops recorded
//! into a graph capture are not timed (the replay is, as one op).

use std::collections::HashMap;

/// The mark of the profiler's gate (src/device/cuda.rs): the time the GPU waited for the host to
/// queue the ops behind it, which no op's row includes.
pub(crate) const GATE: &str = "profile gate";

/// What the device layer knows about a timed op when it is queued.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    pub name: String,
    /// Matmul FLOPs the op performs (GEMMs at 2·M·N·K, attention in the FlashAttention
    /// convention); 0 for memory-bound ops.
    pub flops: u64,
    pub side: bool,
}

/// The marks of a profile in progress, and the emulator's host timestamps.
#[derive(Default)]
pub(crate) struct ProfileLog {
    pub marks: Vec<Mark>,
    /// Emulator: the host time of each mark (seconds since the profile began).
    pub host_s: Vec<f64>,
    pub started: Option<std::time::Instant>,
}

/// One kind of op: every call of one kernel, or of one GEMM shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// The kernel's name, or `gemm M×N×K …` (shape, transposes, epilogue, output type).
    pub name: String,
    pub calls: u64,
    pub ms: f64,
    pub flops: u64,
}

impl ProfileRow {
    /// The family an op belongs to: the kernel name, or `gemm` for every GEMM shape.
    pub fn family(&self) -> &str {
        self.name.split(' ').next().unwrap_or(&self.name)
    }

    /// TFLOP/s over the row's time (`None` for ops without matmul FLOPs).
    pub fn tflops(&self) -> Option<f64> {
        (self.flops > 0 && self.ms > 0.0).then(|| self.flops as f64 / self.ms / 1e9)
    }
}

/// A finished profile: rows by descending time.
#[derive(Clone, Debug, Default)]
pub struct OpProfile {
    pub rows: Vec<ProfileRow>,
    /// Ops timed, on both streams.
    pub ops: u64,
    /// Ops on the side stream (their times include waits at forks).
    pub side_ops: u64,
    /// The device's stream setting while it ran (1 or 2; 0 when not set).
    pub streams: usize,
    /// Time the GPU waited at the profiler's gates for the host to queue the ops behind them
    /// (on a GPU; in no row): how far the host's launches lag the GPU.
    pub host_wait_ms: f64,
}

impl OpProfile {
    /// Aggregates per-op durations (`ms[i]` for `marks[i]`) by name.
    pub(crate) fn from_marks(marks: &[Mark], ms: &[f64]) -> OpProfile {
        let is_gate = |m: &Mark| m.name == GATE;
        let timed = || marks.iter().zip(ms).filter(|(m, _)| !is_gate(m));
        let ops = timed().map(|(m, &t)| (m.name.as_str(), 1, t, m.flops));
        OpProfile {
            rows: sum_by_name(ops),
            ops: timed().count() as u64,
            side_ops: timed().filter(|(m, _)| m.side).count() as u64,
            streams: 0,
            host_wait_ms: (marks.iter().zip(ms))
                .filter(|(m, _)| is_gate(m))
                .fold(0.0, |a, (_, t)| a + t),
        }
    }

    /// Total time of the timed ops (both streams: with two, more than the wall time).
    pub fn total_ms(&self) -> f64 {
        self.rows.iter().map(|r| r.ms).sum()
    }

    /// The rows summed per family (every GEMM shape in one `gemm` row), by descending time.
    pub fn families(&self) -> Vec<ProfileRow> {
        sum_by_name(
            self.rows
                .iter()
                .map(|r| (r.family(), r.calls, r.ms, r.flops)),
        )
    }
}

/// Rows summed per name (`(name, calls, ms, flops)` each), by descending time.
fn sum_by_name<'a>(items: impl Iterator<Item = (&'a str, u64, f64, u64)>) -> Vec<ProfileRow> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut rows: Vec<ProfileRow> = Vec::new();
    for (name, calls, ms, flops) in items {
        let i = *index.entry(name).or_insert_with(|| {
            rows.push(ProfileRow {
                name: name.to_string(),
                calls: 0,
                ms: 0.0,
                flops: 0,
            });
            rows.len() - 1
        });
        rows[i].calls += calls;
        rows[i].ms += ms;
        rows[i].flops += flops;
    }
    sort_by_time(&mut rows);
    rows
}

/// Descending time; ties by name, so equal profiles print alike.
fn sort_by_time(rows: &mut [ProfileRow]) {
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
}

/// Per-op durations from timestamps: op `i`'s time is its stamp minus the previous stamp on the
/// same stream (`start[side]` for the first). Negative gaps (clock noise) count as zero.
pub(crate) fn gaps(marks: &[Mark], stamps_ms: &[f64], start_ms: [f64; 2]) -> Vec<f64> {
    let mut last = start_ms;
    marks
        .iter()
        .zip(stamps_ms)
        .map(|(m, &t)| {
            let lane = m.side as usize;
            let d = (t - last[lane]).max(0.0);
            last[lane] = t;
            d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(name: &str, flops: u64, side: bool) -> Mark {
        Mark {
            name: name.into(),
            flops,
            side,
        }
    }

    #[test]
    fn gate_waits_are_in_no_row() {
        let marks = [
            mark("a", 0, false),
            mark(GATE, 0, false),
            mark("b", 0, false),
            mark(GATE, 0, false),
            mark("a", 0, false),
        ];
        let p = OpProfile::from_marks(&marks, &[1.0, 5.0, 2.0, 0.5, 1.0]);
        assert_eq!((p.ops, p.rows.len()), (3, 2));
        assert_eq!(p.total_ms(), 4.0);
        assert_eq!(p.host_wait_ms, 5.5);
    }

    #[test]
    fn gaps_are_taken_per_stream() {
        let marks = [
            mark("a", 0, false),
            mark("b", 0, true),
            mark("a", 0, false),
            mark("c", 0, true),
        ];
        let d = gaps(&marks, &[1.0, 4.0, 3.0, 4.5], [0.0, 2.0]);
        assert_eq!(d, vec![1.0, 2.0, 2.0, 0.5]);
    }

    #[test]
    fn rows_sum_per_name_and_families_sum_gemm_shapes() {
        let marks = [
            mark("gemm 2x3x4 None NN bf16", 48, false),
            mark("adaln_modulate_fwd", 0, false),
            mark("gemm 2x3x4 None NN bf16", 48, false),
            mark("gemm 8x8x8 Bias NT bf16", 1024, false),
        ];
        let p = OpProfile::from_marks(&marks, &[1.0, 0.5, 1.0, 4.0]);
        assert_eq!(p.ops, 4);
        assert_eq!(p.rows[0].name, "gemm 8x8x8 Bias NT bf16");
        assert_eq!(p.rows[1].calls, 2);
        assert_eq!(p.rows[1].flops, 96);
        assert_eq!(p.total_ms(), 6.5);
        let f = p.families();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].name.as_str(), f[0].calls, f[0].ms), ("gemm", 3, 6.0));
        assert_eq!(f[0].flops, 1120);
        // 1120 FLOP in 6 ms
        assert!((f[0].tflops().unwrap() - 1120.0 / 6.0 / 1e9).abs() < 1e-18);
        assert_eq!(f[1].tflops(), None);
    }
}
