//! Benchmark workloads at Stable Diffusion 1.5's real sizes, with random weights (no weight file
//! can be downloaded): UNet 859.5 M parameters, VAE 83.7 M, CLIP-L text encoder 123.1 M, TAESD
//! 2.45 M. The random model is written to disk as a diffusers folder first, so loading is measured
//! from a real-layout safetensors checkpoint. Everything returns plain numbers; `studio bench` prints
//! them and `tools/reference/bench_torch.py` measures the same things through diffusers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, StableDiffusion};
use crate::error::{EngineError, Result};
use crate::models::clip::{ClipActivation, ClipTextConfig};
use crate::models::cpu_gemm::{self, Matrix};
use crate::models::cpu_pool;
use crate::models::taesd::TaesdConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::pipeline::{CancelToken, Pipeline};
use crate::request::{GenerationRequest, Sampler};
use crate::sampling::SchedulerConfig;

/// CLIP ViT-L/14's text tower, as SD1.x uses it.
pub fn clip_l() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        max_position_embeddings: 77,
        hidden_act: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

/// The measurements, by name: seconds unless the name says otherwise.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub backend: String,
    pub device: String,
    pub threads: usize,
    pub results: BTreeMap<String, f64>,
}

impl Report {
    fn record(&mut self, name: &str, value: f64) {
        self.results.insert(name.to_owned(), value);
    }
}

/// Seconds taken by `f`, after which the device has finished its work.
fn time<T>(device: &Device, f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let out = f();
    let _ = device.sync();
    (start.elapsed().as_secs_f64(), out)
}

/// The machine's matrix-multiply rate on `device`: the best of three `n`×`n` products, in GFLOP/s.
/// On the CPU that is the engine's own product ([`cpu_gemm::product`]), which the models' layers
/// call, run inside a pass as theirs are: Burn's `matmul` reached two thirds of its rate on a
/// 2048² product (221 against 337 GFLOP/s on two AVX-512 cores), so measured through Burn the
/// machine would seem slower than the steps show.
pub fn matmul_gflops(device: &Device, n: usize) -> f64 {
    let seconds = if *device == Device::flex() {
        let values: Vec<f32> = (0..n * n)
            .map(|i| (i * 7919 % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        let matrix = Matrix::new(&values, n, n, n);
        let product = || cpu_pool::awake(device, || cpu_gemm::product(matrix, matrix, 1.0, true));
        let _ = product();
        (0..3)
            .map(|_| time(device, product).0)
            .fold(f64::INFINITY, f64::min)
    } else {
        let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
        let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
        let _ = a.clone().matmul(b.clone()).into_data();
        (0..3)
            .map(|_| time(device, || a.clone().matmul(b.clone()).into_data()).0)
            .fold(f64::INFINITY, f64::min)
    };
    2.0 * (n * n * n) as f64 / seconds / 1e9
}

/// The process's peak resident memory in bytes, and a way to reset it (Linux).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::config(path, e))?;
    std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
}

fn save(module: &impl ModuleSnapshot, path: &Path, unet_names: bool) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .overwrite(true);
    if unet_names {
        // The inverse of `remap::module_path`'s feed-forward renaming.
        store = store
            .with_key_remapping(r"\.ff\.geglu\.proj\.", ".ff.net.0.proj.")
            .with_key_remapping(r"\.ff\.out\.", ".ff.net.2.");
    }
    module
        .save_into(&mut store)
        .map_err(|e| EngineError::Backend(format!("writing {}: {e}", path.display())))?;
    // On disk before anything is timed: the kernel writing gigabytes of dirty pages back in the
    // background took a core from the first measurements (text encoding and the 256² step ran
    // 1.5× longer than with the checkpoint already written).
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| EngineError::io(path, e))
}

/// Builds SD1.5-sized models with random weights and writes them to `dir` as a diffusers folder.
/// Returns the bytes of weights written.
pub fn write_random_checkpoint(dir: &Path, device: &Device) -> Result<u64> {
    let unet_config = UNetConfig::default();
    let vae_config = VaeConfig::default();
    let clip_config = clip_l();
    let mut bytes = 0;
    for (name, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("tokenizer", ""),
        ("scheduler", ""),
    ] {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).map_err(|e| EngineError::io(&folder, e))?;
        let path = folder.join(file);
        match name {
            "unet" => {
                let model = unet_config.init(device);
                bytes += model.num_params() as u64 * 4;
                save(&model, &path, true)?;
                write_json(&folder.join("config.json"), &unet_config)?;
            }
            "vae" => {
                let model = vae_config.init(device);
                bytes += model.num_params() as u64 * 4;
                save(&model, &path, false)?;
                write_json(&folder.join("config.json"), &vae_config)?;
            }
            "text_encoder" => {
                let model = clip_config.init(device);
                bytes += model.num_params() as u64 * 4;
                save(&model, &path, false)?;
                write_json(&folder.join("config.json"), &clip_config)?;
            }
            "tokenizer" => {
                let path = folder.join("tokenizer.json");
                std::fs::write(&path, crate::tokenizer::DEFAULT_TOKENIZER)
                    .map_err(|e| EngineError::io(&path, e))?;
            }
            _ => write_json(
                &folder.join("scheduler_config.json"),
                &SchedulerConfig {
                    timestep_spacing: Some("leading".into()),
                    ..SchedulerConfig::default()
                },
            )?,
        }
    }
    write_json(
        &dir.join("model_index.json"),
        &serde_json::json!({"_class_name": "StableDiffusionPipeline"}),
    )?;
    Ok(bytes)
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Largest image side for the UNet, VAE and TAESD measurements (512 for the full benchmark).
    pub size: usize,
    /// Where the random checkpoint is written.
    pub scratch: std::path::PathBuf,
    /// Measure this checkpoint instead of a random SD1.5-sized one (e.g. a tiny model on a slow
    /// backend).
    pub model: Option<std::path::PathBuf>,
    /// Hands the memory the allocator keeps for reuse back to the system. Called before each
    /// peak-memory measurement, so that what earlier measurements freed (writing the random
    /// checkpoint frees 4.3 GB) is not counted as the load's or the generation's.
    pub release_freed_memory: fn(),
    /// The format the models are loaded in ([`crate::device::ComputeDevice::precision`]).
    pub precision: FloatDType,
}

/// Runs every measurement on `device`, reporting progress in words.
pub fn run(
    device: &Device,
    config: &BenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<(Report, StableDiffusion)> {
    let mut report = Report::default();
    progress("matrix-multiply rate");
    report.record("matmul_gflops", matmul_gflops(device, 2048));

    let folder = match &config.model {
        Some(model) => model.clone(),
        None => {
            progress("writing an SD1.5-sized random checkpoint");
            let folder = config.scratch.join("sd15-random");
            write_random_checkpoint(&folder, device)?;
            folder
        }
    };

    progress("loading it");
    (config.release_freed_memory)();
    reset_peak_rss();
    let (seconds, models) = time(device, || {
        Checkpoint::open(&folder)?
            .with_precision(config.precision)
            .load_all(device)
    });
    let models = models?;
    let weights =
        models.text_encoder.num_params() + models.unet.num_params() + models.vae.num_params();
    let bytes_per_weight = if config.precision == FloatDType::F16 {
        2.0
    } else {
        4.0
    };
    report.record("weights_bytes", weights as f64 * bytes_per_weight);
    report.record("load_seconds", seconds);
    report.record("load_peak_rss_bytes", peak_rss().unwrap_or(0) as f64);
    let pipeline = Pipeline {
        models: &models,
        taesd: None,
    };

    progress("text encoder");
    let (first, _) = time(device, || {
        pipeline.conditioning("a photograph of an astronaut riding a horse", Some(""))
    });
    let (steady, _) = time(device, || {
        pipeline.conditioning("a photograph of an astronaut riding a horse", Some(""))
    });
    report.record("text_encode_first", first);
    report.record("text_encode", steady);
    let context = pipeline.conditioning("a photograph of an astronaut riding a horse", Some(""))?;

    let sides = if config.size >= 512 {
        vec![256, config.size]
    } else {
        vec![config.size]
    };
    let mut step_seconds = BTreeMap::new();
    // Steps share their working memory, as a generation's do.
    let memory = cpu_pool::keep_working_memory();
    for &side in &sides {
        progress(&format!("UNet step with CFG at {side}²"));
        // One latent for the [uncond, cond] contexts, as the pipeline steps with guidance.
        let latents = Tensor::<4>::random(
            [1, 4, side / 8, side / 8],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let step = || {
            models
                .unet
                .forward(latents.clone(), &[500.0], context.clone())
                .into_data()
        };
        let (first, _) = time(device, step);
        let (steady, _) = time(device, step);
        report.record(&format!("unet_step_{side}_first"), first);
        report.record(&format!("unet_step_{side}"), steady);
        let flops = 2.0
            * models
                .unet_config
                .flops(side / 8, side / 8, context.dims()[1]);
        report.record(&format!("unet_step_{side}_gflops"), flops / steady / 1e9);
        step_seconds.insert(side, steady);
    }
    drop(memory);
    let side = *sides.last().expect("at least 256");
    let latent = Tensor::<4>::random(
        [1, 4, side / 8, side / 8],
        Distribution::Normal(0.0, 1.0),
        device,
    );

    progress(&format!("VAE decode at {side}²"));
    let decode = || models.vae.decode(latent.clone()).into_data();
    let _ = time(device, decode);
    report.record(&format!("vae_decode_{side}"), time(device, decode).0);

    progress(&format!("TAESD decode at {side}²"));
    // Written and read back like a TAESD file, so it is held in the models' format.
    let taesd_file = config.scratch.join("taesd-random.safetensors");
    save(&TaesdConfig::default().init(device), &taesd_file, false)?;
    let taesd = crate::checkpoint::load_taesd(&taesd_file, device, config.precision)?;
    let decode = || taesd.decode(latent.clone()).into_data();
    let _ = time(device, decode);
    report.record(&format!("taesd_decode_{side}"), time(device, decode).0);

    progress("preview projection");
    let factors = models.family.latent_rgb_factors();
    let _ = crate::preview::project(&latent, &factors);
    report.record(
        &format!("preview_projection_{side}"),
        time(device, || crate::preview::project(&latent, &factors)).0,
    );

    let small = sides[0] as u32;
    progress(&format!("a full 4-step generation at {small}²"));
    let request = GenerationRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        width: small,
        height: small,
        steps: 4,
        sampler: Sampler::Euler,
        ..GenerationRequest::default()
    };
    let (seconds, outcome) = time(device, || {
        pipeline.generate(&request, &CancelToken::new(), &mut |_| {})
    });
    outcome?;
    report.record(&format!("generate_{small}_4_steps"), seconds);

    progress(&format!("peak memory of a {side}² generation"));
    (config.release_freed_memory)();
    reset_peak_rss();
    let request = GenerationRequest {
        width: side as u32,
        height: side as u32,
        steps: 1,
        ..request
    };
    let (seconds, outcome) = time(device, || {
        pipeline.generate(&request, &CancelToken::new(), &mut |_| {})
    });
    outcome?;
    report.record(&format!("generate_{side}_1_step"), seconds);
    if let Some(peak) = peak_rss() {
        report.record(&format!("generate_{side}_peak_rss_bytes"), peak as f64);
    }
    Ok((report, models))
}
