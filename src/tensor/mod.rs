//! Tensors: a shape, a dtype and contiguous row-major storage on a device.
//!
//! Storage is shared (`Arc`) and immutable once built, so cloning a tensor is cheap and the
//! autograd can keep forward values for the backward without copies. Layout changes are explicit
//! ops (ARCHITECTURE.md rule 6): there are no strides here.

mod rng;

pub use rng::Rng;

use crate::device::Device;
use half::{bf16, f16};
use std::fmt;
use std::sync::Arc;

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

/// The bytes behind a tensor. CPU storage only for now; the CUDA device adds its own variant.
#[derive(Debug)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

impl Storage {
    fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype().name())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// An f32 tensor from data in row-major order. Panics if the length does not match the shape.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(
            data.len(),
            numel(shape),
            "Tensor::from_vec: {} values for shape {:?}",
            data.len(),
            shape
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::F32(data)),
        }
    }

    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), numel(shape), "Tensor::from_bf16: length/shape");
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::BF16(data)),
        }
    }

    pub fn scalar(v: f32) -> Tensor {
        Tensor::from_vec(vec![v], &[])
    }

    pub fn full(shape: &[usize], v: f32) -> Tensor {
        Tensor::from_vec(vec![v; numel(shape)], shape)
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// Standard normal entries drawn from `rng`.
    pub fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
        let data = (0..numel(shape)).map(|_| rng.normal()).collect();
        Tensor::from_vec(data, shape)
    }

    /// Uniform entries in `[lo, hi)` drawn from `rng`.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut Rng) -> Tensor {
        let data = (0..numel(shape))
            .map(|_| lo + (hi - lo) * rng.uniform())
            .collect();
        Tensor::from_vec(data, shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`; negative `d` counts from the end.
    pub fn dim(&self, d: isize) -> usize {
        self.shape[self.axis(d)]
    }

    /// Resolves a possibly negative axis index.
    pub fn axis(&self, d: isize) -> usize {
        let r = self.rank() as isize;
        let a = if d < 0 { r + d } else { d };
        assert!(
            (0..r).contains(&a),
            "axis {d} out of range for shape {:?}",
            self.shape
        );
        a as usize
    }

    pub fn numel(&self) -> usize {
        self.storage.len()
    }

    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The f32 data of a CPU tensor. The CPU backend computes in f32 only; a bf16 tensor must be
    /// converted first with [`Tensor::to_dtype`], and asking for its f32 slice is a bug.
    pub fn f32s(&self) -> &[f32] {
        match &*self.storage {
            Storage::F32(v) => v,
            Storage::BF16(_) => panic!(
                "expected an f32 tensor, got bf16 {:?}: the CPU backend computes in f32, convert with to_dtype",
                self.shape
            ),
        }
    }

    /// A copy of the values as f32, whatever the dtype.
    pub fn to_vec(&self) -> Vec<f32> {
        match &*self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> f32 {
        assert_eq!(
            self.numel(),
            1,
            "item() on a tensor of shape {:?}",
            self.shape
        );
        self.to_vec()[0]
    }

    /// Converts to `dtype` (round-to-nearest-even into bf16). Same dtype: a cheap clone.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let storage = match (&*self.storage, dtype) {
            (Storage::F32(v), DType::BF16) => {
                Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (Storage::BF16(v), DType::F32) => Storage::F32(v.iter().map(|x| x.to_f32()).collect()),
            _ => unreachable!("same dtype handled above"),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Arc::new(storage),
        }
    }

    /// Same data, new shape (one dimension may be `usize::MAX` to infer it).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        let shape = infer_shape(shape, self.numel());
        assert_eq!(
            numel(&shape),
            self.numel(),
            "reshape {:?} -> {:?}",
            self.shape,
            shape
        );
        Tensor {
            shape,
            storage: self.storage.clone(),
        }
    }

    /// A new tensor with the same shape holding `f` applied to every value (f32).
    pub fn map(&self, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
        use rayon::prelude::*;
        // Collected straight into the new vector: a zero-filled one would be written twice
        // (the fill is a single-threaded memset, a third of a cheap map's time).
        let mut out = Vec::with_capacity(self.numel());
        self.f32s()
            .par_iter()
            .with_min_len(1 << 14)
            .map(|&s| f(s))
            .collect_into_vec(&mut out);
        Tensor::from_vec(out, &self.shape)
    }

    /// Largest absolute difference to `other` (same shape).
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape, "max_abs_diff: shapes differ");
        let (a, b) = (self.to_vec(), other.to_vec());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// ‖self − other‖₂ / ‖other‖₂ (with a tiny floor), computed in f64.
    pub fn rel_l2(&self, reference: &Tensor) -> f64 {
        assert_eq!(self.shape, reference.shape, "rel_l2: shapes differ");
        let (a, b) = (self.to_vec(), reference.to_vec());
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in a.iter().zip(&b) {
            num += ((x - y) as f64).powi(2);
            den += (*y as f64).powi(2);
        }
        num.sqrt() / den.sqrt().max(1e-30)
    }

    /// Decodes little-endian bytes of a stored dtype into a tensor (f16 is widened to f32).
    pub fn from_le_bytes(bytes: &[u8], stored: StoredDType, shape: &[usize]) -> Tensor {
        match stored {
            StoredDType::F32 => Tensor::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                shape,
            ),
            StoredDType::F16 => Tensor::from_vec(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                shape,
            ),
            StoredDType::BF16 => Tensor::from_bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                shape,
            ),
        }
    }

    /// Little-endian bytes of the storage.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &*self.storage {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Dtypes a checkpoint may store; f16 is read (widened) but never a compute dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
}

impl StoredDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            StoredDType::F32 => 4,
            StoredDType::F16 | StoredDType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoredDType::F32 => "f32",
            StoredDType::F16 => "f16",
            StoredDType::BF16 => "bf16",
        }
    }

    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<StoredDType> {
        match s {
            "f32" => Some(StoredDType::F32),
            "f16" => Some(StoredDType::F16),
            "bf16" => Some(StoredDType::BF16),
            _ => None,
        }
    }
}

fn infer_shape(shape: &[usize], n: usize) -> Vec<usize> {
    let unknown = shape.iter().filter(|&&d| d == usize::MAX).count();
    assert!(unknown <= 1, "reshape: at most one inferred dimension");
    if unknown == 0 {
        return shape.to_vec();
    }
    let known: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
    assert!(
        known > 0 && n % known == 0,
        "reshape: cannot infer a dimension of {shape:?} for {n} values"
    );
    shape
        .iter()
        .map(|&d| if d == usize::MAX { n / known } else { d })
        .collect()
}
