//! Seeded noise is bit-for-bit torch's `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.

use serde_json::Value;
use studio_engine::noise::{TorchRng, noise};
use studio_tests::{Reference, fixtures};

fn shape(value: &Value) -> Vec<usize> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn assert_bits(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let differing = actual
        .iter()
        .zip(expected)
        .filter(|(a, e)| a.to_bits() != e.to_bits())
        .count();
    assert_eq!(
        differing,
        0,
        "{what}: {differing} of {} values differ",
        actual.len()
    );
}

#[test]
fn single_draws_match_torch_exactly() {
    let reference = Reference::load("noise");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/noise.json")).unwrap(),
    )
    .unwrap();
    let mut cases = 0;
    for case in meta
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != "sequence")
    {
        let seed = case["seed"].as_u64().unwrap();
        let shape = shape(&case["draws"][0]);
        let name = case["name"].as_str().unwrap();
        assert_bits(
            &format!("{name} (seed {seed}, {shape:?})"),
            &noise(seed, &shape),
            &reference.get(name).values,
        );
        cases += 1;
    }
    assert!(
        cases >= 6,
        "small (<16), tail (%16 != 0), large and >32-bit seeds are covered"
    );
}

#[test]
fn a_generator_continues_as_torch_does() {
    let reference = Reference::load("noise");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/noise.json")).unwrap(),
    )
    .unwrap();
    let sequence = meta
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sequence")
        .unwrap();
    let mut rng = TorchRng::new(sequence["seed"].as_u64().unwrap());
    for (j, draw) in sequence["draws"].as_array().unwrap().iter().enumerate() {
        let count = shape(draw).iter().product();
        assert_bits(
            &format!("draw {j}"),
            &rng.randn(count),
            &reference.get(&format!("sequence{j}")).values,
        );
    }
}
