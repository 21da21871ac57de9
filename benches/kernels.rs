//! Memory bandwidth of every non-GEMM kernel family (issue 6 "Performance"): the cases of
//! `advdmd::bench::kernels_device` (GB/s from the bytes each kernel must move over device time,
//! next to a device-to-device copy), printed as a table, with JSON written to
//! `$ADVDMD_BENCH_JSON` if set. A plain `main` (harness = false) rather than criterion groups:
//! the figure that matters is device time from CUDA events around a graph of launches, which
//! criterion's host-clock sampling cannot take. Without a GPU it runs the emulator at tiny sizes
//! (the timings are not speeds). `advdmd bench kernels --device cuda` runs the same cases.
//!
//! `cargo bench --bench kernels`

use advdmd::bench::kernels_device::measure;
use advdmd::device::kernel::KernelDevice;

fn main() {
    let dev = KernelDevice::gpu_if_available().unwrap_or_else(KernelDevice::emulator);
    let gpu = !dev.is_emulator();
    if !gpu {
        eprintln!("kernels bench: no usable GPU; running the emulator at tiny sizes (timings are not speeds)");
    }
    let rows = measure(&dev).unwrap_or_else(|e| panic!("kernels bench: {e}"));
    let copy = rows[0].gbps();
    println!(
        "device: {}{}",
        dev.name(),
        if gpu { "" } else { " (tiny sizes)" }
    );
    println!(
        "{:<32} {:<20} {:>10} {:>10} {:>9} {:>7}",
        "kernel", "shape", "MB moved", "µs", "GB/s", "% copy"
    );
    for r in &rows {
        println!(
            "{:<32} {:<20} {:>10.2} {:>10.2} {:>9.1} {:>6.1}%",
            r.kernel,
            r.shape,
            r.bytes as f64 / 1e6,
            r.ms * 1e3,
            r.gbps(),
            100.0 * r.gbps() / copy
        );
    }
    if let Ok(path) = std::env::var("ADVDMD_BENCH_JSON") {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kernel": r.kernel,
                    "shape": r.shape,
                    "bytes": r.bytes,
                    "ms": r.ms,
                    "gbps": r.gbps(),
                    "fraction_of_copy": r.gbps() / copy,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "device": dev.name(),
            "emulator": !gpu,
            "copy_gbps": copy,
            "results": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
        eprintln!("kernels bench: wrote {path}");
    }
}
