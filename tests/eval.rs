//! Shapes evaluation: the checker (oracle score on rendered data, rejections, robustness to
//! noise), Shapes-FD (against closed forms), PNG and grid IO, and scoring a folder end to end.
mod common;

use advdmd::data::shapes::{
    render, render_u8, sample_scene, scene_for_prompt, write_dataset, Color, Object, Prompt, Scene,
    ShapeKind, Task,
};
use advdmd::eval::checker::{check, check_f32, detect_objects};
use advdmd::eval::fd::{
    fd, features, features_u8, frechet_distance, sym_eigen, trace_sqrt_product, Features,
    FEATURE_DIM,
};
use advdmd::eval::image::{
    decode_png, encode_png, from_u8, grid, read_png, to_u8, write_grid, write_png,
};
use advdmd::eval::{evaluate_folder, evaluate_images, evaluation_prompts, read_manifest};
use advdmd::Rng;
use common::ScratchDir;
use std::time::Instant;

fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("eval-{name}"))
}

fn obj(color: Color, shape: ShapeKind, x: usize, y: usize, size: usize) -> Object {
    Object {
        color,
        shape,
        x,
        y,
        size,
    }
}

fn scene(objects: Vec<Object>) -> Scene {
    Scene {
        prompt: String::new(),
        task: Task::Single,
        objects,
    }
}

/// Fraction of `n` fresh scenes per task the checker accepts, images transformed by `f` first.
fn task_accuracy(
    task: Task,
    n: usize,
    seed: u64,
    f: impl Fn(Vec<f32>, &mut Rng) -> Vec<f32>,
) -> f64 {
    let mut rng = Rng::new(seed);
    let mut ok = 0;
    for _ in 0..n {
        let s = sample_scene(Some(task), &mut rng);
        let img = f(render(&s), &mut rng);
        if check_f32(&img, &s.prompt).unwrap() {
            ok += 1;
        }
    }
    ok as f64 / n as f64
}

#[test]
fn oracle_is_at_least_099_on_every_task() {
    for task in Task::ALL {
        let acc = task_accuracy(task, 1000, 100 + task as u64, |im, _| im);
        println!("oracle {:<9} {acc:.4} (1000 scenes)", task.name());
        assert!(acc >= 0.99, "{task}: oracle {acc}");
    }
}

#[test]
fn checker_stays_above_095_under_gaussian_noise() {
    // σ = 24/255 of the [0, 1] range is 2·24/255 in [−1, 1].
    let sigma = 2.0 * 24.0 / 255.0;
    let mut worst: f64 = 1.0;
    for task in Task::ALL {
        let acc = task_accuracy(task, 500, 200 + task as u64, |im, rng| {
            im.into_iter().map(|v| v + sigma * rng.normal()).collect()
        });
        println!("noise σ=24/255 {:<9} {acc:.4} (500 scenes)", task.name());
        worst = worst.min(acc);
    }
    assert!(worst >= 0.95, "worst task under noise {worst}");
}

/// Separable Gaussian blur (σ = 0.5 px, 3 taps, edges clamped) of a [3, 16, 16] image in [−1, 1].
fn blur_half_pixel(im: &[f32]) -> Vec<f32> {
    let e = (-2.0f32).exp();
    let k = [
        e / (1.0 + 2.0 * e),
        1.0 / (1.0 + 2.0 * e),
        e / (1.0 + 2.0 * e),
    ];
    let pass = |src: &[f32], horizontal: bool| {
        let mut out = vec![0f32; src.len()];
        for c in 0..3 {
            for y in 0..16i32 {
                for x in 0..16i32 {
                    let mut s = 0.0;
                    for (t, kv) in k.iter().enumerate() {
                        let o = t as i32 - 1;
                        let (xx, yy) = if horizontal {
                            ((x + o).clamp(0, 15), y)
                        } else {
                            (x, (y + o).clamp(0, 15))
                        };
                        s += kv * (src[c * 256 + (yy * 16 + xx) as usize] + 1.0);
                    }
                    out[c * 256 + (y * 16 + x) as usize] = s - 1.0;
                }
            }
        }
        out
    };
    pass(&pass(im, true), false)
}

#[test]
fn checker_under_blur_and_noise() {
    // A characterisation for reading model scores: σ = 24/255 in [−1, 1] units (12 pixel levels)
    // plus a 0.5-px blur. Counting is the weak task by design: blur fills the 1-px gap between two
    // same-colour objects and the components merge, which the checker rightly calls one object.
    let sigma = 24.0 / 255.0;
    for task in Task::ALL {
        let acc = task_accuracy(task, 500, 300 + task as u64, |im, rng| {
            blur_half_pixel(&im)
                .into_iter()
                .map(|v| v + sigma * rng.normal())
                .collect()
        });
        println!(
            "blur 0.5 px + noise 12/255 {:<9} {acc:.4} (500 scenes)",
            task.name()
        );
        let floor = if task == Task::Counting { 0.85 } else { 0.97 };
        assert!(acc >= floor, "{task}: {acc}");
    }
}

#[test]
fn detect_objects_finds_colour_shape_size_and_centroid() {
    let s = scene(vec![
        obj(Color::Green, ShapeKind::Triangle, 1, 2, 6),
        obj(Color::Blue, ShapeKind::Circle, 9, 8, 7),
        obj(Color::Yellow, ShapeKind::Square, 2, 11, 4),
    ]);
    let det = detect_objects(&render_u8(&s)).unwrap();
    assert_eq!(det.len(), 3, "{det:?}");
    for o in &s.objects {
        let d = det.iter().find(|d| d.color == o.color).unwrap();
        assert_eq!(d.shape, o.shape, "{d:?}");
        assert_eq!(d.size, o.size, "{d:?}");
        assert_eq!((d.x, d.y), (o.x as i32, o.y as i32), "{d:?}");
        // Symmetric shapes centre on the box centre; a triangle's mass sits lower.
        let (bx, by) = (
            o.x as f64 + o.size as f64 / 2.0,
            o.y as f64 + o.size as f64 / 2.0,
        );
        assert!((d.cx - bx).abs() < 0.15, "{d:?}");
        if o.shape == ShapeKind::Triangle {
            assert!(d.cy > by + 0.3, "{d:?}");
        } else {
            assert!((d.cy - by).abs() < 0.15, "{d:?}");
        }
    }
    assert!(detect_objects(&[0u8; 10]).is_err());
    assert!(detect_objects(&[0u8; 768]).unwrap().is_empty());
}

fn checks(objects: Vec<Object>, prompt: &str) -> bool {
    check(&render_u8(&scene(objects)), prompt).unwrap()
}

#[test]
fn checker_accepts_the_named_scene() {
    let red_circle = obj(Color::Red, ShapeKind::Circle, 1, 1, 6);
    let blue_square = obj(Color::Blue, ShapeKind::Square, 9, 9, 5);
    assert!(checks(vec![red_circle], "a red circle"));
    assert!(checks(vec![red_circle], "a red circle on the left"));
    assert!(checks(vec![red_circle], "a red circle on the top"));
    assert!(checks(
        vec![red_circle, blue_square],
        "a red circle and a blue square"
    ));
    assert!(checks(
        vec![blue_square, red_circle],
        "a red circle and a blue square"
    ));
    assert!(checks(
        vec![red_circle, blue_square],
        "a red circle left of a blue square"
    ));
    assert!(checks(
        vec![red_circle, blue_square],
        "a blue square below a red circle"
    ));
    let c2 = obj(Color::Red, ShapeKind::Circle, 9, 2, 5);
    assert!(checks(vec![red_circle, c2], "two red circles"));
}

#[test]
fn checker_rejects_wrong_colour() {
    let o = obj(Color::Red, ShapeKind::Circle, 5, 5, 6);
    for p in ["a green circle", "a magenta circle", "a yellow circle"] {
        assert!(!checks(vec![o], p), "{p}");
    }
    let o = obj(Color::Cyan, ShapeKind::Square, 5, 5, 5);
    assert!(!checks(vec![o], "a blue square"));
    assert!(!checks(vec![o], "a green square"));
}

#[test]
fn checker_rejects_wrong_shape() {
    for d in 4..=7 {
        for (have, want) in [
            (ShapeKind::Circle, "square"),
            (ShapeKind::Circle, "triangle"),
            (ShapeKind::Square, "circle"),
            (ShapeKind::Square, "triangle"),
            (ShapeKind::Triangle, "circle"),
            (ShapeKind::Triangle, "square"),
        ] {
            let o = obj(Color::Yellow, have, 4, 4, d);
            assert!(!checks(vec![o], &format!("a yellow {want}")), "{have} {d}");
            assert!(
                checks(vec![o], &format!("a yellow {}", have.name())),
                "{have} {d}"
            );
        }
    }
}

#[test]
fn checker_rejects_wrong_count_and_extra_objects() {
    let a = obj(Color::Red, ShapeKind::Square, 1, 1, 5);
    let b = obj(Color::Red, ShapeKind::Square, 9, 9, 5);
    let c = obj(Color::Green, ShapeKind::Triangle, 9, 1, 5);
    assert!(!checks(vec![a], "two red squares"));
    assert!(!checks(
        vec![a, b, obj(Color::Red, ShapeKind::Square, 1, 9, 5)],
        "two red squares"
    ));
    assert!(!checks(vec![a, b], "a red square"));
    assert!(!checks(vec![a, c], "a red square"));
    assert!(!checks(vec![a, b, c], "two red squares"));
    assert!(!checks(vec![a], "a red square and a green triangle"));
    assert!(!checks(vec![], "a red square"));
    // Two same-colour squares that touch merge into one blob: not two squares.
    let touching = obj(Color::Red, ShapeKind::Square, 6, 1, 5);
    assert!(!checks(vec![a, touching], "two red squares"));
}

#[test]
fn checker_rejects_wrong_position_and_relation() {
    let left = obj(Color::Red, ShapeKind::Circle, 1, 5, 6);
    assert!(checks(vec![left], "a red circle on the left"));
    assert!(!checks(vec![left], "a red circle on the right"));
    let top = obj(Color::Red, ShapeKind::Circle, 5, 0, 6);
    assert!(!checks(vec![top], "a red circle on the bottom"));
    // Straddling the centre line: neither side is right for a centred object.
    let mid = obj(Color::Red, ShapeKind::Square, 5, 5, 6);
    assert!(!checks(vec![mid], "a red square on the left"));
    assert!(!checks(vec![mid], "a red square on the right"));

    let a = obj(Color::Magenta, ShapeKind::Triangle, 1, 1, 5);
    let b = obj(Color::Cyan, ShapeKind::Square, 9, 9, 5);
    assert!(checks(
        vec![a, b],
        "a magenta triangle left of a cyan square"
    ));
    assert!(checks(vec![a, b], "a magenta triangle above a cyan square"));
    assert!(!checks(
        vec![a, b],
        "a magenta triangle right of a cyan square"
    ));
    assert!(!checks(
        vec![a, b],
        "a magenta triangle below a cyan square"
    ));
    assert!(!checks(
        vec![a, b],
        "a cyan square left of a magenta triangle"
    ));
    // Side by side at the same height: neither above nor below.
    let c = obj(Color::Cyan, ShapeKind::Triangle, 9, 1, 5);
    assert!(checks(
        vec![a, c],
        "a magenta triangle left of a cyan triangle"
    ));
    assert!(!checks(
        vec![a, c],
        "a magenta triangle above a cyan triangle"
    ));
    assert!(!checks(
        vec![a, c],
        "a magenta triangle below a cyan triangle"
    ));
}

#[test]
fn checker_rejects_bad_input_with_errors() {
    assert!(check(&[0u8; 768], "a red blob").is_err());
    assert!(check(&[0u8; 700], "a red circle").is_err());
    assert!(check_f32(&[0f32; 10], "a red circle").is_err());
    assert!(!check(&[0u8; 768], "a red circle").unwrap());
}

#[test]
fn check_f32_agrees_with_check_on_u8() {
    let mut rng = Rng::new(77);
    for _ in 0..200 {
        let s = sample_scene(None, &mut rng);
        let f = render(&s);
        assert_eq!(
            check_f32(&f, &s.prompt).unwrap(),
            check(&to_u8(&f), &s.prompt).unwrap()
        );
    }
}

fn random_features(n: usize, seed: u64, scale: &[f64]) -> Vec<Features> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let mut f = [0f64; FEATURE_DIM];
            for (i, v) in f.iter_mut().enumerate() {
                *v = rng.normal() as f64 * scale[i % scale.len()];
            }
            f
        })
        .collect()
}

#[test]
fn fd_of_identical_sets_is_zero_and_fd_is_symmetric() {
    let a = random_features(400, 1, &[1.0, 0.5, 0.1]);
    let b = random_features(400, 2, &[0.8, 0.5, 0.3]);
    let same = fd(&a, &a);
    assert!(same.abs() < 1e-8, "fd(a, a) = {same}");
    let ab = fd(&a, &b);
    let ba = fd(&b, &a);
    assert!(ab > 1.0, "{ab}");
    assert!((ab - ba).abs() < 1e-8 * ab.max(1.0), "{ab} vs {ba}");
    assert!(fd(&a, &[]).is_nan());
}

#[test]
fn fd_of_a_shifted_set_is_the_squared_shift() {
    let a = random_features(300, 3, &[1.0, 0.2]);
    let mut rng = Rng::new(4);
    let shift: Vec<f64> = (0..FEATURE_DIM)
        .map(|_| rng.normal() as f64 * 0.3)
        .collect();
    let b: Vec<Features> = a
        .iter()
        .map(|x| {
            let mut y = *x;
            y.iter_mut().zip(&shift).for_each(|(v, s)| *v += s);
            y
        })
        .collect();
    let want: f64 = shift.iter().map(|s| s * s).sum();
    let got = fd(&a, &b);
    assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
}

#[test]
fn trace_sqrt_matches_closed_forms() {
    // Diagonal covariances: FD's trace part is Σ (√a − √b)².
    let n = 6;
    let a = [1.0, 4.0, 0.25, 9.0, 0.0, 2.0];
    let b = [4.0, 1.0, 0.25, 1.0, 3.0, 0.5];
    let diag = |v: &[f64]| {
        let mut m = vec![0f64; n * n];
        for i in 0..n {
            m[i * n + i] = v[i];
        }
        m
    };
    let zeros = vec![0f64; n];
    let got = frechet_distance(&zeros, &diag(&a), &zeros, &diag(&b));
    let want: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
        .sum();
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");

    // General 2×2 PSD matrices: the eigenvalues of Σ1Σ2 are non-negative, so
    // Tr (Σ1Σ2)^{1/2} = √(tr(Σ1Σ2) + 2 √det(Σ1Σ2)).
    let s1: [f64; 4] = [2.0, 0.7, 0.7, 1.0];
    let s2: [f64; 4] = [0.5, -0.3, -0.3, 3.0];
    let prod = [
        s1[0] * s2[0] + s1[1] * s2[2],
        s1[0] * s2[1] + s1[1] * s2[3],
        s1[2] * s2[0] + s1[3] * s2[2],
        s1[2] * s2[1] + s1[3] * s2[3],
    ];
    let tr = prod[0] + prod[3];
    let det = prod[0] * prod[3] - prod[1] * prod[2];
    let want = (tr + 2.0 * det.sqrt()).sqrt();
    let got = trace_sqrt_product(&s1, &s2, 2);
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
    // Rank-deficient input: the clamp keeps it finite.
    let r = trace_sqrt_product(&[1.0, 1.0, 1.0, 1.0], &[1.0, 0.0, 0.0, 0.0], 2);
    assert!((r - 1.0).abs() < 1e-7, "{r}");
}

#[test]
fn jacobi_eigendecomposition_reconstructs_the_matrix() {
    let n = 40;
    let mut rng = Rng::new(8);
    let g: Vec<f64> = (0..n * n).map(|_| rng.normal() as f64).collect();
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            a[i * n + j] = g[i * n + j] + g[j * n + i];
        }
    }
    let (w, v) = sym_eigen(&a, n);
    let mut max_err: f64 = 0.0;
    for i in 0..n {
        for j in 0..n {
            let r: f64 = (0..n).map(|k| v[i * n + k] * w[k] * v[j * n + k]).sum();
            max_err = max_err.max((r - a[i * n + j]).abs());
            let o: f64 = (0..n).map(|k| v[k * n + i] * v[k * n + j]).sum();
            let id = if i == j { 1.0 } else { 0.0 };
            max_err = max_err.max((o - id).abs());
        }
    }
    assert!(max_err < 1e-10, "{max_err}");
}

#[test]
fn features_pool_two_by_two_in_unit_range() {
    let s = scene(vec![obj(Color::Red, ShapeKind::Square, 0, 0, 2)]);
    let f = features(&render(&s));
    assert!((f[0] - 220.0 / 255.0).abs() < 1e-12);
    assert!((f[64] - 40.0 / 255.0).abs() < 1e-12);
    assert!(f[1..64].iter().all(|&v| v == 0.0));
    let u = render_u8(&s);
    assert_eq!(features_u8(&u), f);
}

#[test]
fn real_vs_real_fd_is_far_below_fd_against_wrong_images() {
    let mut rng = Rng::new(21);
    let set = |rng: &mut Rng| -> Vec<Features> {
        (0..500)
            .map(|_| features(&render(&sample_scene(None, rng))))
            .collect()
    };
    let (a, b) = (set(&mut rng), set(&mut rng));
    let blank: Vec<Features> = (0..500)
        .map(|i| {
            let mut f = [0f64; FEATURE_DIM];
            f[i % FEATURE_DIM] = 0.01;
            f
        })
        .collect();
    let floor = fd(&a, &b);
    let bad = fd(&a, &blank);
    println!("real-vs-real FD {floor:.4}, real-vs-blank FD {bad:.4}");
    assert!(floor * 5.0 < bad, "{floor} vs {bad}");
}

#[test]
fn png_round_trip_and_conversions() {
    let dir = tmpdir("png");
    let s = sample_scene(None, &mut Rng::new(1));
    let u = render_u8(&s);
    let p = dir.join("a.png");
    write_png(&p, &u, 16, 16).unwrap();
    let (back, w, h) = read_png(&p).unwrap();
    assert_eq!((w, h), (16, 16));
    assert_eq!(back, u);
    // u8 → f32 → u8 is exact.
    let all: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
    assert_eq!(to_u8(&from_u8(&all)), all);
    // Rounding to nearest and clamping.
    assert_eq!(to_u8(&[-2.0, 2.0, f32::NAN]), vec![0, 255, 0]);
    // Non-square images survive too.
    let rect: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 7) as u8).collect();
    let (r, w, h) = decode_png(&encode_png(&rect, 5, 3).unwrap(), "mem").unwrap();
    assert_eq!((r, w, h), (rect, 5, 3));
    assert!(encode_png(&[0u8; 5], 2, 2).is_err());
}

#[test]
fn read_png_converts_gray_and_rgba_and_names_bad_files() {
    let dir = tmpdir("pngconv");
    let write = |name: &str, ct: png::ColorType, data: &[u8]| {
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, 2, 1);
        enc.set_color(ct);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(data).unwrap();
        wr.finish().unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("g.png", png::ColorType::Grayscale, &[10, 200]);
    write(
        "rgba.png",
        png::ColorType::Rgba,
        &[200, 100, 50, 255, 200, 100, 50, 0],
    );
    assert_eq!(
        read_png(dir.join("g.png")).unwrap().0,
        vec![10, 10, 10, 200, 200, 200]
    );
    assert_eq!(
        read_png(dir.join("rgba.png")).unwrap().0,
        vec![200, 100, 50, 0, 0, 0]
    );
    std::fs::write(dir.join("junk.png"), b"not a png at all").unwrap();
    let e = read_png(dir.join("junk.png")).unwrap_err().to_string();
    assert!(e.contains("junk.png"), "{e}");
    // A truncated real PNG.
    let good = encode_png(&[9u8; 16 * 16 * 3], 16, 16).unwrap();
    std::fs::write(dir.join("cut.png"), &good[..good.len() / 2]).unwrap();
    let e = read_png(dir.join("cut.png")).unwrap_err().to_string();
    assert!(e.contains("cut.png"), "{e}");
    let e = read_png(dir.join("missing.png")).unwrap_err().to_string();
    assert!(e.contains("missing.png"), "{e}");
}

#[test]
fn grid_tiles_images_with_gaps_and_upscaling() {
    let mut rng = Rng::new(2);
    let ims: Vec<Vec<u8>> = (0..5)
        .map(|_| render_u8(&sample_scene(None, &mut rng)))
        .collect();
    let (g, w, h) = grid(&ims, 3, 2).unwrap();
    assert_eq!((w, h), (3 * 33 + 1, 2 * 33 + 1));
    assert_eq!(g.len(), w * h * 3);
    // Image 4 (row 1, col 1) pixel (3, 7) lands at 2× scale after the gaps.
    let (ox, oy) = (1 + 33, 1 + 33);
    let src = &ims[4][(7 * 16 + 3) * 3..(7 * 16 + 3) * 3 + 3];
    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let i = ((oy + 14 + dy) * w + ox + 6 + dx) * 3;
        assert_eq!(&g[i..i + 3], src);
    }
    assert_eq!(&g[0..3], &[128, 128, 128]);
    let dir = tmpdir("grid");
    write_grid(dir.join("g.png"), &ims, 3, 2).unwrap();
    let (back, bw, bh) = read_png(dir.join("g.png")).unwrap();
    assert_eq!((back, bw, bh), (g, w, h));
    assert!(grid::<Vec<u8>>(&[], 3, 1).is_err());
    assert!(grid(&[vec![0u8; 768], vec![0u8; 12]], 2, 1).is_err());
}

#[test]
fn evaluation_prompts_are_fixed_balanced_and_distinct() {
    let a = evaluation_prompts(10, 5);
    assert_eq!(a, evaluation_prompts(10, 5));
    assert_ne!(a, evaluation_prompts(10, 6));
    assert_eq!(a.len(), 50);
    for t in Task::ALL {
        let ps: Vec<&String> = a.iter().filter(|(k, _)| *k == t).map(|(_, p)| p).collect();
        assert_eq!(ps.len(), 10);
        let distinct: std::collections::HashSet<_> = ps.iter().collect();
        assert_eq!(distinct.len(), 10, "{t}");
        for p in ps {
            assert_eq!(Prompt::parse(p).unwrap().task(), t);
        }
    }
    // More than a task has: every single prompt appears, evenly.
    let b = evaluation_prompts(36, 5);
    let singles: Vec<&String> = b
        .iter()
        .filter(|(k, _)| *k == Task::Single)
        .map(|(_, p)| p)
        .collect();
    let distinct: std::collections::HashSet<_> = singles.iter().collect();
    assert_eq!(distinct.len(), 18);
}

#[test]
fn evaluate_folder_on_a_dataset_matches_the_oracle_and_the_fd_floor() {
    let dir = tmpdir("folder");
    assert_eq!(write_dataset(&dir, 200, None, 7).unwrap(), 1000);
    let t0 = Instant::now();
    let r = evaluate_folder(&dir, 3).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", r.to_text());
    println!("evaluate_folder: 1000 images in {secs:.2} s");
    assert!(secs < 60.0, "{secs}");
    assert_eq!(r.images, 1000);
    assert_eq!(r.tasks.len(), 5);
    for t in &r.tasks {
        assert_eq!(t.images, 200);
        assert!(t.accuracy >= 0.99, "{:?}", t);
        assert!(t.oracle_accuracy >= 0.99, "{:?}", t);
    }
    assert!(r.score >= 0.99 && r.oracle_score >= 0.99);
    // Dataset images are real images too: their FD to the reference set is the floor's peer.
    assert!(r.fd_floor > 0.0);
    assert!(
        r.fd < 1.5 * r.fd_floor && r.fd > r.fd_floor / 1.5,
        "fd {} floor {}",
        r.fd,
        r.fd_floor
    );
    let j = r.to_json();
    assert_eq!(j["images"], 1000);
    assert!(j["tasks"]["relation"]["accuracy"].as_f64().unwrap() >= 0.99);
    assert!(j["fd_floor"].as_f64().is_some());
    // Same seed → same report.
    assert_eq!(evaluate_folder(&dir, 3).unwrap(), r);

    // Wrong images for the prompts score low and sit far above the floor.
    let entries = read_manifest(&dir).unwrap();
    let prompts: Vec<String> = entries.iter().map(|e| e.prompt.clone()).collect();
    let mut rng = Rng::new(1);
    let shuffled: Vec<Vec<u8>> = prompts
        .iter()
        .map(|_| render_u8(&sample_scene(Some(Task::Single), &mut rng)))
        .collect();
    let bad = evaluate_images(&prompts, &shuffled, 3).unwrap();
    println!("{}", bad.to_text());
    assert!(bad.score < 0.3, "{}", bad.score);
    assert!(bad.fd > 2.0 * bad.fd_floor);
}

#[test]
fn evaluate_folder_scores_only_the_tasks_present() {
    let dir = tmpdir("onetask");
    write_dataset(&dir, 30, Some(Task::Relation), 1).unwrap();
    let r = evaluate_folder(&dir, 0).unwrap();
    assert_eq!(r.tasks.len(), 1);
    assert_eq!(r.tasks[0].task, Task::Relation);
    assert_eq!(r.score, r.tasks[0].accuracy);
}

#[test]
fn malformed_manifests_are_errors_not_panics() {
    let dir = tmpdir("bad");
    write_png(
        dir.join("ok.png"),
        &render_u8(&scene_for_prompt("a red circle", &mut Rng::new(0)).unwrap()),
        16,
        16,
    )
    .unwrap();
    write_png(dir.join("big.png"), &[0u8; 20 * 20 * 3], 20, 20).unwrap();
    std::fs::write(dir.join("junk.png"), b"junk").unwrap();
    let good = r#"{"file": "ok.png", "prompt": "a red circle", "task": "single", "seed": 1}"#;
    let cases: &[(&str, &str)] = &[
        ("not json", ":2:"),
        (r#"{"prompt": "a red circle"}"#, "file"),
        (r#"{"file": "ok.png"}"#, "prompt"),
        (r#"{"file": 3, "prompt": "a red circle"}"#, "file"),
        (r#"{"file": "ok.png", "prompt": "a red blob"}"#, "blob"),
        (
            r#"{"file": "ok.png", "prompt": "a red circle", "task": "two"}"#,
            "task",
        ),
        (
            r#"{"file": "ok.png", "prompt": "a red circle", "seed": -4}"#,
            "seed",
        ),
        (
            r#"{"file": "gone.png", "prompt": "a red circle"}"#,
            "gone.png",
        ),
        (
            r#"{"file": "big.png", "prompt": "a red circle"}"#,
            "big.png",
        ),
        (
            r#"{"file": "junk.png", "prompt": "a red circle"}"#,
            "junk.png",
        ),
        ("[1, 2]", ":2:"),
    ];
    for (line, needle) in cases {
        std::fs::write(dir.join("manifest.jsonl"), format!("{good}\n{line}\n")).unwrap();
        let e = evaluate_folder(&dir, 0).expect_err(line).to_string();
        println!("{e}");
        assert!(e.contains(needle), "{line}: {e}");
        if !line.contains(".png") || line.contains("ok.png") {
            assert!(e.contains("manifest.jsonl"), "{e}");
        }
    }
    std::fs::write(dir.join("manifest.jsonl"), "\n\n").unwrap();
    assert!(evaluate_folder(&dir, 0).is_err());
    std::fs::remove_file(dir.join("manifest.jsonl")).unwrap();
    let e = evaluate_folder(&dir, 0).unwrap_err().to_string();
    assert!(e.contains("manifest.jsonl"), "{e}");
    // A good manifest with blank lines still works.
    std::fs::write(dir.join("manifest.jsonl"), format!("\n{good}\n\n")).unwrap();
    let r = evaluate_folder(&dir, 0).unwrap();
    assert_eq!(r.images, 1);
    assert_eq!(r.score, 1.0);
    assert!(evaluate_images(&["a red circle".into()], &[], 0).is_err());
}
