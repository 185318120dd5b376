//! A safetensors file, validated by its header (names, dtypes, shapes and byte ranges) and mapped
//! read-only into memory. Tensor bytes are read from the mapping one tensor at a time when a model
//! asks for them; f32 weights that need no rearranging are used where they lie (see `load.rs`), and
//! the pages of the others are let go once converted, so loading never holds the file and the
//! model in memory together. Pickle checkpoints are refused before anything is parsed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use safetensors::Dtype;
use safetensors::tensor::Metadata;

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

/// A validated safetensors file.
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
        let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let corrupt = |reason: String| EngineError::CorruptWeights {
            path: path.to_path_buf(),
            reason,
        };
        let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let mut length = [0u8; 8];
        file.read_exact(&mut length)
            .map_err(|_| corrupt("the file is too short for its header".into()))?;
        let header_len = u64::from_le_bytes(length);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(corrupt(format!(
                "the header claims {header_len} bytes; the file has {file_len}"
            )));
        }
        let mut header_bytes = vec![0u8; header_len as usize];
        file.read_exact(&mut header_bytes)
            .map_err(|e| EngineError::io(path, e))?;
        // Deserialising validates the offsets: contiguous, and each the size of its dtype and shape.
        let header: Metadata =
            serde_json::from_slice(&header_bytes).map_err(|e| corrupt(describe(&e)))?;
        if 8 + header_len + header.data_len() as u64 != file_len {
            return Err(corrupt(
                "the header describes more (or less) data than the file holds".into(),
            ));
        }
        let header_len = header_len as usize;
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
            map: map(&file, path)?,
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

    /// The same bytes as a buffer that keeps the file mapped for as long as it lives (no copy).
    pub fn share(self: &Arc<Self>, range: Range<usize>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Region {
            file: Arc::clone(self),
            range,
        })
    }

    /// Lets go of the memory holding a range that has been copied out (whole pages inside it); a
    /// later read maps the pages in again from the file. Elsewhere than Unix the system reclaims
    /// such clean file pages itself when memory runs short.
    pub fn release(&self, range: Range<usize>) {
        // The largest common page size (Apple silicon), a multiple of the others.
        const PAGE: usize = 1 << 14;
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end / PAGE * PAGE;
        #[cfg(unix)]
        if end > start {
            // SAFETY: the mapping is read-only and never written, so dropping pages only makes the
            // next access fault them in again from the file, with the same contents.
            #[allow(unsafe_code)]
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

/// A range of a mapped file, as the owner of a shared buffer.
struct Region {
    file: Arc<WeightFile>,
    range: Range<usize>,
}

/// A buffer that was only read to be converted (a transposed weight) lets go of its pages when
/// dropped; one the model kept does so when the model is dropped.
impl Drop for Region {
    fn drop(&mut self) {
        self.file.release(self.range.clone());
    }
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        self.file.bytes(self.range.clone())
    }
}

/// Maps `file` read-only.
fn map(file: &File, path: &Path) -> Result<Mmap> {
    // SAFETY: the mapping is read-only and private. Its contents change only if another program
    // rewrites the file while a model loaded from it is in use, the contract of every
    // memory-mapped weight loader (safetensors', PyTorch's); a file cut shorter meanwhile ends
    // the process on the next read of a lost page.
    #[allow(unsafe_code)]
    unsafe { Mmap::map(file) }.map_err(|e| EngineError::io(path, e))
}

/// safetensors' own limit on header size.
const MAX_HEADER: u64 = 100_000_000;

/// What is wrong with a header, in words.
fn describe(error: &serde_json::Error) -> String {
    let message = error.to_string();
    if message.contains("InvalidOffset") || message.contains("invalid offset") {
        "a tensor has an invalid byte range".into()
    } else if message.contains("TensorInvalidInfo") {
        "a tensor's byte range does not match its dtype and shape".into()
    } else {
        format!("the header is not valid safetensors JSON ({message})")
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
