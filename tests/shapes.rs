//! The Shapes world: prompt templates and parsing, scene sampling rules, the anti-aliased renderer,
//! training batches and dataset folders.
mod common;

use advdmd::data::shapes::{
    all_prompts, coverage, dataset_scene, render, render_u8, sample_batch, sample_scene,
    scene_for_prompt, separated, vocabulary, write_dataset, Color, Object, Prompt, Scene,
    ShapeKind, Task, CANVAS,
};
use advdmd::eval::image::{read_png, to_u8};
use advdmd::Rng;
use common::ScratchDir;
use std::collections::HashSet;

fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("shapes-{name}"))
}

fn scene(objects: Vec<Object>) -> Scene {
    Scene {
        prompt: String::new(),
        task: Task::Single,
        objects,
    }
}

fn obj(shape: ShapeKind, x: usize, y: usize, size: usize) -> Object {
    Object {
        color: Color::Red,
        shape,
        x,
        y,
        size,
    }
}

#[test]
fn same_seed_gives_identical_scenes_and_pixels() {
    for seed in 0..50 {
        let a = sample_scene(None, &mut Rng::new(seed));
        let b = sample_scene(None, &mut Rng::new(seed));
        assert_eq!(a, b);
        assert_eq!(render(&a), render(&b));
    }
}

#[test]
fn different_seeds_give_different_scenes() {
    let scenes: Vec<Scene> = (0..50)
        .map(|s| sample_scene(None, &mut Rng::new(s)))
        .collect();
    let distinct: HashSet<Vec<u8>> = scenes.iter().map(render_u8).collect();
    assert!(distinct.len() >= 48, "{} distinct of 50", distinct.len());
}

#[test]
fn tasks_are_drawn_uniformly() {
    let mut rng = Rng::new(3);
    let mut counts = [0usize; 5];
    let n = 10_000;
    for _ in 0..n {
        counts[sample_scene(None, &mut rng).task as usize] += 1;
    }
    for (t, &c) in Task::ALL.iter().zip(&counts) {
        let f = c as f64 / n as f64;
        assert!((f - 0.2).abs() < 0.02, "{t}: {f}");
    }
}

fn centre2(o: &Object) -> (usize, usize) {
    (2 * o.x + o.size, 2 * o.y + o.size)
}

#[test]
fn placement_rules_hold_for_every_task() {
    let mut rng = Rng::new(11);
    for task in Task::ALL {
        let mut sizes_seen = HashSet::new();
        let mut corners_seen = HashSet::new();
        for _ in 0..3000 {
            let s = sample_scene(Some(task), &mut rng);
            assert_eq!(s.task, task);
            let p = Prompt::parse(&s.prompt).unwrap();
            assert_eq!(p.task(), task);
            let want = p.items();
            assert_eq!(s.objects.len(), want.len(), "{}", s.prompt);
            for (o, it) in s.objects.iter().zip(&want) {
                assert_eq!((o.color, o.shape), (it.color, it.shape), "{}", s.prompt);
                assert!(task.sizes().contains(&o.size), "{task}: size {}", o.size);
                assert!(o.x + o.size <= CANVAS && o.y + o.size <= CANVAS, "{o:?}");
                sizes_seen.insert(o.size);
                corners_seen.insert((o.x, o.y));
            }
            if let [a, b] = s.objects.as_slice() {
                assert!(separated(a.x, a.y, a.size, b.x, b.y, b.size), "{s:?}");
                // Independent check of the gap: no pixel of one box within one pixel of the other.
                let near = (a.x..a.x + a.size).any(|x| {
                    (a.y..a.y + a.size).any(|y| {
                        (b.x..b.x + b.size).any(|u| {
                            (b.y..b.y + b.size).any(|v| x.abs_diff(u) <= 1 && y.abs_diff(v) <= 1)
                        })
                    })
                });
                assert!(!near, "boxes touch: {s:?}");
            }
            match task {
                Task::Position => {
                    let o = &s.objects[0];
                    let ok = if s.prompt.ends_with("left") {
                        o.x + o.size <= 8
                    } else if s.prompt.ends_with("right") {
                        o.x >= 8
                    } else if s.prompt.ends_with("top") {
                        o.y + o.size <= 8
                    } else {
                        assert!(s.prompt.ends_with("bottom"));
                        o.y >= 8
                    };
                    assert!(ok, "{s:?}");
                }
                Task::Two | Task::Relation => {
                    assert_ne!(s.objects[0].color, s.objects[1].color, "{s:?}");
                }
                Task::Counting => {
                    let (a, b) = (&s.objects[0], &s.objects[1]);
                    assert_eq!((a.color, a.shape), (b.color, b.shape));
                }
                Task::Single => {}
            }
            if task == Task::Relation {
                let (a, b) = (&s.objects[0], &s.objects[1]);
                let (bx, by) = centre2(b);
                let ok = if s.prompt.contains(" left of ") {
                    2 * (a.x + a.size) <= bx
                } else if s.prompt.contains(" right of ") {
                    2 * a.x >= bx
                } else if s.prompt.contains(" above ") {
                    2 * (a.y + a.size) <= by
                } else {
                    assert!(s.prompt.contains(" below "));
                    2 * a.y >= by
                };
                assert!(ok, "{s:?}");
            }
        }
        let expected: HashSet<usize> = task.sizes().into_iter().collect();
        assert_eq!(sizes_seen, expected, "{task}");
        if task == Task::Single {
            // Uniform placement reaches the corners of the canvas.
            assert!(corners_seen.contains(&(0, 0)));
            assert!(corners_seen.iter().any(|&(x, y)| x == 11 && y == 11));
        }
    }
}

#[test]
fn single_placement_is_uniform_over_positions() {
    // For d = 5 there are 12 × 12 corners; the x coordinate should be uniform over 12 values.
    let mut rng = Rng::new(5);
    let mut hist = [0usize; 12];
    let mut n = 0;
    while n < 24_000 {
        let s = sample_scene(Some(Task::Single), &mut rng);
        let o = s.objects[0];
        if o.size == 5 {
            hist[o.x] += 1;
            n += 1;
        }
    }
    for (x, &h) in hist.iter().enumerate() {
        let f = h as f64 / n as f64;
        assert!((f - 1.0 / 12.0).abs() < 0.01, "x = {x}: {f}");
    }
}

#[test]
fn sampled_prompts_parse_back_and_give_valid_scenes() {
    let mut rng = Rng::new(17);
    for _ in 0..2000 {
        let s = sample_scene(None, &mut rng);
        let p = Prompt::parse(&s.prompt).unwrap();
        assert_eq!(p.text(), s.prompt);
        let again = scene_for_prompt(&s.prompt, &mut rng).unwrap();
        assert_eq!(again.prompt, s.prompt);
        assert_eq!(again.task, s.task);
        let items: Vec<_> = again.objects.iter().map(|o| (o.color, o.shape)).collect();
        let want: Vec<_> = p.items().iter().map(|i| (i.color, i.shape)).collect();
        assert_eq!(items, want);
    }
}

#[test]
fn every_prompt_of_every_task_parses_and_uses_the_vocabulary() {
    let vocab = vocabulary();
    let unique: HashSet<&str> = vocab.iter().copied().collect();
    assert_eq!(unique.len(), vocab.len(), "duplicate words");
    assert!(vocab.len() >= 24 && vocab.len() <= 32, "{}", vocab.len());
    let expected = [18, 72, 270, 1080, 18];
    for (task, n) in Task::ALL.into_iter().zip(expected) {
        let prompts = all_prompts(task);
        assert_eq!(prompts.len(), n, "{task}");
        let distinct: HashSet<&String> = prompts.iter().collect();
        assert_eq!(distinct.len(), n);
        for p in &prompts {
            let parsed = Prompt::parse(p).unwrap();
            assert_eq!(parsed.task(), task);
            assert_eq!(&parsed.text(), p);
            assert!(p.split(' ').all(|w| unique.contains(w)), "{p}");
        }
    }
    assert_eq!(Task::parse("relation").unwrap(), Task::Relation);
    for t in Task::ALL {
        assert_eq!(Task::parse(t.name()).unwrap(), t);
    }
    assert!(Task::parse("colors").is_err());
}

#[test]
fn prompts_outside_the_templates_are_rejected() {
    let bad = [
        "",
        "a",
        "a red",
        "a purple circle",
        "a red hexagon",
        "two red circle",
        "three red circles",
        "a red circles",
        "a red circle on the middle",
        "a red circle on left",
        "a red circle and a red square",
        "a red circle left of a red square",
        "a red circle left a blue square",
        "a red circle above the blue square",
        "a red circle and blue square",
        "red circle",
    ];
    let mut rng = Rng::new(0);
    for p in bad {
        let e = scene_for_prompt(p, &mut rng).expect_err(p);
        let msg = e.to_string();
        assert!(msg.contains("prompt"), "{p}: {msg}");
    }
    // Case and spacing are forgiven, and the scene carries the canonical text.
    let s = scene_for_prompt("  A Red  Circle on the LEFT ", &mut rng).unwrap();
    assert_eq!(s.prompt, "a red circle on the left");
}

#[test]
fn square_pixels_are_fully_on_and_circle_edges_are_fractional() {
    for d in 3..=9 {
        assert!(coverage(ShapeKind::Square, d).iter().all(|&c| c == 1.0));
    }
    let c = coverage(ShapeKind::Circle, 6);
    assert_eq!(c[0], 0.0, "a disk leaves the box's corner empty");
    assert_eq!(c[2 * 6 + 2], 1.0, "centre pixels are full");
    assert!(
        c.iter().any(|&v| v > 0.0 && v < 1.0),
        "circle edges are anti-aliased"
    );
    // Disk area π r² within the supersampling error.
    let area: f32 = c.iter().sum();
    assert!(
        (area - std::f32::consts::PI * 9.0).abs() < 1.0,
        "area {area}"
    );
    // Triangle: apex row thin, base row (nearly) full, area d²/2.
    let t = coverage(ShapeKind::Triangle, 6);
    let row = |r: usize| t[r * 6..r * 6 + 6].iter().sum::<f32>();
    assert!(row(0) < 1.0 && row(5) > 5.0, "{} {}", row(0), row(5));
    assert!((t.iter().sum::<f32>() - 18.0).abs() < 0.5);
    // Left-right symmetric.
    for r in 0..6 {
        for i in 0..3 {
            assert_eq!(t[r * 6 + i], t[r * 6 + 5 - i]);
        }
    }
}

#[test]
fn render_draws_palette_colour_times_coverage_on_black() {
    let s = scene(vec![
        obj(ShapeKind::Square, 1, 1, 5),
        Object {
            color: Color::Cyan,
            shape: ShapeKind::Circle,
            x: 9,
            y: 9,
            size: 6,
        },
    ]);
    let img = render(&s);
    assert_eq!(img.len(), 3 * 16 * 16);
    assert!(img.iter().all(|&v| (-1.0..=1.0).contains(&v)));
    let u = render_u8(&s);
    assert_eq!(u, to_u8(&img));
    let px = |x: usize, y: usize| {
        [
            u[(y * 16 + x) * 3],
            u[(y * 16 + x) * 3 + 1],
            u[(y * 16 + x) * 3 + 2],
        ]
    };
    // The square is full palette red everywhere in its box, black right outside.
    for y in 1..6 {
        for x in 1..6 {
            assert_eq!(px(x, y), Color::Red.rgb());
        }
    }
    assert_eq!(px(0, 0), [0, 0, 0]);
    assert_eq!(px(6, 3), [0, 0, 0]);
    assert_eq!(px(15, 0), [0, 0, 0]);
    // The circle's centre is full cyan and its box corner is background; an edge pixel is a
    // scaled cyan.
    assert_eq!(px(11, 11), Color::Cyan.rgb());
    assert_eq!(px(9, 9), [0, 0, 0]);
    let cov = coverage(ShapeKind::Circle, 6);
    let k = (0..36).find(|&i| cov[i] > 0.0 && cov[i] < 1.0).unwrap();
    let (ex, ey) = (9 + k % 6, 9 + k / 6);
    let want = Color::Cyan.rgb().map(|c| (c as f32 * cov[k]).round() as u8);
    let got = px(ex, ey);
    for ch in 0..3 {
        assert!(got[ch].abs_diff(want[ch]) <= 1, "{got:?} vs {want:?}");
    }
    // Channel-major layout: the red plane comes first.
    assert!((img[16 + 1] - (220.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert!((img[256 + 16 + 1] - (40.0 / 127.5 - 1.0)).abs() < 1e-6);
}

#[test]
fn objects_hanging_off_the_canvas_are_clipped_not_a_panic() {
    let s = scene(vec![obj(ShapeKind::Square, 13, 14, 7)]);
    let u = render_u8(&s);
    let lit = u.chunks(3).filter(|p| p[0] > 0).count();
    assert_eq!(lit, 3 * 2);
}

#[test]
fn sample_batch_is_deterministic_and_matches_the_renderer() {
    let (p1, t1) = sample_batch(40, &mut Rng::new(9));
    let (p2, t2) = sample_batch(40, &mut Rng::new(9));
    assert_eq!(p1, p2);
    assert_eq!(t1.shape(), &[40, 3, 16, 16]);
    assert_eq!(t1.f32s(), t2.f32s());
    // Same draws as sampling scene by scene.
    let mut rng = Rng::new(9);
    for (i, p) in p1.iter().enumerate() {
        let s = sample_scene(None, &mut rng);
        assert_eq!(&s.prompt, p);
        assert_eq!(&t1.f32s()[i * 768..(i + 1) * 768], render(&s).as_slice());
    }
}

#[test]
fn write_dataset_writes_n_per_task_and_rerenders_from_the_manifest_seed() {
    let dir = tmpdir("ds");
    let n = write_dataset(&dir, 7, None, 42).unwrap();
    assert_eq!(n, 35);
    let text = std::fs::read_to_string(dir.join("manifest.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 35);
    assert!(lines[0].starts_with("{\"file\": "), "{}", lines[0]);
    let mut per_task = std::collections::HashMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let task = Task::parse(v["task"].as_str().unwrap()).unwrap();
        *per_task.entry(task).or_insert(0) += 1;
        let prompt = v["prompt"].as_str().unwrap();
        assert_eq!(Prompt::parse(prompt).unwrap().task(), task);
        let (rgb, w, h) = read_png(dir.join(v["file"].as_str().unwrap())).unwrap();
        assert_eq!((w, h), (16, 16));
        let s = dataset_scene(task, v["seed"].as_u64().unwrap());
        assert_eq!(s.prompt, prompt);
        assert_eq!(render_u8(&s), rgb, "{line}");
    }
    for t in Task::ALL {
        assert_eq!(per_task[&t], 7, "{t}");
    }
    // Deterministic for a seed; one task only when asked.
    let dir2 = tmpdir("ds2");
    write_dataset(&dir2, 7, None, 42).unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(dir2.join("manifest.jsonl")).unwrap()
    );
    let dir3 = tmpdir("ds3");
    assert_eq!(write_dataset(&dir3, 4, Some(Task::Counting), 1).unwrap(), 4);
    let t3 = std::fs::read_to_string(dir3.join("manifest.jsonl")).unwrap();
    assert!(t3.lines().all(|l| l.contains("\"task\": \"counting\"")));
}
