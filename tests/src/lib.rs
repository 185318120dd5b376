//! Helpers for the cross-crate tests: the fixture folder and the diffusers reference dumps made by
//! `tools/reference/make_fixtures.py`, and tolerant tensor comparison.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use studio_engine::{Checkpoint, Device, StableDiffusion, Tensor};

/// `tests/fixtures/`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A fixture model, loaded whole on the CPU.
pub fn load_model(name: &str) -> StableDiffusion {
    Checkpoint::open(&model(name))
        .and_then(|checkpoint| checkpoint.load_all(&Device::flex()))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A float tensor of a reference dump.
#[derive(Debug, Clone)]
pub struct Expected {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Expected {
    pub fn tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::<1>::from_floats(self.values.as_slice(), device)
            .reshape::<D, _>(<[usize; D]>::try_from(self.shape.as_slice()).expect("rank matches"))
    }
}

/// One `reference/*.safetensors` dump (every tensor stored as f32).
pub struct Reference(BTreeMap<String, Expected>);

impl Reference {
    pub fn load(name: &str) -> Self {
        let path = fixtures()
            .join("reference")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid reference dump");
        Self(
            file.tensors()
                .into_iter()
                .map(|(name, view)| {
                    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name} is not f32");
                    let values = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    (
                        name,
                        Expected {
                            shape: view.shape().to_vec(),
                            values,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> &Expected {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("no '{name}' in the reference dump"))
    }
}

/// Largest absolute difference between `actual` and `expected`, and the largest absolute value of
/// `expected` (the scale the tolerance is relative to).
pub fn max_error(actual: &[f32], expected: &[f32]) -> (f32, f32) {
    assert_eq!(actual.len(), expected.len(), "different element counts");
    let error = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    let scale = expected.iter().fold(0f32, |m, e| m.max(e.abs()));
    (error, scale)
}

/// Asserts `max |actual - expected| ≤ tolerance · max |expected|` and equal shapes.
pub fn assert_close<const D: usize>(
    what: &str,
    actual: Tensor<D>,
    expected: &Expected,
    tolerance: f32,
) {
    assert_eq!(
        actual.dims().as_slice(),
        expected.shape.as_slice(),
        "{what}: shape"
    );
    let values: Vec<f32> = actual.into_data().try_to_vec::<f32>().expect("f32 tensor");
    let (error, scale) = max_error(&values, &expected.values);
    assert!(
        error <= tolerance * scale,
        "{what}: max abs error {error:e} exceeds {tolerance:e} × scale {scale:e}"
    );
}
