//! Strict loading of safetensors weights into Burn modules through burn-store.
//!
//! Each weight becomes a lazy `burn_pack::Tensor` whose bytes are read from the file and widened to
//! f32 only when the module takes it (then rounded to f16 for a half-precision model), so peak
//! memory is the model plus one tensor. A half-precision model takes f16 weights as they are
//! stored. f32 weights of an f32 model, and f16 weights of a half-precision one, that need no
//! rearranging remain where the file is mapped, with no copy. The module tree's names are the
//! diffusers key names (see `remap.rs` for the few exceptions); [`TorchLayout`] transposes linear
//! weights and burn-store's `PyTorchToBurnAdapter` renames norm parameters.
//! Anything missing, left over or mis-shaped is an error that names the keys (burn-store
//! MIGRATION.md: strict loading).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use burn::store::burn_pack::{self, Tensor as PackTensor};
use burn::store::{ApplyError, ModuleAdapter, ModuleContext, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::{AllocationProperty, Bytes, DType, FloatDType};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

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

    /// The weight as a tensor of a model in `precision`: f16 weights stay f16 for a
    /// half-precision model, everything else is read as f32 (and rounded to f16 later by
    /// [`TorchLayout`] for a half-precision model).
    fn into_pack_tensor(self, precision: FloatDType) -> Result<PackTensor, String> {
        if matches!(self.dtype, StoredDtype::Other(_)) {
            return Err(format!(
                "'{}' is stored as {:?}, but the model needs floating-point weights",
                self.name, self.dtype
            ));
        }
        let elements: usize = self.shape.iter().product();
        let (file, dtype, range) = (self.file, self.dtype, self.bytes);
        let stays_half = dtype == StoredDtype::F16 && precision == FloatDType::F16;
        let (tensor_dtype, width) = if stays_half {
            (DType::F16, 2)
        } else {
            (DType::F32, 4)
        };
        Ok(PackTensor::deferred(
            self.name,
            tensor_dtype,
            self.shape,
            None,
            elements * width,
            move || {
                let in_place = (dtype == StoredDtype::F32 || stays_half)
                    && cfg!(target_endian = "little")
                    && range.start % width == 0;
                if in_place {
                    return Ok(Bytes::from_shared(
                        file.share(range.clone()),
                        AllocationProperty::File,
                    ));
                }
                let bytes = file.bytes(range.clone());
                let copy = if stays_half {
                    Bytes::from_elems(
                        bytes
                            .chunks_exact(2)
                            .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    )
                } else {
                    Bytes::from_elems(widen(dtype, bytes))
                };
                file.release(range.clone());
                Ok(copy)
            },
        ))
    }
}

/// Little-endian floats of any stored width, as f32.
fn widen(dtype: StoredDtype, bytes: &[u8]) -> Vec<f32> {
    // Aligned little-endian halves can be read in place.
    let halves = || -> Option<&[u16]> {
        cfg!(target_endian = "little")
            .then(|| bytemuck::try_cast_slice(bytes).ok())
            .flatten()
    };
    match dtype {
        StoredDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        // half's slice conversion uses the CPU's f16 instructions where it has them.
        StoredDtype::F16 if let Some(bits) = halves() => {
            let mut floats = vec![0f32; bits.len()];
            bits.reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(&mut floats);
            floats
        }
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

/// PyTorch's layout to Burn's: linear weights transposed from `[out, in]` to `[in, out]` tile by
/// tile (burn-store's own transpose moves one element at a time, which dominated loading), and the
/// rest (norm parameter names) left to burn-store's `PyTorchToBurnAdapter`; then, for a
/// half-precision model, every weight rounded to f16 one tensor at a time.
#[derive(Debug, Clone, Copy)]
struct TorchLayout {
    precision: FloatDType,
}

impl ModuleAdapter for TorchLayout {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        let adapted = burn_layout(tensor, ctx);
        match self.precision {
            FloatDType::F16 if adapted.dtype == DType::F32 => narrow_to_f16(adapted),
            _ => adapted,
        }
    }

    fn get_alternative_param_name(&self, param_name: &str, module_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, module_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// An f32 weight as f16 (round to nearest), produced when the module takes it.
fn narrow_to_f16(tensor: PackTensor) -> PackTensor {
    let elements = tensor.shape.iter().product::<usize>();
    let (name, shape, param_id) = (tensor.name.clone(), tensor.shape.clone(), tensor.param_id);
    PackTensor::deferred(name, DType::F16, shape, param_id, elements * 2, move || {
        let bytes = tensor.to_bytes()?;
        let floats = as_elements::<f32>(&bytes, &tensor.name)?;
        let mut halves = vec![half::f16::ZERO; floats.len()];
        halves.convert_from_f32_slice(floats);
        Ok(Bytes::from_elems(halves))
    })
}

/// [`TorchLayout`]'s rearranging, for weights in f32 or f16.
fn burn_layout(tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
    let linear_weight = ctx.module_type() == Some("Struct:Linear")
        && tensor.name.rsplit('.').next() == Some("weight")
        && tensor.shape.len() == 2
        && matches!(tensor.dtype, DType::F32 | DType::F16);
    if !linear_weight {
        return PyTorchToBurnAdapter.adapt(tensor, ctx);
    }
    let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
    let (name, param_id, byte_len) = (tensor.name.clone(), tensor.param_id, tensor.byte_len());
    let dtype = tensor.dtype;
    PackTensor::deferred(
        name,
        dtype,
        vec![cols, rows],
        param_id,
        byte_len,
        move || {
            let bytes = tensor.to_bytes()?;
            Ok(if dtype == DType::F16 {
                Bytes::from_elems(transpose(
                    as_elements::<u16>(&bytes, &tensor.name)?,
                    rows,
                    cols,
                ))
            } else {
                Bytes::from_elems(transpose(
                    as_elements::<f32>(&bytes, &tensor.name)?,
                    rows,
                    cols,
                ))
            })
        },
    )
}

/// A weight's bytes as the f32s (or f16 bit patterns) they hold.
fn as_elements<'a, T: bytemuck::Pod>(
    bytes: &'a Bytes,
    name: &str,
) -> Result<&'a [T], burn_pack::Error> {
    bytemuck::try_cast_slice(bytes).map_err(|e| {
        burn_pack::Error::ValidationError(format!(
            "'{name}' is not a buffer of {}: {e}",
            std::any::type_name::<T>()
        ))
    })
}

/// The `cols × rows` transpose of a row-major `rows × cols` matrix: bands of 16 output rows on
/// all cores, each filled in 16×16 tiles so that both sides stay in cache.
fn transpose<T: Copy + Default + Send + Sync>(matrix: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 16;
    let mut out = vec![T::default(); matrix.len()];
    if matrix.is_empty() {
        return out;
    }
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let col0 = band * TILE;
            for row0 in (0..rows).step_by(TILE) {
                let row1 = (row0 + TILE).min(rows);
                for (c, out_row) in out.chunks_exact_mut(rows).enumerate() {
                    let source = matrix[row0 * cols + col0 + c..].iter().step_by(cols);
                    for (dst, &src) in out_row[row0..row1].iter_mut().zip(source) {
                        *dst = src;
                    }
                }
            }
        });
    out
}

/// Loads every weight into `module`, in `precision` (f32 or f16); `origin` names the file or folder
/// in errors.
pub fn load_into<M: ModuleSnapshot>(
    module: &mut M,
    weights: Vec<WeightSlice>,
    origin: &Path,
    precision: FloatDType,
) -> Result<()> {
    let mismatch = |details: String| EngineError::WeightMismatch {
        path: origin.to_path_buf(),
        details,
    };
    let tensors = weights
        .into_iter()
        .map(|weight| weight.into_pack_tensor(precision))
        .collect::<Result<Vec<_>, _>>()
        .map_err(mismatch)?;
    // Enum modules (a conv-or-linear projection, TAESD's sequential layers) do not add a
    // variant segment: checkpoints name the layer directly.
    let adapter = TorchLayout { precision };
    let result = module.apply(tensors, None, Some(Box::new(adapter)), true);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::nn::LinearConfig;
    use burn::tensor::{DType, Device, FloatDType};

    use super::{WeightSlice, load_into, transpose};
    use crate::weights::index::WeightFile;

    /// Values exact in f16 and bf16, a subnormal-free mix of signs and magnitudes.
    const VALUES: [f32; 5] = [0.5, -3.25, 1024.0, 0.000061035156, 0.0];

    /// A one-tensor safetensors file `w` holding `data`, whose data section starts at a byte
    /// offset ≡ `misalign` (mod 8) in the file.
    fn file_with(dtype: &str, data: &[u8], misalign: usize) -> Arc<WeightFile> {
        let shape = [VALUES.len()];
        file_of(&[("w", dtype, &shape, data)], misalign)
    }

    /// A safetensors file of `(key, dtype, shape, data)` tensors, whose data section starts at a
    /// byte offset ≡ `misalign` (mod 8) in the file.
    fn file_of(tensors: &[(&str, &str, &[usize], &[u8])], misalign: usize) -> Arc<WeightFile> {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (key, dtype, shape, bytes) in tensors {
            entries.push(format!(
                r#""{key}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{},{}]}}"#,
                data.len(),
                data.len() + bytes.len()
            ));
            data.extend_from_slice(bytes);
        }
        let mut header = format!("{{{}}}", entries.join(","));
        while (8 + header.len()) % 8 != misalign {
            header.push(' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        let path = std::env::temp_dir().join(format!(
            "studio-load-{}-{}-{misalign}.safetensors",
            std::process::id(),
            tensors
                .iter()
                .map(|t| format!("{}{}", t.0, t.1))
                .collect::<String>()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = WeightFile::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn half_precision_models_take_f16_weights_as_stored() {
        // A 3 → 5 linear layer stored as PyTorch stores it, `weight` [5, 3], in f16 and in f32,
        // read from an aligned and a misaligned position.
        let weight: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.3).collect();
        let bias: Vec<f32> = (0..5).map(|i| i as f32 * 0.125).collect();
        let halves = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let floats = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let device = Device::flex();
        let load = |dtype: &str, encode: &dyn Fn(&[f32]) -> Vec<u8>, misalign: usize| {
            let (w, b) = (encode(&weight), encode(&bias));
            let file = file_of(
                &[("weight", dtype, &[5, 3], &w), ("bias", dtype, &[5], &b)],
                misalign,
            );
            let slices = ["weight", "bias"]
                .map(|key| WeightSlice::whole(&file, key, key).unwrap())
                .to_vec();
            let mut linear = LinearConfig::new(3, 5).init(&device);
            load_into(&mut linear, slices, "test".as_ref(), FloatDType::F16).unwrap();
            linear
        };
        // Burn's linear weight is [in, out]: element (i, o) is PyTorch's (o, i).
        let transposed: Vec<f32> = (0..15).map(|n| weight[(n % 5) * 3 + n / 5]).collect();
        let rounded = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
        };
        for (dtype, encode) in [
            ("F16", &halves as &dyn Fn(&[f32]) -> Vec<u8>),
            ("F32", &floats),
        ] {
            for misalign in [0, 1] {
                let linear = load(dtype, encode, misalign);
                let w = linear.weight.val();
                assert_eq!(w.dtype(), DType::F16, "{dtype} weights at ≡ {misalign}");
                assert_eq!(w.dims(), [3, 5]);
                let w: Vec<f32> = w.cast(FloatDType::F32).into_data().try_to_vec().unwrap();
                assert_eq!(w, rounded(&transposed), "{dtype} weights at ≡ {misalign}");
                let b = linear.bias.unwrap().val();
                assert_eq!(b.dtype(), DType::F16);
                let b: Vec<f32> = b.cast(FloatDType::F32).into_data().try_to_vec().unwrap();
                assert_eq!(b, rounded(&bias), "{dtype} bias at ≡ {misalign}");
            }
        }
    }

    #[test]
    fn every_stored_width_and_alignment_reads_the_same_floats() {
        let encodings: [(&str, Vec<u8>); 4] = [
            ("F32", VALUES.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (
                "F16",
                VALUES
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            (
                "BF16",
                VALUES
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            (
                "F64",
                VALUES
                    .iter()
                    .flat_map(|v| f64::from(*v).to_le_bytes())
                    .collect(),
            ),
        ];
        for (dtype, data) in encodings {
            // In place (aligned f32), and copied from an aligned and a misaligned position.
            for misalign in [0, 2, 1] {
                let file = file_with(dtype, &data, misalign);
                let bytes = WeightSlice::whole(&file, "w", "w")
                    .unwrap()
                    .into_pack_tensor(FloatDType::F32)
                    .unwrap()
                    .to_bytes()
                    .unwrap();
                let floats: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                assert_eq!(floats, VALUES, "{dtype} at offset ≡ {misalign} (mod 8)");
                // A half-precision model takes f16 bytes as they are.
                let half = WeightSlice::whole(&file, "w", "w")
                    .unwrap()
                    .into_pack_tensor(FloatDType::F16)
                    .unwrap();
                let expected = if dtype == "F16" {
                    DType::F16
                } else {
                    DType::F32
                };
                assert_eq!(half.dtype, expected, "{dtype} for a half-precision model");
                if dtype == "F16" {
                    assert_eq!(&half.to_bytes().unwrap()[..], &data[..]);
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_element_across_tiles() {
        // Neither side a multiple of the tile, and one side shorter than it.
        for (rows, cols) in [(45, 70), (3, 100), (64, 32), (1, 1)] {
            let matrix: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let out = transpose(&matrix, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        matrix[r * cols + c],
                        "{rows}×{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
