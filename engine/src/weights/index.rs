//! A safetensors file opened by its header alone: names, dtypes, shapes and byte ranges, with the
//! tensor bytes left in a memory map until a model asks for them. Pickle checkpoints are refused
//! before anything is parsed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{EngineError, Result};

/// Element types a weight can be stored as. Floats convert to f32 when loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    F64,
    /// Integers and booleans: buffers such as `position_ids`, never model weights.
    Other(Dtype),
}

impl StoredDtype {
    fn from_safetensors(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            Dtype::F64 => Self::F64,
            other => Self::Other(other),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::F64 => 8,
            Self::Other(dtype) => dtype.bitsize().div_ceil(8),
        }
    }
}

/// One tensor of a file: what it is and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file.
    pub bytes: Range<usize>,
}

/// A validated safetensors file, memory-mapped.
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    map: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl WeightFile {
    /// Opens and validates `path`: the header must parse, and every tensor's byte range must match its
    /// dtype and shape and lie inside the file.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        refuse_pickle(path)?;
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let map = map_file(&file).map_err(|e| EngineError::io(path, e))?;
        let corrupt = |reason: String| EngineError::CorruptWeights {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, header) =
            SafeTensors::read_metadata(&map).map_err(|e| corrupt(describe(&e)))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in header.tensors() {
            let (start, end) = info.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype: StoredDtype::from_safetensors(info.dtype),
                    shape: info.shape.clone(),
                    bytes: data_start + start..data_start + end,
                },
            );
        }
        let metadata = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The free-form `__metadata__` of the header (e.g. `modelspec.prediction_type`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of a range returned in a [`TensorInfo`].
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.map[range]
    }
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is only read. Another process truncating the file while it is mapped could
    // fault the reads (as with every memory-mapped loader); weights are not expected to change
    // under a running studio, and the header was validated against the length mapped here.
    unsafe { Mmap::map(file) }
}

fn describe(error: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match error {
        E::MetadataIncompleteBuffer => {
            "the header describes more (or less) data than the file holds".into()
        }
        E::InvalidOffset(name) => format!("tensor '{name}' has an invalid byte range"),
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        E::HeaderTooSmall | E::InvalidHeaderLength => "the file is too short for its header".into(),
        E::HeaderTooLarge => "the header length is implausibly large".into(),
        other => other.to_string(),
    }
}

/// Refuses `.ckpt`/`.pt`/`.pth`/`.bin` files and anything that starts like a pickle or a torch zip
/// archive, without parsing it.
fn refuse_pickle(path: &Path) -> Result<()> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if matches!(
        extension.as_deref(),
        Some("ckpt" | "pt" | "pth" | "bin" | "pkl")
    ) {
        return Err(EngineError::PickleRefused {
            path: path.to_path_buf(),
        });
    }
    // A safetensors file opens with its header length (8 bytes) and then the JSON header; that
    // length can begin with the same bytes as a pickle, so the `{` decides first.
    let mut head = [0u8; 9];
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut read = 0;
    while read < head.len() {
        match file
            .read(&mut head[read..])
            .map_err(|e| EngineError::io(path, e))?
        {
            0 => break,
            n => read += n,
        }
    }
    let safetensors_header = read == 9 && head[8] == b'{';
    let pickle_protocol = read >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
    let torch_zip = read >= 4 && head[..4] == *b"PK\x03\x04";
    if !safetensors_header && (pickle_protocol || torch_zip) {
        return Err(EngineError::PickleRefused {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}
