//! Corrupt, hostile and mismatched model files give a clear `EngineError`, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::{Dtype, SafeTensors};
use studio_engine::{Checkpoint, Device, EngineError};
use studio_tests::model;

/// A fresh scratch folder under the system temp dir.
fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "studio-bad-input-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn open_err(path: &Path) -> EngineError {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

/// Rewrites the single-file fixture with `edit` applied to its tensors.
fn edited_single_file(
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let bytes = std::fs::read(model("sd1.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<_, _> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let path = scratch().join("edited.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn truncated_file_is_corrupt() {
    let bytes = std::fs::read(model("sd1.safetensors")).unwrap();
    let path = scratch().join("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let error = open_err(&path);
    assert!(
        matches!(error, EngineError::CorruptWeights { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("download it again"), "{error}");
}

#[test]
fn header_lying_about_sizes_is_corrupt() {
    let header = br#"{"model.diffusion_model.input_blocks.0.0.weight":{"dtype":"F32","shape":[1000,9,3,3],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    let path = scratch().join("lying.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let error = open_err(&path);
    assert!(
        matches!(error, EngineError::CorruptWeights { .. }),
        "{error}"
    );
}

#[test]
fn garbage_header_is_corrupt() {
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 40]);
    let path = scratch().join("garbage.safetensors");
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        open_err(&path),
        EngineError::CorruptWeights { .. }
    ));
}

#[test]
fn pickles_are_refused_unopened() {
    let dir = scratch();
    // A protocol-2 pickle whose only opcode would import `os.system` if it were ever unpickled.
    let pickle = b"\x80\x02cos\nsystem\nq\x00.";
    for name in [
        "model.ckpt",
        "model.pt",
        "model.bin",
        "disguised.safetensors",
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pickle).unwrap();
        let error = open_err(&path);
        assert!(
            matches!(error, EngineError::PickleRefused { .. }),
            "{name}: {error}"
        );
        assert!(
            error.to_string().contains("safetensors"),
            "the message suggests a conversion: {error}"
        );
    }
    let zip = dir.join("zipped.safetensors");
    std::fs::write(&zip, b"PK\x03\x04archive").unwrap();
    assert!(matches!(open_err(&zip), EngineError::PickleRefused { .. }));
}

#[test]
fn folder_with_pickled_component_is_refused() {
    let dir = copy_of_sd1_folder();
    let unet = dir.join("unet");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(unet.join("diffusion_pytorch_model.bin"), b"\x80\x02.").unwrap();
    assert!(matches!(open_err(&dir), EngineError::PickleRefused { .. }));
}

#[test]
fn unknown_architecture_is_named() {
    let path = edited_single_file(|tensors| {
        tensors.retain(|name, _| !name.starts_with("model.diffusion_model."));
    });
    assert!(matches!(
        open_err(&path),
        EngineError::UnknownArchitecture { .. }
    ));
}

#[test]
fn sdxl_is_recognised_but_unsupported() {
    let path = edited_single_file(|tensors| {
        let (dtype, shape, data) = tensors["model.diffusion_model.out.2.bias"].clone();
        tensors.insert(
            "model.diffusion_model.label_emb.0.0.weight".into(),
            (dtype, shape, data),
        );
    });
    let error = open_err(&path);
    assert!(
        matches!(error, EngineError::UnsupportedFamily { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("XL"), "{error}");
}

fn copy_of_sd1_folder() -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = scratch().join("sd1");
    copy(&model("sd1"), &dir);
    dir
}

#[test]
fn folder_missing_a_component_says_which() {
    let dir = copy_of_sd1_folder();
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let error = open_err(&dir);
    assert!(
        matches!(&error, EngineError::MissingComponent { component, .. } if component.contains("vae")),
        "{error}"
    );
    let bare = scratch();
    assert!(matches!(
        open_err(&bare),
        EngineError::MissingComponent { .. }
    ));
}

#[test]
fn mis_shaped_tensor_is_named() {
    let path = edited_single_file(|tensors| {
        let entry = tensors.get_mut("model.diffusion_model.out.2.bias").unwrap();
        entry.1 = vec![3];
        entry.2.truncate(3 * 2);
    });
    let checkpoint = Checkpoint::open(&path).unwrap();
    let error = checkpoint.load_unet(&Device::flex()).unwrap_err();
    assert!(
        matches!(error, EngineError::WeightMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("conv_out.bias"), "{error}");
}

#[test]
fn missing_tensor_is_named() {
    let path = edited_single_file(|tensors| {
        tensors.remove("model.diffusion_model.out.2.weight");
    });
    let error = Checkpoint::open(&path)
        .unwrap()
        .load_unet(&Device::flex())
        .unwrap_err();
    assert!(
        error.to_string().contains("missing") && error.to_string().contains("conv_out.weight"),
        "{error}"
    );
}

#[test]
fn stray_tensor_in_a_single_file_is_named() {
    let path = edited_single_file(|tensors| {
        let value = tensors["model.diffusion_model.out.2.bias"].clone();
        tensors.insert("model.diffusion_model.mystery.weight".into(), value);
    });
    let error = open_err(&path);
    assert!(
        error
            .to_string()
            .contains("model.diffusion_model.mystery.weight"),
        "{error}"
    );
}

#[test]
fn stray_tensor_in_a_folder_component_is_named() {
    let dir = copy_of_sd1_folder();
    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<_> = file.tensors();
    let extra = views[0].1.clone();
    views.push(("decoder.extra.weight".into(), extra));
    safetensors::serialize_to_file(views, None, &vae).unwrap();
    let error = Checkpoint::open(&dir)
        .unwrap()
        .load_vae(&Device::flex())
        .unwrap_err();
    assert!(
        error.to_string().contains("unexpected")
            && error.to_string().contains("decoder.extra.weight"),
        "{error}"
    );
}

#[test]
fn safetensors_whose_length_looks_like_a_pickle_is_not_refused() {
    // A header of 0x0280 bytes makes the file start 0x80 0x02, a pickle's first two bytes.
    let mut header =
        br#"{"other.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
    header.resize(0x0280, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    assert_eq!(bytes[..2], [0x80, 0x02]);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0u8; 4]);
    let path = scratch().join("lookalike.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let error = open_err(&path);
    assert!(
        matches!(error, EngineError::UnknownArchitecture { .. }),
        "{error}"
    );
}

#[test]
fn standalone_vae_folder_refuses_pickles_and_foreign_weights() {
    let dir = scratch().join("vae");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        model("vae-wide").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"\x80\x02.").unwrap();
    let error = studio_engine::load_vae(&dir, &Device::flex()).unwrap_err();
    assert!(
        matches!(error, EngineError::PickleRefused { .. }),
        "{error}"
    );

    // The narrow fixture VAE's weights under the wide one's config: every conv is the wrong shape.
    std::fs::copy(
        model("sd1")
            .join("vae")
            .join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let error = studio_engine::load_vae(&dir, &Device::flex()).unwrap_err();
    assert!(
        matches!(error, EngineError::WeightMismatch { .. }),
        "{error}"
    );
}
