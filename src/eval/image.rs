//! Image IO for the Shapes folders: PNG reading and writing, grids for looking at samples, and the
//! conversions between the model's [−1, 1] f32 CHW tensors and 8-bit HWC pixels.
//!
//! Evaluation always goes through 8-bit pixels (in memory or from a PNG), so a score computed on
//! samples in memory equals the score of the same samples read back from their folder.

use crate::error::{Error, Result};
use std::io::Cursor;
use std::path::Path;

/// Grey of the gaps between grid tiles: neither the black background nor a palette colour.
const GRID_GAP: u8 = 128;

/// [−1, 1] f32 CHW (3 channels) → 8-bit HWC RGB, rounding to nearest and clamping (NaN → 0).
pub fn to_u8(chw: &[f32]) -> Vec<u8> {
    assert_eq!(chw.len() % 3, 0, "to_u8: expects 3 channels");
    let plane = chw.len() / 3;
    let mut out = vec![0u8; chw.len()];
    for p in 0..plane {
        for c in 0..3 {
            let v = ((chw[c * plane + p] + 1.0) * 127.5).round();
            out[p * 3 + c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// 8-bit HWC RGB → [−1, 1] f32 CHW (pixel / 127.5 − 1).
pub fn from_u8(hwc: &[u8]) -> Vec<f32> {
    assert_eq!(hwc.len() % 3, 0, "from_u8: expects 3 channels");
    let plane = hwc.len() / 3;
    let mut out = vec![0f32; hwc.len()];
    for p in 0..plane {
        for c in 0..3 {
            out[c * plane + p] = hwc[p * 3 + c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// PNG bytes of an 8-bit RGB image.
pub fn encode_png(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    if rgb.len() != w * h * 3 || w == 0 || h == 0 {
        return Err(Error::Invalid(format!(
            "encode_png: {} bytes for a {w}×{h} RGB image",
            rgb.len()
        )));
    }
    let mut bytes = Vec::new();
    let err = |e: png::EncodingError| Error::Invalid(format!("PNG encoding failed: {e}"));
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(rgb).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(bytes)
}

/// Writes an 8-bit RGB PNG (HWC bytes).
pub fn write_png(path: impl AsRef<Path>, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let path = path.as_ref();
    let bytes =
        encode_png(rgb, w, h).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Decodes PNG bytes to 8-bit RGB HWC. Gray is replicated, 16-bit reduced, palettes expanded and
/// alpha composited over black (the Shapes background). `name` labels errors.
pub fn decode_png(bytes: &[u8], name: &str) -> Result<(Vec<u8>, usize, usize)> {
    let bad = |e: png::DecodingError| Error::Invalid(format!("{name}: not a readable PNG: {e}"));
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::Invalid(format!("{name}: PNG dimensions too large to decode")))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    if info.bit_depth != png::BitDepth::Eight {
        return Err(Error::Invalid(format!(
            "{name}: unsupported PNG bit depth {:?}",
            info.bit_depth
        )));
    }
    let samples = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(Error::Invalid(format!(
                "{name}: indexed PNG was not expanded to RGB"
            )))
        }
    };
    let over_black = |v: u8, a: u8| ((v as u32 * a as u32 + 127) / 255) as u8;
    let mut out = Vec::with_capacity(w * h * 3);
    for row in buf.chunks(info.line_size).take(h) {
        for px in row[..w * samples].chunks_exact(samples) {
            match samples {
                1 => out.extend_from_slice(&[px[0]; 3]),
                2 => out.extend_from_slice(&[over_black(px[0], px[1]); 3]),
                3 => out.extend_from_slice(px),
                _ => out.extend(px[..3].iter().map(|&v| over_black(v, px[3]))),
            }
        }
    }
    if out.len() != w * h * 3 {
        return Err(Error::Invalid(format!("{name}: truncated PNG image data")));
    }
    Ok((out, w, h))
}

/// Reads a PNG as 8-bit RGB HWC: (pixels, width, height).
pub fn read_png(path: impl AsRef<Path>) -> Result<(Vec<u8>, usize, usize)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_png(&bytes, &path.display().to_string())
}

/// Writes square RGB images (HWC, all the same size) as one PNG: `cols` per row, a 1-px grey gap
/// between tiles and around them, each image upscaled `scale` times (nearest neighbour).
pub fn write_grid<I: AsRef<[u8]>>(
    path: impl AsRef<Path>,
    images: &[I],
    cols: usize,
    scale: usize,
) -> Result<()> {
    let path = path.as_ref();
    let (rgb, w, h) = grid(images, cols, scale)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    write_png(path, &rgb, w, h)
}

/// The grid of [`write_grid`] in memory: (pixels, width, height).
pub fn grid<I: AsRef<[u8]>>(
    images: &[I],
    cols: usize,
    scale: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    if images.is_empty() || cols == 0 || scale == 0 {
        return Err(Error::Invalid(
            "a grid needs at least one image, one column and a scale ≥ 1".into(),
        ));
    }
    let len = images[0].as_ref().len();
    let side = ((len / 3) as f64).sqrt().round() as usize;
    if side == 0 || side * side * 3 != len {
        return Err(Error::Invalid(format!(
            "grid images must be square RGB; the first has {len} bytes"
        )));
    }
    if let Some(i) = images.iter().position(|im| im.as_ref().len() != len) {
        return Err(Error::Invalid(format!(
            "grid image {i} has {} bytes, the first has {len}",
            images[i].as_ref().len()
        )));
    }
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let tile = side * scale;
    let (w, h) = (cols * (tile + 1) + 1, rows * (tile + 1) + 1);
    let mut out = vec![GRID_GAP; w * h * 3];
    for (k, im) in images.iter().enumerate() {
        let im = im.as_ref();
        let (ox, oy) = (1 + (k % cols) * (tile + 1), 1 + (k / cols) * (tile + 1));
        for y in 0..tile {
            for x in 0..tile {
                let src = ((y / scale) * side + x / scale) * 3;
                let dst = ((oy + y) * w + ox + x) * 3;
                out[dst..dst + 3].copy_from_slice(&im[src..src + 3]);
            }
        }
    }
    Ok((out, w, h))
}
