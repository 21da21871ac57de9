//! The Shapes-GenEval checker (design/TOY.md): decides whether an image shows exactly what its
//! prompt names. No learned model: hue-based foreground, connected components, least-squares
//! template fits for the shape, coverage-weighted centroids for positions and relations.
//!
//! It reads 8-bit pixels because that is what sample folders hold; f32 images are quantised first
//! so both routes agree.

use crate::data::shapes::{
    coverage, Color, Item, Prompt, Relation, ShapeKind, Side, CANVAS, IMAGE_LEN,
};
use crate::error::{Error, Result};
use crate::eval::image::to_u8;
use std::sync::OnceLock;

/// A pixel is foreground only if its brightest channel reaches this (of 255).
pub const MIN_BRIGHTNESS: u8 = 48;
/// ...and its cosine similarity to the nearest palette colour reaches this. Hue rather than
/// distance: anti-aliased edges are the palette colour scaled down, not nearby in RGB.
pub const MIN_COSINE: f64 = 0.9;
/// Coverage estimates above 1 are noise; clipping keeps a few bright pixels from dominating.
pub const MAX_COVERAGE: f64 = 1.5;
/// Components with less summed coverage are speckle, not objects (the smallest rendered object,
/// a 4-px triangle, has about 8).
pub const MIN_MASS: f64 = 3.0;
/// Template box sizes tried by the shape fit.
pub const TEMPLATE_SIZES: std::ops::RangeInclusive<usize> = 3..=9;
/// Centroids must differ by at least this many pixels for a relation to hold.
pub const RELATION_MARGIN: f64 = 1.0;
/// Centre of the canvas in pixel coordinates (pixel i spans [i, i+1)).
pub const CENTRE: f64 = CANVAS as f64 / 2.0;

/// One object found in an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Detected {
    pub color: Color,
    pub shape: ShapeKind,
    /// Box size of the best-fitting template.
    pub size: usize,
    /// Top-left corner of the best-fitting template (may lie off the canvas).
    pub x: i32,
    pub y: i32,
    /// Coverage-weighted centroid in pixel coordinates.
    pub cx: f64,
    pub cy: f64,
    /// Summed coverage.
    pub mass: f64,
    /// Number of foreground pixels in the component.
    pub pixels: usize,
    /// Squared error of the best template fit.
    pub fit_error: f64,
}

impl Detected {
    pub fn item(&self) -> Item {
        Item {
            color: self.color,
            shape: self.shape,
        }
    }
}

struct Template {
    shape: ShapeKind,
    d: usize,
    cov: Vec<f32>,
    energy: f64,
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let mut v = Vec::new();
        for shape in ShapeKind::ALL {
            for d in TEMPLATE_SIZES {
                let cov = coverage(shape, d);
                let energy = cov.iter().map(|&c| (c as f64).powi(2)).sum();
                v.push(Template {
                    shape,
                    d,
                    cov,
                    energy,
                });
            }
        }
        v
    })
}

/// The palette colour of a pixel and its coverage, or None for background.
fn classify(p: [u8; 3]) -> Option<(usize, f64)> {
    if p.iter().copied().max().unwrap_or(0) < MIN_BRIGHTNESS {
        return None;
    }
    let pf = p.map(|v| v as f64);
    let pn = pf.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut best = (0usize, f64::MIN, 0.0);
    for (k, c) in Color::ALL.iter().enumerate() {
        let cf = c.rgb().map(|v| v as f64);
        let dot: f64 = pf.iter().zip(&cf).map(|(a, b)| a * b).sum();
        let cc: f64 = cf.iter().map(|v| v * v).sum();
        let cos = dot / (pn * cc.sqrt());
        if cos > best.1 {
            best = (k, cos, dot / cc);
        }
    }
    (best.1 >= MIN_COSINE).then(|| (best.0, best.2.clamp(0.0, MAX_COVERAGE)))
}

/// Finds the objects of a 16×16 8-bit RGB image (HWC).
pub fn detect_objects(image_u8_hwc: &[u8]) -> Result<Vec<Detected>> {
    if image_u8_hwc.len() != IMAGE_LEN {
        return Err(Error::Invalid(format!(
            "the checker takes a {CANVAS}×{CANVAS} RGB image ({IMAGE_LEN} bytes), got {} bytes",
            image_u8_hwc.len()
        )));
    }
    let n = CANVAS * CANVAS;
    let px: Vec<Option<(usize, f64)>> = (0..n)
        .map(|i| {
            let p = &image_u8_hwc[i * 3..i * 3 + 3];
            classify([p[0], p[1], p[2]])
        })
        .collect();
    let mut seen = vec![false; n];
    let mut found = Vec::new();
    for start in 0..n {
        let Some((color, _)) = px[start] else {
            continue;
        };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i % CANVAS) as i32, (i / CANVAS) as i32);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= CANVAS as i32 || ny >= CANVAS as i32 {
                        continue;
                    }
                    let j = ny as usize * CANVAS + nx as usize;
                    if !seen[j] && px[j].is_some_and(|(c, _)| c == color) {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if let Some(d) = measure(&members, &px, Color::ALL[color]) {
            found.push(d);
        }
    }
    Ok(found)
}

/// Centroid and shape of one component, or None if it is too faint to be an object.
fn measure(members: &[usize], px: &[Option<(usize, f64)>], color: Color) -> Option<Detected> {
    let mut map = [0f64; CANVAS * CANVAS];
    let (mut mass, mut sx, mut sy) = (0.0, 0.0, 0.0);
    let (mut x0, mut y0, mut x1, mut y1) = (CANVAS, CANVAS, 0, 0);
    for &i in members {
        let c = px[i].map_or(0.0, |p| p.1);
        let (x, y) = (i % CANVAS, i / CANVAS);
        map[i] = c;
        mass += c;
        sx += c * (x as f64 + 0.5);
        sy += c * (y as f64 + 0.5);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    if mass < MIN_MASS {
        return None;
    }
    let self_energy: f64 = map.iter().map(|v| v * v).sum();
    // Best (shape, size, position) by squared error ‖M − T‖²; the template's part off the canvas
    // counts as error, so a huge template cannot explain a small blob by hanging off the edge.
    let mut best: Option<(f64, &Template, i32, i32)> = None;
    for t in templates() {
        let d = t.d as i32;
        for ty in (y0 as i32 + 1 - d)..=(y1 as i32) {
            for tx in (x0 as i32 + 1 - d)..=(x1 as i32) {
                let mut cross = 0.0;
                for j in 0..d {
                    let y = ty + j;
                    if !(0..CANVAS as i32).contains(&y) {
                        continue;
                    }
                    for i in 0..d {
                        let x = tx + i;
                        if !(0..CANVAS as i32).contains(&x) {
                            continue;
                        }
                        cross += map[y as usize * CANVAS + x as usize]
                            * t.cov[(j * d + i) as usize] as f64;
                    }
                }
                let err = self_energy + t.energy - 2.0 * cross;
                if best.is_none_or(|b| err < b.0) {
                    best = Some((err, t, tx, ty));
                }
            }
        }
    }
    let (fit_error, t, x, y) = best?;
    Some(Detected {
        color,
        shape: t.shape,
        size: t.d,
        x,
        y,
        cx: sx / mass,
        cy: sy / mass,
        mass,
        pixels: members.len(),
        fit_error,
    })
}

/// Whether the detected objects are exactly the prompt's (count, colours, shapes, nothing else)
/// and the position or relation holds.
pub fn judge(detected: &[Detected], prompt: &Prompt) -> bool {
    let mut want = prompt.items();
    let mut got: Vec<Item> = detected.iter().map(Detected::item).collect();
    want.sort();
    got.sort();
    if want != got {
        return false;
    }
    match *prompt {
        Prompt::Position(_, side) => {
            let o = &detected[0];
            match side {
                Side::Left => o.cx < CENTRE,
                Side::Right => o.cx > CENTRE,
                Side::Top => o.cy < CENTRE,
                Side::Bottom => o.cy > CENTRE,
            }
        }
        Prompt::Relation(a, r, b) => {
            // The two colours differ (the parser insists), so each object is found by colour.
            let find = |it: Item| detected.iter().find(|d| d.color == it.color);
            let (Some(p), Some(q)) = (find(a), find(b)) else {
                return false;
            };
            match r {
                Relation::LeftOf => q.cx - p.cx >= RELATION_MARGIN,
                Relation::RightOf => p.cx - q.cx >= RELATION_MARGIN,
                Relation::Above => q.cy - p.cy >= RELATION_MARGIN,
                Relation::Below => p.cy - q.cy >= RELATION_MARGIN,
            }
        }
        _ => true,
    }
}

/// Checks an 8-bit RGB HWC 16×16 image against its prompt.
pub fn check(image_u8_hwc: &[u8], prompt: &str) -> Result<bool> {
    let prompt = Prompt::parse(prompt)?;
    Ok(judge(&detect_objects(image_u8_hwc)?, &prompt))
}

/// Checks a [−1, 1] f32 [3, 16, 16] image (quantised to 8 bits first, as its PNG would be).
pub fn check_f32(image_chw: &[f32], prompt: &str) -> Result<bool> {
    if image_chw.len() != IMAGE_LEN {
        return Err(Error::Invalid(format!(
            "the checker takes a [3, {CANVAS}, {CANVAS}] image ({IMAGE_LEN} values), got {}",
            image_chw.len()
        )));
    }
    check(&to_u8(image_chw), prompt)
}
