//! Strict loading of safetensors weights into Burn modules through burn-store.
//!
//! Each weight becomes a lazy `burn_pack::Tensor` whose bytes are read from the file and widened to
//! f32 only when the module takes it, so peak memory is the model plus one tensor. The
//! module tree's names are the diffusers key names (see `remap.rs` for the few exceptions), and
//! burn-store's `PyTorchToBurnAdapter` transposes linear weights and renames norm parameters.
//! Anything missing, left over or mis-shaped is an error that names the keys (burn-store
//! MIGRATION.md: strict loading).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use burn::store::burn_pack::{self, Tensor as PackTensor};
use burn::store::{ApplyError, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::{Bytes, DType};

use super::index::{StoredDtype, WeightFile};
use crate::error::{EngineError, Result};

/// One tensor to load: its name in our module tree, the shape it has there, and its bytes.
#[derive(Debug, Clone)]
pub struct WeightSlice {
    pub name: String,
    pub shape: Vec<usize>,
    pub file: Arc<WeightFile>,
    pub dtype: StoredDtype,
    pub bytes: Range<usize>,
}

impl WeightSlice {
    /// The tensor `key` of `file`, under `name` and with its stored shape.
    pub fn whole(file: &Arc<WeightFile>, key: &str, name: impl Into<String>) -> Option<Self> {
        let info = file.get(key)?;
        Some(Self {
            name: name.into(),
            shape: info.shape.clone(),
            file: Arc::clone(file),
            dtype: info.dtype,
            bytes: info.bytes.clone(),
        })
    }

    /// Rows `rows` of the leading dimension (e.g. one of q/k/v in a fused projection).
    pub fn rows(mut self, rows: Range<usize>, name: impl Into<String>) -> Self {
        let row_bytes = self.shape[1..].iter().product::<usize>() * self.dtype.size();
        let start = self.bytes.start + rows.start * row_bytes;
        self.bytes = start..start + rows.len() * row_bytes;
        self.shape[0] = rows.len();
        self.name = name.into();
        self
    }

    /// The same bytes seen with another shape of equal size (a 1×1 convolution as a linear layer).
    pub fn reshaped(mut self, shape: Vec<usize>) -> Self {
        debug_assert_eq!(
            shape.iter().product::<usize>(),
            self.shape.iter().product::<usize>()
        );
        self.shape = shape;
        self
    }

    fn into_pack_tensor(self) -> Result<PackTensor, String> {
        if matches!(self.dtype, StoredDtype::Other(_)) {
            return Err(format!(
                "'{}' is stored as {:?}, but the model needs floating-point weights",
                self.name, self.dtype
            ));
        }
        let elements: usize = self.shape.iter().product();
        let (file, dtype, bytes) = (self.file, self.dtype, self.bytes);
        Ok(PackTensor::deferred(
            self.name,
            DType::F32,
            self.shape,
            None,
            elements * 4,
            move || {
                let raw = file.read(bytes.clone()).map_err(|e| {
                    burn_pack::Error::IoError(format!("{}: {e}", file.path().display()))
                })?;
                Ok(Bytes::from_elems(widen(dtype, &raw)))
            },
        ))
    }
}

/// Little-endian floats of any stored width, as f32.
fn widen(dtype: StoredDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        StoredDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        StoredDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StoredDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StoredDtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
            .collect(),
        StoredDtype::Other(_) => unreachable!("rejected in into_pack_tensor"),
    }
}

/// Loads every weight into `module`; `origin` names the file or folder in errors.
pub fn load_into<M: ModuleSnapshot>(
    module: &mut M,
    weights: Vec<WeightSlice>,
    origin: &Path,
) -> Result<()> {
    let mismatch = |details: String| EngineError::WeightMismatch {
        path: origin.to_path_buf(),
        details,
    };
    let tensors = weights
        .into_iter()
        .map(WeightSlice::into_pack_tensor)
        .collect::<Result<Vec<_>, _>>()
        .map_err(mismatch)?;
    // Enum modules (a conv-or-linear projection, TAESD's sequential layers) do not add a
    // variant segment: checkpoints name the layer directly.
    let result = module.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    let mut problems = Vec::new();
    for error in &result.errors {
        problems.push(match error {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "'{path}' has shape {:?}, the model expects {:?}",
                found.as_slice(),
                expected.as_slice()
            ),
            other => other.to_string(),
        });
    }
    if !result.missing.is_empty() {
        problems.push(format!(
            "missing {}",
            list(result.missing.iter().map(|(path, _)| path.as_str()))
        ));
    }
    if !result.unused.is_empty() {
        problems.push(format!(
            "unexpected {}",
            list(result.unused.iter().map(String::as_str))
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(mismatch(problems.join("; ")))
    }
}

/// "3 tensors: 'a', 'b', 'c'" with at most a handful of names spelled out.
fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    const SHOWN: usize = 6;
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    let total = names.len();
    let shown: Vec<String> = names.iter().take(SHOWN).map(|n| format!("'{n}'")).collect();
    let more = if total > SHOWN {
        format!(" and {} more", total - SHOWN)
    } else {
        String::new()
    };
    format!(
        "{total} tensor{}: {}{more}",
        if total == 1 { "" } else { "s" },
        shown.join(", ")
    )
}
