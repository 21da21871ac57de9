//! Compiles every `cuda/*.cu` with nvcc into a fatbin (SASS + PTX per architecture) and embeds
//! the results as `EMBEDDED_KERNELS` (design/CUDA.md §3). Without nvcc the build warns and embeds
//! nothing, unless `ADVDMD_REQUIRE_NVCC=1` (set by CI) makes that an error. Never calls
//! nvidia-smi: architectures come from `ADVDMD_CUDA_ARCHS` (default "90").

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        candidates.push(Path::new(&h).join("bin/nvcc"));
    }
    candidates.push(PathBuf::from("nvcc"));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "ADVDMD_CUDA_ARCHS",
        "ADVDMD_REQUIRE_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rustc-check-cfg=cfg(advdmd_kernels)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let want = env::var("CARGO_FEATURE_CUDA").is_ok();
    let require = env::var("ADVDMD_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut table = String::from("pub static EMBEDDED_KERNELS: &[(&str, &[u8])] = &[\n");
    if want && !sources.is_empty() {
        match find_nvcc() {
            Some(nvcc) => {
                let archs = env::var("ADVDMD_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
                for src in &sources {
                    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                    let fatbin = out.join(format!("{stem}.fatbin"));
                    let mut cmd = Command::new(&nvcc);
                    cmd.args(["--fatbin", "-O3", "-std=c++17", "-lineinfo", "-Icuda"]);
                    for a in archs.split([';', ',']).filter(|a| !a.is_empty()) {
                        cmd.arg(format!(
                            "-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"
                        ));
                    }
                    cmd.arg("-o").arg(&fatbin).arg(src);
                    let res = cmd.output().expect("running nvcc");
                    if !res.status.success() {
                        panic!(
                            "nvcc failed on {}:\n{:?}\n{}",
                            src.display(),
                            cmd,
                            String::from_utf8_lossy(&res.stderr)
                        );
                    }
                    writeln!(
                        table,
                        "    ({stem:?}, include_bytes!({:?})),",
                        fatbin.display()
                    )
                    .unwrap();
                }
                println!("cargo:rustc-cfg=advdmd_kernels");
            }
            None if require => {
                panic!("ADVDMD_REQUIRE_NVCC=1 but nvcc was not found ($NVCC, $CUDA_HOME/bin, PATH)")
            }
            None => println!(
                "cargo:warning=nvcc not found: building without CUDA kernels (CPU backend only)"
            ),
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("writing kernels.rs");
}
