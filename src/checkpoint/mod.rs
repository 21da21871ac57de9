//! Checkpoint IO: safetensors files read through a memory map, tensor by tensor, and written
//! atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
//! half-written checkpoint behind.

use crate::error::{Error, Result};
use crate::tensor::{numel, DType, StoredDType, Tensor};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A safetensors file opened for reading. The header is parsed and validated once (offsets,
/// sizes, total length: a truncated file is rejected here); tensor data is read on demand from the
/// memory map, so a large model is never held twice in memory.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    metadata: Metadata,
    data_start: usize,
}

/// Name, stored dtype and shape of one tensor in a file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is the
        // usual caveat of memory-mapped IO, the same as every safetensors loader accepts.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(SafetensorsFile {
            path,
            mmap,
            metadata,
            data_start: 8 + header_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The free-form `__metadata__` map of the header.
    pub fn user_metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    pub fn entries(&self) -> Vec<TensorEntry> {
        self.names()
            .into_iter()
            .map(|name| {
                let info = self.metadata.info(&name).expect("listed name");
                TensorEntry {
                    dtype: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    name,
                }
            })
            .collect()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                key: name.to_string(),
            })
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.clone())
    }

    /// The stored dtype of tensor `name`; an error for dtypes the engine does not read.
    pub fn stored_dtype(&self, name: &str) -> Result<StoredDType> {
        match self.info(name)?.dtype {
            Dtype::F32 => Ok(StoredDType::F32),
            Dtype::F16 => Ok(StoredDType::F16),
            Dtype::BF16 => Ok(StoredDType::BF16),
            other => Err(Error::UnsupportedDType {
                path: self.path.clone(),
                key: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// Loads a tensor: f32 and f16 become f32 (f16 is widened), bf16 stays bf16.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let stored = self.stored_dtype(name)?;
        let info = self.info(name)?;
        let (a, b) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + a..self.data_start + b];
        Ok(Tensor::from_le_bytes(bytes, stored, &info.shape))
    }

    /// Rows `[start, start + count)` of tensor `name` along its first axis, as f32, every value
    /// checked finite: a slice of a large data tensor read without reading the rest.
    pub fn load_rows_f32(&self, name: &str, start: usize, count: usize) -> Result<Tensor> {
        let stored = self.stored_dtype(name)?;
        let info = self.info(name)?;
        let rows = info.shape.first().copied().unwrap_or(0);
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}`: rows {start}..{} asked of {rows}",
                self.path.display(),
                start.saturating_add(count)
            )));
        }
        let row_bytes = numel(&info.shape[1..]) * stored.size_in_bytes();
        let first = self.data_start + info.data_offsets.0 + start * row_bytes;
        let bytes = &self.mmap[first..first + count * row_bytes];
        let mut shape = info.shape.clone();
        shape[0] = count;
        let t = Tensor::from_le_bytes(bytes, stored, &shape).to_dtype(DType::F32);
        check_finite(&self.path, name, &t)?;
        Ok(t)
    }

    /// Loads a tensor as f32, checking its shape when `expected` is given and that every value
    /// is finite (a weight or optimizer state with a NaN would poison every later step).
    pub fn load_f32(&self, name: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        let t = self.load(name)?;
        if let Some(want) = expected {
            if t.shape() != want {
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    key: name.to_string(),
                    found: t.shape().to_vec(),
                    expected: want.to_vec(),
                });
            }
        }
        let t = t.to_dtype(DType::F32);
        check_finite(&self.path, name, &t)?;
        Ok(t)
    }
}

/// An error naming `key` of `path` when f32 tensor `t` holds a NaN or an infinity: what a
/// diverged run saves, refused where weights are loaded for use (a layout conversion passes them
/// through).
pub fn check_finite(path: &Path, key: &str, t: &Tensor) -> Result<()> {
    let values = t.f32s();
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count == 0 {
        return Ok(());
    }
    Err(Error::NonFinite {
        path: path.to_path_buf(),
        key: key.to_string(),
        count,
        total: values.len(),
    })
}

/// A tensor to be written: its name, shape and stored dtype are known up front (for the header),
/// its values are produced only when the writer reaches it, so a model is streamed to disk one
/// tensor at a time. A producer that fails (a read, a download, a NaN check) fails the write.
pub struct PendingTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoredDType,
    pub produce: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

impl<'a> PendingTensor<'a> {
    /// A tensor already in memory, written in its own dtype.
    pub fn ready(name: impl Into<String>, t: &'a Tensor) -> Self {
        let dtype = match t.dtype() {
            DType::F32 => StoredDType::F32,
            DType::BF16 => StoredDType::BF16,
        };
        PendingTensor {
            name: name.into(),
            shape: t.shape().to_vec(),
            dtype,
            produce: Box::new(move || Ok(t.clone())),
        }
    }
}

/// Little-endian bytes of `t` in the stored dtype (rounding to nearest even when narrowing).
pub fn encode(t: &Tensor, dtype: StoredDType) -> Vec<u8> {
    match (dtype, t.dtype()) {
        (StoredDType::F32, DType::F32) | (StoredDType::BF16, DType::BF16) => t.to_le_bytes(),
        (StoredDType::F32, DType::BF16) => t.to_dtype(DType::F32).to_le_bytes(),
        (StoredDType::BF16, DType::F32) => t.to_dtype(DType::BF16).to_le_bytes(),
        (StoredDType::F16, _) => t
            .to_vec()
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Writes tensors (in their own dtype) to a safetensors file atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let pending: Vec<PendingTensor> = tensors
        .iter()
        .map(|(n, t)| PendingTensor::ready(n.clone(), t))
        .collect();
    write_safetensors(path.as_ref(), &pending, metadata)
}

/// Streams tensors into a safetensors file atomically: a temporary file in the same folder is
/// written tensor by tensor, synced, then renamed over `path`. A producer's error (or a tensor
/// of another shape than declared) fails the write and leaves the file on disk as it was; no
/// producer runs after it. The bytes are a function of the tensors and metadata alone
/// ([`safetensors_header`]): the same state saves to the same file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[PendingTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = write_tensors(&tmp, path, tensors, metadata.as_ref()).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The header and then each tensor's bytes, produced one at a time, into `tmp`.
fn write_tensors(
    tmp: &Path,
    path: &Path,
    tensors: &[PendingTensor],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let io = |e| Error::io(path, e);
    let (header, order) = safetensors_header(path, tensors, metadata)?;
    let mut out = std::io::BufWriter::new(File::create(tmp).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(header.as_bytes()))
        .map_err(io)?;
    for t in order {
        let value = (t.produce)()?;
        if value.shape() != t.shape.as_slice() {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` came out {:?}, declared {:?}",
                path.display(),
                t.name,
                value.shape(),
                t.shape
            )));
        }
        out.write_all(&encode(&value, t.dtype)).map_err(io)?;
    }
    out.flush().map_err(io)
}

fn safetensors_dtype_name(d: StoredDType) -> &'static str {
    match d {
        StoredDType::F32 => "F32",
        StoredDType::F16 => "F16",
        StoredDType::BF16 => "BF16",
    }
}

/// The JSON header (padded with spaces to 8 bytes) and the tensors in the order their data
/// follows it: the safetensors crate's order (the wider dtype first, then by name), the metadata
/// in key order — so a file's bytes never depend on a hash map's iteration order.
fn safetensors_header<'a, 'b>(
    path: &Path,
    tensors: &'b [PendingTensor<'a>],
    metadata: Option<&HashMap<String, String>>,
) -> Result<(String, Vec<&'b PendingTensor<'a>>)> {
    let rank = |d: StoredDType| match d {
        StoredDType::F32 => 0,
        StoredDType::BF16 => 1,
        StoredDType::F16 => 2,
    };
    let mut order: Vec<&PendingTensor> = tensors.iter().collect();
    order.sort_by(|a, b| (rank(a.dtype), &a.name).cmp(&(rank(b.dtype), &b.name)));
    if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::Invalid(format!(
            "{}: tensor `{}` written twice",
            path.display(),
            w[0].name
        )));
    }
    let json = |s: &str| serde_json::Value::from(s).to_string();
    let mut entries = Vec::new();
    if let Some(m) = metadata {
        let sorted: std::collections::BTreeMap<&String, &String> = m.iter().collect();
        let pairs: Vec<String> = sorted
            .into_iter()
            .map(|(k, v)| format!("{}:{}", json(k), json(v)))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", pairs.join(",")));
    }
    let mut offset = 0;
    for t in &order {
        let end = offset + numel(&t.shape) * t.dtype.size_in_bytes();
        entries.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            json(&t.name),
            safetensors_dtype_name(t.dtype),
            serde_json::Value::from(t.shape.clone())
        ));
        offset = end;
    }
    let mut header = format!("{{{}}}", entries.join(","));
    header.push_str(&" ".repeat(header.len().next_multiple_of(8) - header.len()));
    Ok((header, order))
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Creates the output folder `dir` (and its parents) unless it exists; a file in its place is an
/// error saying so.
pub fn create_out_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a folder",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
