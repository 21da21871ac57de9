//! TMA tensor maps (sm_90): what a bulk tensor copy (`tma_load_4d`, cuda/common.cuh) reads to find
//! its box in global memory. On a GPU the driver encodes them (`cuTensorMapEncodeTiled`, in
//! `device::cuda`); under the emulator this module writes the emulator's own layout
//! (`EmuTensorMap` in cuda/emu/emu.cpp) into the same 128 bytes. Either way a kernel receives them
//! by value, as `const __grid_constant__` parameters ([`super::kernel::KernelArgs::maps`]).
//!
//! One kind of map is built here: a bf16 or f32 tensor of rank 4 moved in boxes whose rows are
//! 128 bytes (64 bf16, 32 f32) with the 128-byte swizzle — the rows of the attention kernels'
//! swizzled tiles (`chunk_offset` in cuda/attention_hopper.cu); a load reads zeros outside the
//! tensor, a reduction skips what falls outside it.

/// A CUtensorMap's 128 opaque bytes (its alignment as CUDA 13 declares it).
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaMap(pub [u64; 16]);

/// A bf16 (`elem_bytes` 2) or f32 (4) tensor of rank 4, innermost dimension first, and the box
/// one copy moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileMap4 {
    /// 2: bf16, 4: f32.
    pub elem_bytes: u32,
    /// The tensor's global address.
    pub base: u64,
    /// Elements along each dimension.
    pub dims: [u64; 4],
    /// Byte strides of dimensions 1..4 (dimension 0 is contiguous).
    pub strides: [u64; 3],
    /// The box: `boxes[0]` · `elem_bytes` is one swizzled 128-byte row.
    pub boxes: [u32; 4],
}

/// The emulator's tag in a map's first word (emu.cpp's `kTensorMapMagic`, "TNSORMAP").
const EMU_MAGIC: u64 = 0x5041_4d52_4f53_4e54;

impl TileMap4 {
    /// The driver's rules for such a map (CUDA driver API, `cuTensorMapEncodeTiled`), checked
    /// here so that a bad one is a clear error on both back ends: a 16-byte aligned base, every
    /// dimension 1..=2^32, strides multiples of 16 below 2^40, boxes of 1..=256 elements, and the
    /// 128-byte rows of the swizzle.
    pub fn check(&self) -> Result<(), String> {
        let bad = |why: String| Err(format!("tensor map {self:?}: {why}"));
        if self.base % 16 != 0 || self.base == 0 {
            return bad("the base is not a 16-byte aligned address".into());
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > 1 << 32) {
            return bad(format!("a dimension of {d} (1..=2^32)"));
        }
        if let Some(s) = self.strides.iter().find(|&&s| s % 16 != 0 || s >= 1 << 40) {
            return bad(format!(
                "a stride of {s} bytes (a multiple of 16 below 2^40)"
            ));
        }
        if let Some(b) = self.boxes.iter().find(|&&b| b == 0 || b > 256) {
            return bad(format!("a box of {b} elements (1..=256)"));
        }
        if !matches!(self.elem_bytes, 2 | 4) {
            return bad(format!(
                "{} bytes an element (2: bf16, 4: f32)",
                self.elem_bytes
            ));
        }
        if self.boxes[0] * self.elem_bytes != 128 {
            return bad("the box's rows must be 128 bytes (the 128-byte swizzle's rows)".into());
        }
        Ok(())
    }

    /// Bytes one copy of the box moves (zeros outside the tensor included).
    pub fn box_bytes(&self) -> u64 {
        self.elem_bytes as u64 * self.boxes.iter().map(|&b| b as u64).product::<u64>()
    }

    /// The emulator's layout: magic, base, dims[5], strides[5] (bytes; [0] the element size),
    /// box[5] (u32), rank, element bytes, swizzle bytes (u32). (Public for the emulator's own
    /// tests; kernels get their maps from `KernelDevice::tile_map`.)
    pub fn emulator_map(&self) -> TmaMap {
        let mut w = [0u64; 16];
        w[0] = EMU_MAGIC;
        w[1] = self.base;
        w[2..6].copy_from_slice(&self.dims);
        w[6] = 1; // dims[4], unused at rank 4
        w[7] = self.elem_bytes as u64; // strides[0]: the element size
        w[8..11].copy_from_slice(&self.strides);
        w[11] = 0;
        let pair = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        w[12] = pair(self.boxes[0], self.boxes[1]);
        w[13] = pair(self.boxes[2], self.boxes[3]);
        w[14] = pair(1, 4); // box[4]; rank
        w[15] = pair(self.elem_bytes, 128); // element bytes; swizzle
        TmaMap(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> TileMap4 {
        TileMap4 {
            elem_bytes: 2,
            base: 0x1000,
            dims: [64, 24, 4096, 2],
            strides: [128, 24 * 128, 4096 * 24 * 128],
            boxes: [64, 1, 128, 1],
        }
    }

    #[test]
    fn maps_the_driver_would_refuse_are_errors() {
        assert!(map().check().is_ok());
        assert_eq!(map().box_bytes(), 16384);
        let mut m = map();
        m.base = 0x1008;
        assert!(m.check().unwrap_err().contains("16-byte"));
        let mut m = map();
        m.strides[1] = 24 * 128 + 8;
        assert!(m.check().unwrap_err().contains("stride"));
        let mut m = map();
        m.boxes[2] = 512;
        assert!(m.check().unwrap_err().contains("box"));
        let mut m = map();
        m.dims[2] = 0;
        assert!(m.check().unwrap_err().contains("dimension"));
        let mut m = map();
        m.boxes[0] = 32;
        assert!(m.check().unwrap_err().contains("128-byte"));
        m.elem_bytes = 4; // 32 f32: a 128-byte row
        assert!(m.check().is_ok());
        assert_eq!(m.box_bytes(), 16384);
        m.elem_bytes = 8;
        assert!(m.check().unwrap_err().contains("bytes an element"));
    }
}
