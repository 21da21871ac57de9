//! `--profile`: the kernel device's op profile (`device::profile`) of one more run of a bench's
//! work, as two report tables — per family (a kernel, or every GEMM) and per op (each kernel and
//! each GEMM shape, the longest first).

use super::report::{Cell, Column, Report, Table};
use crate::device::kernel::{KernelDevice, KernelError};
use crate::device::profile::{OpProfile, ProfileRow};

/// Op rows shown per profile; the rest are summed into one row.
const TOP_OPS: usize = 60;

/// The op profile of `work` run twice, the first only warming the profiler's event pool. Both
/// run on one stream: on two, an op's gap on the side stream includes its waits for the main one
/// and the time it shares the SMs (on an H100 the SD3.5-medium fwd+bwd's RMSNorm backward read
/// 41 ms so; an H200's one-stream profile had 1.7 ms), so the per-op times would no longer add
/// up to the run.
pub fn profile_one_stream(
    dev: &KernelDevice,
    mut work: impl FnMut() -> Result<(), KernelError>,
) -> Result<OpProfile, KernelError> {
    let streams = dev.streams();
    dev.set_streams(1)?;
    let profile = dev.profile(&mut work).and_then(|_| dev.profile(&mut work));
    dev.set_streams(streams)?;
    profile
}

/// [`profile_one_stream`] of a bench's timed unit, which may fail with any error.
pub fn profile_fallible(
    dev: &KernelDevice,
    mut work: impl FnMut() -> crate::Result<()>,
) -> crate::Result<OpProfile> {
    let mut failed = None;
    let run = || {
        work().map_err(|e| {
            let text = e.to_string();
            failed = Some(e);
            KernelError::Invalid(text)
        })
    };
    let profile = profile_one_stream(dev, run);
    match failed {
        Some(e) => Err(e),
        None => Ok(profile?),
    }
}

/// Adds `profile`'s tables under the JSON keys `families` and `ops`, and a note naming `what`.
pub fn add_profile(
    r: &mut Report,
    what: &str,
    (families, ops): (&'static str, &'static str),
    profile: &OpProfile,
) {
    let total = profile.total_ms();
    r.tables.push(table(families, &profile.families(), total));
    let mut rows: Vec<ProfileRow> = profile.rows.iter().take(TOP_OPS).cloned().collect();
    if profile.rows.len() > TOP_OPS {
        let rest = &profile.rows[TOP_OPS..];
        rows.push(ProfileRow {
            name: format!("({} other ops)", rest.len()),
            calls: rest.iter().map(|r| r.calls).sum(),
            ms: rest.iter().map(|r| r.ms).sum(),
            flops: rest.iter().map(|r| r.flops).sum(),
        });
    }
    r.tables.push(table(ops, &rows, total));
    r.note(format!(
        "profile of {what} ({families}, {ops}), on {} stream(s): {} ops timed ({} on the side stream), {total:.3} ms \
         of op time; an op's time is the gap between its end and the previous op's end on its \
         stream; on a GPU the ops are held behind a gate until the host has queued the next few \
         dozen, so they run back to back and that gap is the op's own time ({:.3} ms waited at \
         the gates for the host, in no row)",
        profile.streams, profile.ops, profile.side_ops, profile.host_wait_ms
    ));
}

fn table(name: &'static str, rows: &[ProfileRow], total_ms: f64) -> Table {
    let col = |key, header| Column { key, header };
    Table {
        name,
        columns: vec![
            col("op", name),
            col("calls", "calls"),
            col("ms", "ms"),
            col("share", "share %"),
            col("us_per_call", "µs/call"),
            col("tflops", "TFLOP/s"),
        ],
        rows: rows
            .iter()
            .map(|p| {
                vec![
                    Cell::Text(p.name.clone()),
                    Cell::Count(p.calls),
                    Cell::num(p.ms, 3),
                    Cell::num(100.0 * p.ms / total_ms.max(f64::MIN_POSITIVE), 1),
                    Cell::num(1e3 * p.ms / p.calls.max(1) as f64, 1),
                    p.tflops().map_or(Cell::NotAvailable, |t| Cell::num(t, 1)),
                ]
            })
            .collect(),
    }
}
