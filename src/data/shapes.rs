//! The Shapes world (design/TOY.md): palette, shapes, the five prompt templates, scene sampling,
//! the anti-aliased renderer and dataset folders.
//!
//! Everything is procedural and deterministic for a seed. The renderer's coverage maps are public
//! because the checker fits the very same templates: a detector that draws shapes differently from
//! the data would misjudge the data itself.

use crate::error::{Error, Result};
use crate::eval::image::{to_u8, write_png};
use crate::tensor::{Rng, Tensor};
use rayon::prelude::*;
use std::fmt;
use std::path::Path;

/// Side of the square canvas in pixels.
pub const CANVAS: usize = 16;
/// Values per rendered image: RGB, channel-major.
pub const IMAGE_LEN: usize = 3 * CANVAS * CANVAS;
/// Coverage is estimated on a SUPERSAMPLE × SUPERSAMPLE grid of points per pixel.
pub const SUPERSAMPLE: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Magenta,
    Cyan,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Magenta,
        Color::Cyan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Magenta => "magenta",
            Color::Cyan => "cyan",
        }
    }

    /// sRGB 0–255, as fixed by TOY.md.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 190, 60],
            Color::Blue => [40, 80, 230],
            Color::Yellow => [230, 210, 40],
            Color::Magenta => [210, 50, 210],
            Color::Cyan => [40, 200, 210],
        }
    }

    pub fn parse(word: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == word)
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }

    /// The word the counting template uses.
    pub fn plural(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circles",
            ShapeKind::Square => "squares",
            ShapeKind::Triangle => "triangles",
        }
    }

    pub fn parse(word: &str) -> Option<ShapeKind> {
        ShapeKind::ALL.into_iter().find(|s| s.name() == word)
    }

    pub fn parse_plural(word: &str) -> Option<ShapeKind> {
        ShapeKind::ALL.into_iter().find(|s| s.plural() == word)
    }
}

impl fmt::Display for ShapeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    Single,
    Position,
    Two,
    Relation,
    Counting,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::Single,
        Task::Position,
        Task::Two,
        Task::Relation,
        Task::Counting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Single => "single",
            Task::Position => "position",
            Task::Two => "two",
            Task::Relation => "relation",
            Task::Counting => "counting",
        }
    }

    pub fn parse(name: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown Shapes task `{name}` (expected one of: single, position, two, relation, counting)"
                ))
            })
    }

    /// Box sizes this task draws from: scenes with two objects use smaller ones so that every
    /// pair, relation included, still has room on the 16-px canvas.
    pub fn sizes(self) -> [usize; 3] {
        match self {
            Task::Single | Task::Position => [5, 6, 7],
            Task::Two | Task::Relation | Task::Counting => [4, 5, 6],
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The half of the canvas a `position` prompt names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Left,
    Right,
    Top,
    Bottom,
}

impl Side {
    pub const ALL: [Side; 4] = [Side::Left, Side::Right, Side::Top, Side::Bottom];

    pub fn name(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
            Side::Top => "top",
            Side::Bottom => "bottom",
        }
    }
}

/// The spatial relation a `relation` prompt names (first object relative to the second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
}

/// A named object: what a prompt asks for, before placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    pub color: Color,
    pub shape: ShapeKind,
}

impl Item {
    fn words(self) -> String {
        format!("{} {}", self.color.name(), self.shape.name())
    }
}

/// A parsed prompt of one of the five templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prompt {
    Single(Item),
    Position(Item, Side),
    Two(Item, Item),
    Relation(Item, Relation, Item),
    Counting(Item),
}

const TEMPLATES: &str = "`a {color} {shape}`, `a {color} {shape} on the {left|right|top|bottom}`, \
`a {color1} {shape1} and a {color2} {shape2}`, \
`a {color1} {shape1} {left of|right of|above|below} a {color2} {shape2}` (color1 ≠ color2), \
`two {color} {shape}s`";

impl Prompt {
    pub fn task(&self) -> Task {
        match self {
            Prompt::Single(..) => Task::Single,
            Prompt::Position(..) => Task::Position,
            Prompt::Two(..) => Task::Two,
            Prompt::Relation(..) => Task::Relation,
            Prompt::Counting(..) => Task::Counting,
        }
    }

    /// The canonical prompt text.
    pub fn text(&self) -> String {
        match *self {
            Prompt::Single(a) => format!("a {}", a.words()),
            Prompt::Position(a, s) => format!("a {} on the {}", a.words(), s.name()),
            Prompt::Two(a, b) => format!("a {} and a {}", a.words(), b.words()),
            Prompt::Relation(a, r, b) => format!("a {} {} a {}", a.words(), r.words(), b.words()),
            Prompt::Counting(a) => format!("two {} {}", a.color.name(), a.shape.plural()),
        }
    }

    /// The objects the prompt names, first-named first (a counting prompt names its item twice).
    pub fn items(&self) -> Vec<Item> {
        match *self {
            Prompt::Single(a) | Prompt::Position(a, _) => vec![a],
            Prompt::Two(a, b) | Prompt::Relation(a, _, b) => vec![a, b],
            Prompt::Counting(a) => vec![a, a],
        }
    }

    /// Parses a prompt. Case and runs of whitespace are forgiven (a person typing a prompt should
    /// not fail on them); words and templates are not.
    pub fn parse(prompt: &str) -> Result<Prompt> {
        let lower = prompt.to_lowercase();
        let w: Vec<&str> = lower.split_whitespace().collect();
        let vocab = vocabulary();
        if let Some(bad) = w.iter().find(|x| !vocab.contains(x)) {
            return Err(Error::Invalid(format!(
                "prompt `{prompt}`: `{bad}` is not in the Shapes vocabulary ({})",
                vocab.join(", ")
            )));
        }
        let item = |c: &str, s: &str| -> Option<Item> {
            Some(Item {
                color: Color::parse(c)?,
                shape: ShapeKind::parse(s)?,
            })
        };
        let parsed = match w.as_slice() {
            ["two", c, s] => Color::parse(c)
                .zip(ShapeKind::parse_plural(s))
                .map(|(color, shape)| Prompt::Counting(Item { color, shape })),
            ["a", c, s] => item(c, s).map(Prompt::Single),
            ["a", c, s, "on", "the", side] => item(c, s).and_then(|a| {
                let side = Side::ALL.into_iter().find(|x| x.name() == *side)?;
                Some(Prompt::Position(a, side))
            }),
            ["a", c1, s1, "and", "a", c2, s2] => item(c1, s1)
                .zip(item(c2, s2))
                .map(|(a, b)| Prompt::Two(a, b)),
            ["a", c1, s1, r @ ("above" | "below"), "a", c2, s2] => {
                let r = if *r == "above" {
                    Relation::Above
                } else {
                    Relation::Below
                };
                item(c1, s1)
                    .zip(item(c2, s2))
                    .map(|(a, b)| Prompt::Relation(a, r, b))
            }
            ["a", c1, s1, r @ ("left" | "right"), "of", "a", c2, s2] => {
                let r = if *r == "left" {
                    Relation::LeftOf
                } else {
                    Relation::RightOf
                };
                item(c1, s1)
                    .zip(item(c2, s2))
                    .map(|(a, b)| Prompt::Relation(a, r, b))
            }
            _ => None,
        };
        let parsed = parsed.ok_or_else(|| {
            Error::Invalid(format!(
                "prompt `{prompt}` does not match any Shapes template: {TEMPLATES}"
            ))
        })?;
        if let Prompt::Two(a, b) | Prompt::Relation(a, _, b) = parsed {
            if a.color == b.color {
                return Err(Error::Invalid(format!(
                    "prompt `{prompt}`: the two objects must have different colours (the checker tells objects apart by colour)"
                )));
            }
        }
        Ok(parsed)
    }

    /// Attributes drawn uniformly for `task`.
    pub fn sample(task: Task, rng: &mut Rng) -> Prompt {
        let color = |rng: &mut Rng| Color::ALL[rng.below(6) as usize];
        let shape = |rng: &mut Rng| ShapeKind::ALL[rng.below(3) as usize];
        let first = Item {
            color: color(rng),
            shape: shape(rng),
        };
        // The second colour is uniform over the five others.
        let second = |rng: &mut Rng| {
            let k = rng.below(5) as usize;
            let others: Vec<Color> = Color::ALL
                .into_iter()
                .filter(|&c| c != first.color)
                .collect();
            Item {
                color: others[k],
                shape: shape(rng),
            }
        };
        match task {
            Task::Single => Prompt::Single(first),
            Task::Position => Prompt::Position(first, Side::ALL[rng.below(4) as usize]),
            Task::Two => Prompt::Two(first, second(rng)),
            Task::Relation => {
                let r = Relation::ALL[rng.below(4) as usize];
                Prompt::Relation(first, r, second(rng))
            }
            Task::Counting => Prompt::Counting(first),
        }
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// The closed word list of the five templates, plural shape words included.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v = vec![
        "a", "two", "and", "on", "the", "of", "left", "right", "top", "bottom", "above", "below",
    ];
    v.extend(Color::ALL.iter().map(|c| c.name()));
    v.extend(ShapeKind::ALL.iter().map(|s| s.name()));
    v.extend(ShapeKind::ALL.iter().map(|s| s.plural()));
    v
}

/// Every prompt of `task`, in a fixed order.
pub fn all_prompts(task: Task) -> Vec<String> {
    let items: Vec<Item> = Color::ALL
        .iter()
        .flat_map(|&color| {
            ShapeKind::ALL
                .iter()
                .map(move |&shape| Item { color, shape })
        })
        .collect();
    let pairs = || {
        items.iter().flat_map(|&a| {
            items
                .iter()
                .filter(move |b| b.color != a.color)
                .map(move |&b| (a, b))
        })
    };
    let prompts: Vec<Prompt> = match task {
        Task::Single => items.iter().map(|&a| Prompt::Single(a)).collect(),
        Task::Position => items
            .iter()
            .flat_map(|&a| Side::ALL.iter().map(move |&s| Prompt::Position(a, s)))
            .collect(),
        Task::Two => pairs().map(|(a, b)| Prompt::Two(a, b)).collect(),
        Task::Relation => pairs()
            .flat_map(|(a, b)| {
                Relation::ALL
                    .iter()
                    .map(move |&r| Prompt::Relation(a, r, b))
            })
            .collect(),
        Task::Counting => items.iter().map(|&a| Prompt::Counting(a)).collect(),
    };
    prompts.iter().map(Prompt::text).collect()
}

/// One placed object: a shape inside the `size`×`size` box whose top-left pixel is (x, y).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    pub color: Color,
    pub shape: ShapeKind,
    pub x: usize,
    pub y: usize,
    pub size: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scene {
    pub prompt: String,
    pub task: Task,
    pub objects: Vec<Object>,
}

/// Draws a scene: task uniform (unless given), attributes uniform, then placement uniform among
/// all valid ones.
pub fn sample_scene(task: Option<Task>, rng: &mut Rng) -> Scene {
    let task = task.unwrap_or_else(|| Task::ALL[rng.below(5) as usize]);
    let prompt = Prompt::sample(task, rng);
    place(&prompt, rng)
}

/// A scene for a given prompt, with a freshly sampled placement (the "real" image for a prompt).
pub fn scene_for_prompt(prompt: &str, rng: &mut Rng) -> Result<Scene> {
    Ok(place(&Prompt::parse(prompt)?, rng))
}

/// Samples sizes (uniform per object) and then a placement uniform among every valid one.
pub fn place(prompt: &Prompt, rng: &mut Rng) -> Scene {
    let sizes = prompt.task().sizes();
    let items = prompt.items();
    let d: Vec<usize> = items.iter().map(|_| sizes[rng.below(3) as usize]).collect();
    let obj = |it: Item, x: usize, y: usize, size: usize| Object {
        color: it.color,
        shape: it.shape,
        x,
        y,
        size,
    };
    let objects = match *prompt {
        Prompt::Single(a) => {
            let (x, y) = pick_one(d[0], |_, _| true, rng);
            vec![obj(a, x, y, d[0])]
        }
        Prompt::Position(a, side) => {
            let half = CANVAS / 2;
            let (x, y) = pick_one(
                d[0],
                |x, y| match side {
                    Side::Left => x + d[0] <= half,
                    Side::Right => x >= half,
                    Side::Top => y + d[0] <= half,
                    Side::Bottom => y >= half,
                },
                rng,
            );
            vec![obj(a, x, y, d[0])]
        }
        Prompt::Two(..) | Prompt::Counting(..) | Prompt::Relation(..) => {
            let rel = match *prompt {
                Prompt::Relation(_, r, _) => Some(r),
                _ => None,
            };
            let (d1, d2) = (d[0], d[1]);
            let [x1, y1, x2, y2] = pick_pair(
                d1,
                d2,
                |[x1, y1, x2, y2]| {
                    separated(x1, y1, d1, x2, y2, d2)
                        && rel.is_none_or(|r| relation_holds(r, [x1, y1, d1], [x2, y2, d2]))
                },
                rng,
            );
            vec![obj(items[0], x1, y1, d1), obj(items[1], x2, y2, d2)]
        }
    };
    Scene {
        prompt: prompt.text(),
        task: prompt.task(),
        objects,
    }
}

/// Whether two boxes keep at least one pixel of background between them (along x or y).
pub fn separated(x1: usize, y1: usize, d1: usize, x2: usize, y2: usize, d2: usize) -> bool {
    x1 + d1 < x2 || x2 + d2 < x1 || y1 + d1 < y2 || y2 + d2 < y1
}

/// Whether box 1 lies entirely on the named side of box 2's centre. Boxes are [x, y, d]; compared
/// in doubled coordinates so that half-pixel centres stay integers.
pub fn relation_holds(r: Relation, b1: [usize; 3], b2: [usize; 3]) -> bool {
    let [x1, y1, d1] = b1;
    let [x2, y2, d2] = b2;
    match r {
        Relation::LeftOf => 2 * (x1 + d1) <= 2 * x2 + d2,
        Relation::RightOf => 2 * x1 >= 2 * x2 + d2,
        Relation::Above => 2 * (y1 + d1) <= 2 * y2 + d2,
        Relation::Below => 2 * y1 >= 2 * y2 + d2,
    }
}

/// Uniform choice among the valid top-left corners of one box: count, draw an index, walk to it.
/// Enumerating (rather than rejection sampling) uses exactly one draw per choice.
fn pick_one(d: usize, valid: impl Fn(usize, usize) -> bool, rng: &mut Rng) -> (usize, usize) {
    let n = CANVAS - d + 1;
    let all = || (0..n).flat_map(move |y| (0..n).map(move |x| (x, y)));
    let count = all().filter(|&(x, y)| valid(x, y)).count();
    assert!(count > 0, "no valid placement for a {d}-px box");
    let k = rng.below(count as u64) as usize;
    all().filter(|&(x, y)| valid(x, y)).nth(k).unwrap()
}

/// Uniform choice among valid ordered pairs of box corners [x1, y1, x2, y2].
fn pick_pair(
    d1: usize,
    d2: usize,
    valid: impl Fn([usize; 4]) -> bool,
    rng: &mut Rng,
) -> [usize; 4] {
    let (n1, n2) = (CANVAS - d1 + 1, CANVAS - d2 + 1);
    let all = || {
        (0..n1).flat_map(move |y1| {
            (0..n1).flat_map(move |x1| {
                (0..n2).flat_map(move |y2| (0..n2).map(move |x2| [x1, y1, x2, y2]))
            })
        })
    };
    let count = all().filter(|&p| valid(p)).count();
    assert!(
        count > 0,
        "no valid placement for boxes of {d1} and {d2} px"
    );
    let k = rng.below(count as u64) as usize;
    all().filter(|&p| valid(p)).nth(k).unwrap()
}

/// Coverage of each pixel of a `d`×`d` box by `shape`, row-major, in multiples of 1/16 (the
/// fraction of the 4×4 sample points inside the shape). Shared by the renderer and the checker's
/// templates.
pub fn coverage(shape: ShapeKind, d: usize) -> Vec<f32> {
    let df = d as f64;
    let r = df / 2.0;
    let inside = |u: f64, v: f64| match shape {
        ShapeKind::Square => true,
        ShapeKind::Circle => (u - r) * (u - r) + (v - r) * (v - r) <= r * r,
        // Apex at (d/2, 0), base from (0, d) to (d, d): the half-width grows as v/2.
        ShapeKind::Triangle => (u - r).abs() <= v / 2.0,
    };
    let s = SUPERSAMPLE;
    let mut out = vec![0f32; d * d];
    for py in 0..d {
        for px in 0..d {
            let mut hits = 0;
            for j in 0..s {
                for i in 0..s {
                    let u = px as f64 + (i as f64 + 0.5) / s as f64;
                    let v = py as f64 + (j as f64 + 0.5) / s as f64;
                    hits += inside(u, v) as usize;
                }
            }
            out[py * d + px] = hits as f32 / (s * s) as f32;
        }
    }
    out
}

/// Renders a scene to RGB f32 in [−1, 1], layout [3, 16, 16]: black background, palette colour ×
/// coverage. Pixels of an object outside the canvas are clipped.
pub fn render(scene: &Scene) -> Vec<f32> {
    let mut img = vec![-1f32; IMAGE_LEN];
    render_into(scene, &mut img);
    img
}

fn render_into(scene: &Scene, img: &mut [f32]) {
    let plane = CANVAS * CANVAS;
    img.fill(-1.0);
    for o in &scene.objects {
        let cov = coverage(o.shape, o.size);
        let rgb = o.color.rgb();
        for j in 0..o.size {
            for i in 0..o.size {
                let (x, y) = (o.x + i, o.y + j);
                let c = cov[j * o.size + i];
                if x >= CANVAS || y >= CANVAS || c == 0.0 {
                    continue;
                }
                for (ch, &v) in rgb.iter().enumerate() {
                    img[ch * plane + y * CANVAS + x] = v as f32 * c / 127.5 - 1.0;
                }
            }
        }
    }
}

/// The rendered scene as 8-bit RGB, row-major HWC (what a PNG of it holds).
pub fn render_u8(scene: &Scene) -> Vec<u8> {
    to_u8(&render(scene))
}

/// A training batch: `n` scenes drawn in order from `rng` (so the batch depends only on the RNG
/// state), rendered in parallel into [n, 3, 16, 16].
pub fn sample_batch(n: usize, rng: &mut Rng) -> (Vec<String>, Tensor) {
    let scenes: Vec<Scene> = (0..n).map(|_| sample_scene(None, rng)).collect();
    let mut data = vec![0f32; n * IMAGE_LEN];
    data.par_chunks_mut(IMAGE_LEN)
        .zip(scenes.par_iter())
        .for_each(|(img, s)| render_into(s, img));
    let prompts = scenes.into_iter().map(|s| s.prompt).collect();
    (prompts, Tensor::from_vec(data, &[n, 3, CANVAS, CANVAS]))
}

/// Mixes a base seed with stream and index numbers (SplitMix64 finaliser), keeping 53 bits so the
/// value survives a round trip through any JSON reader.
pub fn derive_seed(base: u64, stream: u64, index: u64) -> u64 {
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    };
    mix(mix(mix(base) ^ stream) ^ index) & ((1u64 << 53) - 1)
}

/// The scene of a dataset image: `sample_scene(Some(task), Rng::new(seed))` with the seed from
/// its manifest line.
pub fn dataset_scene(task: Task, seed: u64) -> Scene {
    sample_scene(Some(task), &mut Rng::new(seed))
}

/// Writes `n_per_task` images for every task (or only `task`) as `{task}_{i:05}.png` plus
/// `manifest.jsonl` into `out` (created if needed). Each image has its own seed, recorded in the
/// manifest, from which [`dataset_scene`] re-renders it. Returns the number of images.
pub fn write_dataset(
    out: impl AsRef<Path>,
    n_per_task: usize,
    task: Option<Task>,
    seed: u64,
) -> Result<usize> {
    let out = out.as_ref();
    crate::checkpoint::create_out_dir(out)?;
    let tasks: Vec<Task> = match task {
        Some(t) => vec![t],
        None => Task::ALL.to_vec(),
    };
    let jobs: Vec<(Task, usize)> = tasks
        .iter()
        .flat_map(|&t| (0..n_per_task).map(move |i| (t, i)))
        .collect();
    let lines: Vec<String> = jobs
        .par_iter()
        .map(|&(t, i)| -> Result<String> {
            let image_seed = derive_seed(seed, t as u64, i as u64);
            let scene = dataset_scene(t, image_seed);
            let file = format!("{}_{i:05}.png", t.name());
            write_png(out.join(&file), &render_u8(&scene), CANVAS, CANVAS)?;
            Ok(manifest_line(&file, &scene.prompt, t, image_seed))
        })
        .collect::<Result<_>>()?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    crate::checkpoint::write_atomic(&out.join("manifest.jsonl"), text.as_bytes())?;
    Ok(lines.len())
}

/// One manifest line with TOY.md's key order (file, prompt, task, seed).
pub fn manifest_line(file: &str, prompt: &str, task: Task, seed: u64) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!(
        "{{\"file\": {}, \"prompt\": {}, \"task\": {}, \"seed\": {seed}}}",
        q(file),
        q(prompt),
        q(task.name())
    )
}
