//! `advdmd info`: what this build contains and what this machine offers.

use crate::device::{cpu_threads, probe_cuda, CudaProbe};
use crate::kernels::attention::dev::{BwdVariant, FwdVariant};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Build features compiled in.
pub fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    f
}

pub struct Info {
    pub version: &'static str,
    pub features: Vec<&'static str>,
    pub cpu_threads: usize,
    pub cuda: CudaProbe,
    pub kernels: Vec<&'static str>,
    /// The attention kernels the model path launches at head dim 64 and 128, forward and
    /// backward (`ADVDMD_ATTN_FWD` / `ADVDMD_ATTN_BWD` override the measured defaults).
    pub attention: [(usize, String, String); 2],
    /// Streams a kernel device queues the model on (`ADVDMD_STREAMS`: 2 puts the text tokens'
    /// work on a second one).
    pub streams: usize,
    /// `ADVDMD_PDL` (programmatic dependent launches), as read.
    pub pdl: bool,
}

/// What the model path launches at head dim `d` on the device `--device cuda` would use (the
/// first GPU), or on the emulator when there is none.
fn attention_choice(d: usize, cuda: &CudaProbe) -> (usize, String, String) {
    let name = |v: String| v.to_lowercase();
    let has_wgmma = match cuda {
        CudaProbe::Found(gpus) => gpus.first().is_some_and(|g| g.compute_capability == (9, 0)),
        _ => true,
    };
    (
        d,
        name(format!("{:?}", FwdVariant::choose(d, has_wgmma).resolve(d))),
        name(format!("{:?}", BwdVariant::choose(d, has_wgmma).resolve(d))),
    )
}

pub fn gather() -> Info {
    let cuda = probe_cuda();
    Info {
        version: env!("CARGO_PKG_VERSION"),
        features: features(),
        cpu_threads: cpu_threads(),
        kernels: EMBEDDED_KERNELS.iter().map(|(n, _)| *n).collect(),
        attention: [attention_choice(64, &cuda), attention_choice(128, &cuda)],
        cuda,
        streams: crate::device::kernel::streams_env().unwrap_or(2),
        pdl: crate::device::kernel::pdl_env().unwrap_or(false),
    }
}

impl Info {
    pub fn to_json(&self) -> serde_json::Value {
        let gpus: Vec<serde_json::Value> = match &self.cuda {
            CudaProbe::Found(g) => g
                .iter()
                .map(|g| {
                    serde_json::json!({
                        "ordinal": g.ordinal,
                        "name": g.name,
                        "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                        "total_memory_bytes": g.total_memory_bytes,
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        serde_json::json!({
            "version": self.version,
            "features": self.features,
            "cpu_threads": self.cpu_threads,
            "cuda": self.cuda.to_string(),
            "gpus": gpus,
            "kernels": self.kernels,
            "attention": self.attention.iter().map(|(d, f, b)| {
                serde_json::json!({"head_dim": d, "fwd": f, "bwd": b})
            }).collect::<Vec<_>>(),
            "streams": self.streams,
            "pdl": self.pdl,
        })
    }

    pub fn to_text(&self) -> String {
        let kernels = if self.kernels.is_empty() {
            "none".to_string()
        } else {
            self.kernels.join(", ")
        };
        let features = if self.features.is_empty() {
            "none".to_string()
        } else {
            self.features.join(", ")
        };
        let attention: Vec<String> = self
            .attention
            .iter()
            .map(|(d, f, b)| format!("d{d} fwd {f} bwd {b}"))
            .collect();
        format!(
            "advdmd {}\nfeatures: {features}\ncpu: {} threads\ncuda: {}\nkernels embedded: {kernels}\n\
             attention kernels: {} (ADVDMD_ATTN_FWD / ADVDMD_ATTN_BWD override)\n\
             streams: {} (ADVDMD_STREAMS=1: all work on one stream)\n\
             programmatic dependent launches: {} (ADVDMD_PDL=1: on)\n",
            self.version,
            self.cpu_threads,
            self.cuda,
            attention.join(", "),
            self.streams,
            if self.pdl { "on" } else { "off" }
        )
    }
}
