//! Builds the two executable forms of the CUDA kernels in `cuda/` (design/CUDA.md §3, §4).
//!
//! * GPU: with the `cuda` feature and nvcc found, every `cuda/*.cu` is compiled (in parallel) into
//!   a fatbin (SASS + PTX per architecture) embedded as `EMBEDDED_KERNELS`. ptxas's resource
//!   report (registers, shared memory, spills) goes to `$OUT_DIR/ptxas-report.txt`, is printed
//!   with `ADVDMD_PTXAS_REPORT=1`, and any spilling kernel fails the build unless
//!   `cuda/spill-allowlist.txt` names it. Without nvcc the build warns and embeds nothing, unless
//!   `ADVDMD_REQUIRE_NVCC=1` (set by CI) makes that an error. Never calls nvidia-smi:
//!   architectures come from `ADVDMD_CUDA_ARCHS` (default "90").
//! * CPU SIMT emulator: always (it needs only a C++17 compiler, `$CXX` or `c++`). Every
//!   `cuda/*.cu` plus the emulator's own test kernels (`cuda/emu/tests/*.cu`, never given to nvcc)
//!   is compiled with `-DADVDMD_EMU` together with one generated trampoline per
//!   `extern "C" __global__` function, and archived with the runtime (`cuda/emu/emu.cpp`) into a
//!   static library. `$OUT_DIR/emu_kernels.rs` lists (name, trampoline, parameter count) for
//!   `src/device/emu.rs`.
//!
//! Compiled objects are cached in `$OUT_DIR` keyed by a hash of the compiler, flags and every
//! source they can include, so editing one kernel recompiles only that file.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "ADVDMD_CUDA_ARCHS",
        "ADVDMD_REQUIRE_NVCC",
        "ADVDMD_PTXAS_REPORT",
        "CXX",
        "AR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // A directory: cargo rescans everything below it (kernels, headers, the emulator).
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rustc-check-cfg=cfg(advdmd_kernels)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let cuda = root.join("cuda");

    let sources = list_files(&cuda, "cu");
    let test_sources = list_files(&cuda.join("emu/tests"), "cu");
    // Everything a kernel file can include: part of every cache key.
    let mut headers = list_files(&cuda, "cuh");
    headers.extend(list_files(&cuda.join("emu"), "h"));
    headers.extend(list_files(&cuda.join("emu"), "cpp"));
    headers.extend(list_files(&cuda.join("emu/tests"), "cuh"));
    let header_text: String = headers.iter().map(|h| read(h)).collect();

    build_emulator(&out, &cuda, &sources, &test_sources, &header_text);
    build_fatbins(&out, &cuda, &sources, &header_text);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The files `dir/*.ext`, sorted (none if `dir` does not exist).
fn list_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn hash_of(parts: &[&str]) -> String {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Runs `cmd`; on failure returns the command line and its stderr for the build error.
fn run(cmd: &mut Command) -> Result<std::process::Output, String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(o),
        Ok(o) => Err(format!(
            "{cmd:?}\nexit status: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("{cmd:?}\ncould not run: {e}")),
    }
}

/// Runs `jobs` on up to `available_parallelism` threads, keeping their order.
fn parallel<T: Send, R: Send>(jobs: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(1);
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let job = queue.lock().unwrap().pop();
                let Some((i, job)) = job else { break };
                let r = f(job);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut r = results.into_inner().unwrap();
    r.sort_by_key(|(i, _)| *i);
    r.into_iter().map(|(_, r)| r).collect()
}

// ---- Kernel signatures ------------------------------------------------------------------------

struct Kernel {
    name: String,
    params: usize,
    /// Whether its body begins with `kernel_prologue();` (cuda/common.cuh): every kernel of the
    /// production sources must, since any of them may be launched as a programmatic dependent.
    prologue: bool,
}

/// Whether the function body opening at or after byte `close` (the end of the parameter list)
/// begins with `kernel_prologue();` (macro line continuations skipped).
fn begins_with_prologue(text: &str, close: usize) -> bool {
    let rest = text[close..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
    rest.strip_prefix('{').is_some_and(|body| {
        body.trim_start_matches(|c: char| c.is_whitespace() || c == '\\')
            .starts_with("kernel_prologue();")
    })
}

/// `src` with comments replaced by spaces (string literals kept, so `extern "C"` survives).
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str(&src[start..i.min(b.len())]);
        } else {
            let c = src[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Index just past the bracket that closes the one at `open`.
fn skip_balanced(b: &[u8], open: usize) -> usize {
    let mut depth = 0;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in a kernel signature")
}

/// Byte ranges of the `#define` directives of `text` (a directive goes on over lines that end in
/// a backslash).
fn define_ranges(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = text[from..].find("#define").map(|p| p + from) {
        let mut end = p;
        loop {
            let Some(nl) = text[end..].find('\n').map(|n| n + end) else {
                end = text.len();
                break;
            };
            end = nl + 1;
            if !text[..nl].trim_end().ends_with('\\') {
                break;
            }
        }
        out.push((p, end));
        from = end;
    }
    out
}

/// After `__global__` at byte `from`: `[__launch_bounds__(...)] void name ( params )` → the name,
/// the parameter count and the byte after the parameter list.
fn parse_signature(file: &Path, text: &str, from: usize) -> (String, usize, usize) {
    let b = text.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = from;
    let name = loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'\\') {
            i += 1;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let word = &text[start..i];
        match word {
            "" => panic!(
                "{}: cannot parse the kernel signature after byte {from}",
                file.display()
            ),
            "__launch_bounds__" => {
                let open = i + text[i..].find('(').expect("__launch_bounds__(");
                i = skip_balanced(b, open);
            }
            "void" | "static" | "inline" | "__noinline__" => {}
            _ => break word.to_string(),
        }
    };
    let open = i + text[i..].find('(').expect("kernel parameter list");
    let close = skip_balanced(b, open);
    let params = &text[open + 1..close - 1];
    let mut count = 0;
    let mut depth = 0i32;
    let mut any = false;
    for c in params.bytes() {
        match c {
            b'(' | b'<' | b'[' => depth += 1,
            b')' | b'>' | b']' => depth -= 1,
            b',' if depth == 0 => count += 1,
            _ => {}
        }
        any |= !c.is_ascii_whitespace() && c != b'\\';
    }
    let params = if !any || params.trim() == "void" {
        0
    } else {
        count + 1
    };
    (name, params, close)
}

/// The entry macros `#define`d in `text`: a `#define M(name, ...)` whose body defines an
/// `extern "C" __global__` function called by its first parameter, with that function's
/// parameter count.
fn entry_macros(file: &Path, text: &str) -> Vec<(String, usize, bool)> {
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    for (s, e) in define_ranges(text) {
        let Some(g) = text[s..e].find("__global__").map(|g| g + s) else {
            continue;
        };
        let before = text[..g].trim_end_matches(|c: char| c.is_whitespace() || c == '\\');
        if !before.ends_with("extern \"C\"") {
            continue;
        }
        let (name, params, close) = parse_signature(file, text, g + "__global__".len());
        let prologue = begins_with_prologue(text, close);
        let def = text[s + "#define".len()..].trim_start();
        let macro_name: String = def
            .bytes()
            .take_while(|&c| is_ident(c))
            .map(char::from)
            .collect();
        let first_param = def[macro_name.len()..]
            .trim_start()
            .trim_start_matches('(')
            .split([',', ')'])
            .next()
            .unwrap_or("")
            .trim();
        if first_param == name {
            out.push((macro_name, params, prologue));
        }
    }
    out
}

/// The `extern "C" __global__` functions of a kernel file: name and parameter count (the
/// trampoline checks the count against the compiler's view with a static_assert). Besides the
/// functions written out, each invocation `M(kernel_name, ...)` of an entry macro
/// ([`entry_macros`], defined in the file or in `headers`) outside `#define`s declares one.
fn parse_kernels(file: &Path, src: &str, headers: &str) -> Vec<Kernel> {
    let text = strip_comments(src);
    let b = text.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let defines = define_ranges(&text);
    let in_define = |p: usize| defines.iter().any(|&(s, e)| p >= s && p < e);
    let mut kernels = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("__global__").map(|p| p + from) {
        from = pos + "__global__".len();
        if (pos > 0 && is_ident(b[pos - 1])) || b.get(from).is_some_and(|&c| is_ident(c)) {
            continue; // part of a longer identifier
        }
        if in_define(pos) {
            continue; // an entry macro's body (below) or another macro
        }
        if !text[..pos].trim_end().ends_with("extern \"C\"") {
            println!(
                "cargo:warning={}: a __global__ function without extern \"C\" cannot be launched by name",
                file.display()
            );
            continue;
        }
        let (name, params, close) = parse_signature(file, &text, from);
        let prologue = begins_with_prologue(&text, close);
        kernels.push(Kernel {
            name,
            params,
            prologue,
        });
        from = close;
    }
    let mut macros = entry_macros(file, &strip_comments(headers));
    macros.extend(entry_macros(file, &text));
    for (m, params, prologue) in macros {
        let mut at = 0;
        while let Some(pos) = text[at..].find(m.as_str()).map(|p| p + at) {
            at = pos + m.len();
            let inside_word =
                (pos > 0 && is_ident(b[pos - 1])) || b.get(at).is_some_and(|&c| is_ident(c));
            if inside_word || in_define(pos) || !text[at..].trim_start().starts_with('(') {
                continue;
            }
            let args = &text[at + text[at..].find('(').unwrap() + 1..];
            let name = args
                .split([',', ')'])
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if name.is_empty() || !name.bytes().all(is_ident) {
                panic!(
                    "{}: entry macro {m} invoked without a kernel name",
                    file.display()
                );
            }
            kernels.push(Kernel {
                name,
                params,
                prologue,
            });
        }
    }
    kernels
}

// ---- The CPU SIMT emulator -------------------------------------------------------------------

fn build_emulator(
    out: &Path,
    cuda: &Path,
    sources: &[PathBuf],
    test_sources: &[PathBuf],
    header_text: &str,
) {
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".into());
    let ar = env::var("AR").unwrap_or_else(|_| "ar".into());
    let dir = out.join("emu");
    std::fs::create_dir_all(&dir).expect("creating $OUT_DIR/emu");
    let flags: Vec<String> = [
        "-O2",
        "-std=c++17",
        "-DADVDMD_EMU",
        "-fno-strict-aliasing",
        "-fPIC",
        "-Wno-unknown-pragmas",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("-I{}", cuda.display())])
    .collect();

    // One translation unit per kernel file: the file itself, then its trampolines.
    let mut units: Vec<(String, String)> = Vec::new(); // (unit name, C++ text)
    let mut table: Vec<(Kernel, String)> = Vec::new(); // (kernel, file, for messages)
    units.push((
        "runtime".into(),
        format!("#include \"{}\"\n", cuda.join("emu/emu.cpp").display()),
    ));
    let tagged = sources
        .iter()
        .map(|s| ("k", s))
        .chain(test_sources.iter().map(|s| ("t", s)));
    for (tag, src) in tagged {
        let kernels = parse_kernels(src, &read(src), header_text);
        let mut unit = format!(
            "// Generated by build.rs: {} and its emulator trampolines.\n#include \"{}\"\n",
            src.display(),
            src.display()
        );
        for k in &kernels {
            writeln!(
                unit,
                "extern \"C\" void advdmd_emu_tramp_{n}(void** args) {{ ::emu::invoke(&{n}, args); }}\n\
                 static_assert(::emu::arity(&{n}) == {p}, \"build.rs counted {p} parameters for {n}\");",
                n = k.name,
                p = k.params
            )
            .unwrap();
        }
        let stem = src.file_stem().unwrap().to_string_lossy();
        units.push((format!("{tag}_{stem}"), unit));
        let rel = src.strip_prefix(cuda.parent().unwrap()).unwrap_or(src);
        table.extend(kernels.into_iter().map(|k| (k, rel.display().to_string())));
    }
    let mut seen = BTreeMap::new();
    for (k, file) in &table {
        if let Some(prev) = seen.insert(k.name.clone(), file.clone()) {
            panic!("kernel {} is defined in both {prev} and {file}", k.name);
        }
    }

    let flags_text = format!("{cxx} {}", flags.join(" "));
    let results = parallel(units, |(name, text)| -> Result<PathBuf, String> {
        let cpp = dir.join(format!("{name}.cpp"));
        let obj = dir.join(format!("{name}.o"));
        let keyf = dir.join(format!("{name}.key"));
        // The wrapper names its source by path; the key also covers the source's contents.
        let src_text = text
            .lines()
            .filter_map(|l| l.strip_prefix("#include \""))
            .map(|p| std::fs::read_to_string(p.trim_end_matches('"')).unwrap_or_default())
            .collect::<String>();
        let key = hash_of(&[&flags_text, &text, &src_text, header_text]);
        if obj.exists() && std::fs::read_to_string(&keyf).is_ok_and(|k| k == key) {
            return Ok(obj);
        }
        std::fs::write(&cpp, &text).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&cxx);
        cmd.args(&flags).arg("-c").arg(&cpp).arg("-o").arg(&obj);
        run(&mut cmd)?;
        std::fs::write(&keyf, key).map_err(|e| e.to_string())?;
        Ok(obj)
    });
    let mut objs = Vec::new();
    let mut errors = String::new();
    for r in results {
        match r {
            Ok(o) => objs.push(o),
            Err(e) => errors.push_str(&e),
        }
    }
    if !errors.is_empty() {
        panic!("compiling the CUDA kernels for the CPU emulator failed:\n{errors}");
    }
    let lib = out.join("libadvdmd_emu.a");
    let _ = std::fs::remove_file(&lib);
    if let Err(e) = run(Command::new(&ar).arg("crs").arg(&lib).args(&objs)) {
        panic!("archiving the emulator library failed:\n{e}");
    }
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=advdmd_emu");
    println!("cargo:rustc-link-lib=dylib=stdc++");

    let mut rs = String::from(
        "// Generated by build.rs: the kernels the CPU emulator can run.\n\
         extern \"C\" {\n",
    );
    for (k, _) in &table {
        writeln!(
            rs,
            "    fn advdmd_emu_tramp_{}(args: *mut *mut std::ffi::c_void);",
            k.name
        )
        .unwrap();
    }
    rs.push_str("}\n\nstatic EMU_KERNELS: &[EmuKernel] = &[\n");
    for (k, file) in &table {
        writeln!(
            rs,
            "    EmuKernel {{ name: {:?}, file: {file:?}, params: {}, tramp: advdmd_emu_tramp_{} }},",
            k.name, k.params, k.name
        )
        .unwrap();
    }
    rs.push_str("];\n");
    std::fs::write(out.join("emu_kernels.rs"), rs).expect("writing emu_kernels.rs");
}

// ---- nvcc ----------------------------------------------------------------------------------

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

/// One kernel's line of ptxas's `-v` report.
#[derive(Default)]
struct Resources {
    arch: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    /// ptxas serialized the kernel's wgmma (C7514/C7515: an ordinary instruction touches an
    /// accumulator while a product may still write it), so none of its products overlap.
    wgmma_serialized: bool,
}

/// The number before `unit` in `line` ("..., 40 bytes spill stores" → 40).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas `-v` output: per function (entry or not) and architecture.
fn parse_ptxas(stderr: &str) -> Vec<(String, Resources)> {
    let mut out: Vec<(String, Resources)> = Vec::new();
    let mut serialized: Vec<String> = Vec::new();
    let mut arch = String::new();
    let mut current: Option<usize> = None;
    let quoted = |l: &str, after: &str| -> Option<String> {
        let rest = &l[l.find(after)? + after.len()..];
        let rest = rest.trim_start().trim_start_matches('\'');
        Some(rest[..rest.find('\'').unwrap_or(rest.len())].to_string())
    };
    for line in stderr.lines() {
        if line.contains("wgmma.mma_async instructions are serialized") {
            serialized.extend(quoted(line, "in the function"));
        }
        if line.contains("Compiling entry function") {
            arch = line
                .rsplit("for '")
                .next()
                .unwrap_or("")
                .trim_end_matches('\'')
                .to_string();
        }
        if let Some(name) = quoted(line, "Function properties for ") {
            out.push((
                name,
                Resources {
                    arch: arch.clone(),
                    ..Default::default()
                },
            ));
            current = Some(out.len() - 1);
        } else if let Some(i) = current {
            let r = &mut out[i].1;
            if line.contains("spill stores") {
                r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
                current = None;
            }
        }
    }
    for (name, r) in &mut out {
        r.wgmma_serialized = serialized.contains(name);
    }
    out
}

/// A file that says `advdmd-arch: 90a` (Hopper-only instructions: wgmma, setmaxnreg) is compiled
/// for sm_90a alone, whatever `ADVDMD_CUDA_ARCHS` lists; every other file takes `args` as they are.
fn arch_args(args: &[String], source: &str) -> Vec<String> {
    if !source.contains("advdmd-arch: 90a") {
        return args.to_vec();
    }
    args.iter()
        .filter(|a| !a.starts_with("-gencode"))
        .cloned()
        .chain(["-gencode=arch=compute_90a,code=[sm_90a,compute_90a]".to_string()])
        .collect()
}

fn build_fatbins(out: &Path, cuda: &Path, sources: &[PathBuf], header_text: &str) {
    let want = env::var("CARGO_FEATURE_CUDA").is_ok();
    let require = env::var("ADVDMD_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut table = String::from("pub static EMBEDDED_KERNELS: &[(&str, &[u8])] = &[\n");
    if want && !sources.is_empty() {
        match find_nvcc() {
            Some(nvcc) => {
                let archs = env::var("ADVDMD_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
                let mut args: Vec<String> = [
                    "--fatbin",
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                    "-Xptxas",
                    "-v",
                ]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("-I{}", cuda.display())])
                .collect();
                for a in archs.split([';', ',']).filter(|a| !a.is_empty()) {
                    args.push(format!(
                        "-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"
                    ));
                }
                let args_text = format!("{} {}", nvcc.display(), args.join(" "));
                let results = parallel(
                    sources.to_vec(),
                    |src| -> Result<(PathBuf, String), String> {
                        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                        let fatbin = out.join(format!("{stem}.fatbin"));
                        let reportf = out.join(format!("{stem}.ptxas.txt"));
                        let keyf = out.join(format!("{stem}.fatbin.key"));
                        let text = read(&src);
                        let file_args = arch_args(&args, &text);
                        let key = hash_of(&[&file_args.join(" "), &args_text, &text, header_text]);
                        if fatbin.exists() && std::fs::read_to_string(&keyf).is_ok_and(|k| k == key)
                        {
                            if let Ok(report) = std::fs::read_to_string(&reportf) {
                                return Ok((fatbin, report));
                            }
                        }
                        let mut cmd = Command::new(&nvcc);
                        cmd.args(&file_args).arg("-o").arg(&fatbin).arg(&src);
                        let res = run(&mut cmd)?;
                        // ptxas -v writes to stderr (some versions to stdout): keep both.
                        let report = format!(
                            "{}{}",
                            String::from_utf8_lossy(&res.stdout),
                            String::from_utf8_lossy(&res.stderr)
                        );
                        std::fs::write(&reportf, &report).map_err(|e| e.to_string())?;
                        std::fs::write(&keyf, key).map_err(|e| e.to_string())?;
                        Ok((fatbin, report))
                    },
                );
                let mut errors = String::new();
                let mut report = String::from(
                    "# file  kernel  arch  registers  smem_bytes  stack_bytes  spill_stores  spill_loads  \
                     wgmma_serialized\n",
                );
                let allow = allowlist(&cuda.join("spill-allowlist.txt"));
                let allow_serial = allowlist(&cuda.join("wgmma-serial-allowlist.txt"));
                let mut spills = Vec::new();
                for (src, r) in sources.iter().zip(results) {
                    let (fatbin, text) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            errors.push_str(&e);
                            continue;
                        }
                    };
                    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                    // ptxas ignoring a setmaxnreg (C7508) leaves a warp-specialized kernel's
                    // consumers on the entry budget, which spills or starves them.
                    for line in text.lines().filter(|l| l.contains("(C7508)")) {
                        spills.push(format!("{stem}.cu: setmaxnreg ignored: {}", line.trim()));
                    }
                    // `advdmd-entry-registers: KERNEL N` in a source: the register count at
                    // launch that the kernel's setmaxnreg split was sized for (setmaxnreg.inc
                    // waits for the block's pool: a split over the entry budget hangs).
                    let entry: Vec<(String, u32)> = read(src)
                        .lines()
                        .filter_map(|l| l.split("advdmd-entry-registers:").nth(1))
                        .filter_map(|d| {
                            let mut w = d.split_whitespace();
                            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
                        })
                        .collect();
                    let ptxas = parse_ptxas(&text);
                    for (kernel, want) in &entry {
                        match ptxas.iter().find(|(n, _)| n == kernel) {
                            Some((_, r)) if r.registers == *want => {}
                            found => spills.push(format!(
                                "{stem}.cu: {kernel} has {} registers at entry; its setmaxnreg \
                                 split assumes {want} (advdmd-entry-registers)",
                                found.map_or("no ptxas line / ".into(), |(_, r)| r
                                    .registers
                                    .to_string())
                            )),
                        }
                    }
                    for (name, r) in ptxas {
                        writeln!(
                            report,
                            "{stem}.cu  {name}  {}  {}  {}  {}  {}  {}  {}",
                            r.arch,
                            r.registers,
                            r.smem,
                            r.stack,
                            r.spill_stores,
                            r.spill_loads,
                            r.wgmma_serialized
                        )
                        .unwrap();
                        if (r.spill_stores > 0 || r.spill_loads > 0) && !allow.contains(&name) {
                            spills.push(format!(
                                "{stem}.cu: {name} ({}) spills {} bytes stored, {} bytes loaded \
                                 (cuda/spill-allowlist.txt)",
                                r.arch, r.spill_stores, r.spill_loads
                            ));
                        }
                        if r.wgmma_serialized && !allow_serial.contains(&name) {
                            spills.push(format!(
                                "{stem}.cu: {name} ({}) has its wgmma serialized by ptxas \
                                 (C7514/C7515; list it in cuda/wgmma-serial-allowlist.txt, with \
                                 the reason, to accept it)",
                                r.arch
                            ));
                        }
                    }
                    writeln!(
                        table,
                        "    ({stem:?}, include_bytes!({:?})),",
                        fatbin.display()
                    )
                    .unwrap();
                }
                if !errors.is_empty() {
                    panic!("nvcc failed:\n{errors}");
                }
                std::fs::write(out.join("ptxas-report.txt"), &report)
                    .expect("writing ptxas-report.txt");
                if env::var("ADVDMD_PTXAS_REPORT").is_ok_and(|v| v == "1") {
                    for line in report.lines() {
                        println!("cargo:warning=ptxas: {line}");
                    }
                }
                if !spills.is_empty() {
                    panic!(
                        "register spills, serialized wgmma or an ignored setmaxnreg (a line \
                         names the allowlist that accepts it, if any):\n{}\nfull report: {}",
                        spills.join("\n"),
                        out.join("ptxas-report.txt").display()
                    );
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
    // Which module holds each kernel, so the runtime loads one module per family on first use
    // and never probes modules that lack a name.
    table.push_str("pub static KERNEL_MODULES: &[(&str, &str)] = &[\n");
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        for k in parse_kernels(src, &read(src), header_text) {
            if !k.prologue {
                panic!(
                    "{}: kernel {} does not begin with `kernel_prologue();` (cuda/common.cuh: \
                     any kernel may be launched as a programmatic dependent)",
                    src.display(),
                    k.name
                );
            }
            writeln!(table, "    ({:?}, {stem:?}),", k.name).unwrap();
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("writing kernels.rs");
}

/// Kernel names an allowlist accepts (`cuda/spill-allowlist.txt`: spills;
/// `cuda/wgmma-serial-allowlist.txt`: serialized wgmma): the first word of each line (`#` starts
/// a comment).
fn allowlist(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
