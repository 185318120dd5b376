//! Opening a Stable Diffusion checkpoint as artists have them: a diffusers folder
//! (`model_index.json` with one subfolder per component) or one single-file `.safetensors`
//! (LDM names). Opening reads headers only; each component is then built from its config (read
//! from `config.json`, or inferred from tensor shapes and family constants for single files) and
//! loaded strictly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::store::ModuleSnapshot;
use burn::tensor::{Device, FloatDType};
use serde::de::DeserializeOwned;

use crate::error::{EngineError, Result};
use crate::family::{Detection, Layout, ModelFamily, PredictionType, detect};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::taesd::{Taesd, TaesdConfig};
use crate::models::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::sampling::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::weights::index::WeightFile;
use crate::weights::load::{WeightSlice, load_into};
use crate::weights::remap::{Component, Mapped, SingleFileNames, Transform, module_path};

/// A checkpoint whose headers have been read and whose family is known.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    family: ModelFamily,
    source: Source,
    /// The format the models are loaded in (f32 unless [`Checkpoint::with_precision`] says).
    precision: FloatDType,
}

#[derive(Debug)]
enum Source {
    Folder,
    SingleFile {
        file: Arc<WeightFile>,
        names: SingleFileNames,
    },
}

/// Every model of a checkpoint, ready to run.
#[derive(Debug)]
pub struct StableDiffusion {
    pub family: ModelFamily,
    /// Where the models' weights live and run.
    pub device: Device,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// Final text-encoder layers to leave out (see `ClipTextModel::forward`).
    pub clip_skip: usize,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNetConfig,
    pub vae: AutoencoderKl,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
}

const WEIGHT_FILES: &[&str] = &["diffusion_pytorch_model.safetensors", "model.safetensors"];
const PICKLE_FILES: &[&str] = &["diffusion_pytorch_model.bin", "pytorch_model.bin"];

impl Checkpoint {
    /// Reads the headers at `path` (a folder or a `.safetensors` file) and detects the family.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_folder(path)
        } else if path.is_file() {
            Self::open_file(path)
        } else {
            Err(EngineError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    fn open_folder(path: &Path) -> Result<Self> {
        let index_path = path.join("model_index.json");
        if !index_path.is_file() {
            return Err(EngineError::MissingComponent {
                path: path.to_path_buf(),
                component: "model_index.json".into(),
            });
        }
        let index: serde_json::Value = read_json(&index_path)?;
        let class = index["_class_name"].as_str().unwrap_or_default();
        if class.contains("XL") {
            return Err(EngineError::UnsupportedFamily {
                path: path.to_path_buf(),
                family: "Stable Diffusion XL".into(),
            });
        }
        for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !path.join(component).is_dir() {
                return Err(EngineError::MissingComponent {
                    path: path.to_path_buf(),
                    component: format!("{component}/"),
                });
            }
        }
        let unet = component_file(path, Component::Unet.name())?;
        let family = match detect(
            unet.tensors()
                .iter()
                .map(|(k, v)| (k.as_str(), v.shape.as_slice())),
            Layout::DiffusersUnet,
        ) {
            Detection::Supported(family) => family,
            other => return Err(detection_error(path, other)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            family,
            source: Source::Folder,
            precision: FloatDType::F32,
        })
    }

    fn open_file(path: &Path) -> Result<Self> {
        let file = WeightFile::open(path)?;
        let family = match detect(
            file.tensors()
                .iter()
                .map(|(k, v)| (k.as_str(), v.shape.as_slice())),
            Layout::SingleFile,
        ) {
            Detection::Supported(family) => family,
            other => return Err(detection_error(path, other)),
        };
        let names = SingleFileNames::new(file.tensors(), family.single_file_clip_layers_skipped());
        let unknown: Vec<&str> = file
            .tensors()
            .iter()
            .filter(|(name, info)| names.map(name, &info.shape) == Mapped::Unknown)
            .map(|(name, _)| name.as_str())
            .collect();
        if !unknown.is_empty() {
            return Err(EngineError::WeightMismatch {
                path: path.to_path_buf(),
                details: format!(
                    "{} tensors belong to no Stable Diffusion component, e.g. '{}'",
                    unknown.len(),
                    unknown[0]
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            family,
            source: Source::SingleFile { file, names },
            precision: FloatDType::F32,
        })
    }

    /// Loads the models in `precision` instead: f16 halves their memory on a GPU that computes in
    /// it ([`crate::device::ComputeDevice::precision`]). The models take and return f32 tensors
    /// either way.
    pub fn with_precision(mut self, precision: FloatDType) -> Self {
        self.precision = precision;
        self
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors of `component` under our module paths.
    fn weights(&self, component: Component) -> Result<Vec<WeightSlice>> {
        match &self.source {
            Source::Folder => Ok(folder_weights(
                &component_file(&self.path, component.name())?,
                component,
            )),
            Source::SingleFile { file, names } => {
                let mut slices = Vec::new();
                for (name, info) in file.tensors() {
                    let Mapped::Load(targets) = names.map(name, &info.shape) else {
                        continue;
                    };
                    for target in targets.into_iter().filter(|t| t.component == component) {
                        let Some(path) = module_path(component, &target.key) else {
                            continue;
                        };
                        let slice =
                            WeightSlice::whole(file, name, path.clone()).expect("listed tensor");
                        slices.push(match target.transform {
                            Transform::AsIs => slice,
                            Transform::ConvToLinear => {
                                let shape = slice.shape[..2].to_vec();
                                slice.reshaped(shape)
                            }
                            Transform::QkvPart(part) => {
                                let rows = slice.shape[0] / 3;
                                slice.rows(part * rows..(part + 1) * rows, path)
                            }
                        });
                    }
                }
                if slices.is_empty() {
                    return Err(EngineError::MissingComponent {
                        path: self.path.clone(),
                        component: format!("the {} weights", component.name()),
                    });
                }
                Ok(slices)
            }
        }
    }

    /// Shapes of `component`'s tensors under our module paths, for inferring a single file's config.
    fn shapes(&self, component: Component) -> Result<Shapes> {
        Ok(Shapes(
            self.weights(component)?
                .into_iter()
                .map(|w| (w.name, w.shape))
                .collect(),
        ))
    }

    fn config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        read_json(&self.path.join(component).join("config.json"))
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        let config = match &self.source {
            Source::Folder => self.config("unet")?,
            Source::SingleFile { .. } => self.shapes(Component::Unet)?.unet(self.family),
        };
        config
            .validate()
            .map_err(|e| EngineError::config(&self.path, e))?;
        Ok(config)
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        let config = match &self.source {
            Source::Folder => self.config("vae")?,
            Source::SingleFile { .. } => self.shapes(Component::Vae)?.vae(self.family),
        };
        config
            .validate()
            .map_err(|e| EngineError::config(&self.path, e))?;
        Ok(config)
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        match &self.source {
            Source::Folder => self.config("text_encoder"),
            Source::SingleFile { .. } => Ok(self.shapes(Component::TextEncoder)?.clip(self.family)),
        }
    }

    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        match &self.source {
            Source::Folder => read_json(&self.path.join("scheduler").join("scheduler_config.json")),
            Source::SingleFile { file, .. } => {
                let prediction_type = match file
                    .metadata()
                    .get("modelspec.prediction_type")
                    .map(String::as_str)
                {
                    Some("v" | "v_prediction") => PredictionType::VPrediction,
                    Some("epsilon") => PredictionType::Epsilon,
                    _ => self.family.default_prediction(),
                };
                Ok(SchedulerConfig {
                    prediction_type,
                    ..SchedulerConfig::default()
                })
            }
        }
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        match &self.source {
            Source::Folder => {
                ClipTokenizer::from_folder(&self.path.join("tokenizer"), &self.family.pad_token())
            }
            Source::SingleFile { .. } => ClipTokenizer::builtin(&self.family.pad_token()),
        }
    }

    fn load<M: ModuleSnapshot>(&self, mut module: M, component: Component) -> Result<M> {
        load_into(
            &mut module,
            self.weights(component)?,
            &self.path,
            self.precision,
        )?;
        Ok(module)
    }

    pub fn load_unet(&self, device: &Device) -> Result<UNet2DConditionModel> {
        self.load(self.unet_config()?.init(device), Component::Unet)
    }

    pub fn load_vae(&self, device: &Device) -> Result<AutoencoderKl> {
        self.load(self.vae_config()?.init(device), Component::Vae)
    }

    /// The text encoder and how many of its final layers to skip.
    pub fn load_text_encoder(&self, device: &Device) -> Result<(ClipTextModel, usize)> {
        let model = self.load(
            self.text_encoder_config()?.init(device),
            Component::TextEncoder,
        )?;
        // Single files have already dropped the layers SD does not use (see `remap.rs`); diffusers
        // folders are saved that way.
        Ok((model, 0))
    }

    /// Builds and loads every model.
    pub fn load_all(&self, device: &Device) -> Result<StableDiffusion> {
        let unet_config = self.unet_config()?;
        let vae_config = self.vae_config()?;
        let text_config = self.text_encoder_config()?;
        if unet_config.context_dim() != Some(text_config.hidden_size) {
            return Err(EngineError::config(
                &self.path,
                format!(
                    "the UNet attends to {:?}-wide text embeddings but the text encoder makes {}-wide ones",
                    unet_config.context_dim(),
                    text_config.hidden_size
                ),
            ));
        }
        let (text_encoder, clip_skip) = self.load_text_encoder(device)?;
        Ok(StableDiffusion {
            family: self.family,
            device: device.clone(),
            tokenizer: self.tokenizer()?,
            text_encoder,
            clip_skip,
            unet: self.load(unet_config.init(device), Component::Unet)?,
            unet_config,
            vae: self.load(vae_config.init(device), Component::Vae)?,
            vae_config,
            scheduler: self.scheduler_config()?,
        })
    }
}

/// The tensors of a diffusers component file under our module paths.
fn folder_weights(file: &Arc<WeightFile>, component: Component) -> Vec<WeightSlice> {
    file.tensors()
        .keys()
        .filter_map(|key| {
            let path = module_path(component, key)?;
            WeightSlice::whole(file, key, path)
        })
        .collect()
}

/// Loads a VAE published on its own as a diffusers folder (`config.json` and its weights), the
/// form replacement VAEs such as `sd-vae-ft-mse` come in.
pub fn load_vae(path: &Path, device: &Device) -> Result<AutoencoderKl> {
    let config: VaeConfig = read_json(&path.join("config.json"))?;
    config
        .validate()
        .map_err(|e| EngineError::config(path, e))?;
    let file = component_file(path.parent().unwrap_or(path), &file_name(path))?;
    let mut model = config.init(device);
    load_into(
        &mut model,
        folder_weights(&file, Component::Vae),
        path,
        FloatDType::F32,
    )?;
    Ok(model)
}

/// Loads a TAESD (`AutoencoderTiny`): a diffusers folder with `config.json`, or a lone
/// `.safetensors` of the standard TAESD layout, with its weights in `precision` (the device's,
/// [`crate::device::ComputeDevice::precision`]).
pub fn load_taesd(path: &Path, device: &Device, precision: FloatDType) -> Result<Taesd> {
    let (config, file): (TaesdConfig, _) = if path.is_dir() {
        (
            read_json(&path.join("config.json"))?,
            component_file(path.parent().unwrap_or(path), &file_name(path))?,
        )
    } else {
        (TaesdConfig::default(), WeightFile::open(path)?)
    };
    config
        .validate()
        .map_err(|e| EngineError::config(path, e))?;
    let weights = file
        .tensors()
        .keys()
        .filter_map(|key| WeightSlice::whole(&file, key, key.clone()))
        .collect();
    let mut model = config.init(device);
    load_into(&mut model, weights, path, precision)?;
    Ok(model)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The weights of a folder's `component/` subfolder.
fn component_file(folder: &Path, component: &str) -> Result<Arc<WeightFile>> {
    let dir = folder.join(component);
    for name in WEIGHT_FILES {
        let path = dir.join(name);
        if path.is_file() {
            return WeightFile::open(&path);
        }
    }
    // Half-precision "variant" files (`*.fp16.safetensors`) when they are the only weights there.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut variants: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        variants.sort();
        if let Some(path) = variants.first() {
            return WeightFile::open(path);
        }
    }
    for name in PICKLE_FILES {
        let path = dir.join(name);
        if path.is_file() {
            return Err(EngineError::PickleRefused { path });
        }
    }
    Err(EngineError::MissingComponent {
        path: folder.to_path_buf(),
        component: format!("{component}/ weights (.safetensors)"),
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::config(path, e))
}

fn detection_error(path: &Path, detection: Detection) -> EngineError {
    match detection {
        Detection::Unsupported(family) => EngineError::UnsupportedFamily {
            path: path.to_path_buf(),
            family: family.into(),
        },
        Detection::Unknown(reason) => EngineError::UnknownArchitecture {
            path: path.to_path_buf(),
            reason,
        },
        Detection::Supported(_) => unreachable!("not an error"),
    }
}

/// Tensor shapes by module path, for inferring the config of a single-file checkpoint.
struct Shapes(BTreeMap<String, Vec<usize>>);

impl Shapes {
    fn dim(&self, key: &str, axis: usize) -> usize {
        self.0
            .get(key)
            .and_then(|s| s.get(axis))
            .copied()
            .unwrap_or(0)
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// How many distinct `N` follow `prefix` in `prefix.N.…`.
    fn count(&self, prefix: &str) -> usize {
        self.0
            .keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .collect::<BTreeSet<_>>()
            .len()
    }

    fn unet(&self, family: ModelFamily) -> UNetConfig {
        let levels = self.count("down_blocks.");
        let channels: Vec<usize> = (0..levels)
            .map(|i| self.dim(&format!("down_blocks.{i}.resnets.0.conv2.weight"), 0))
            .collect();
        let down_attention: Vec<bool> = (0..levels)
            .map(|i| self.has(&format!("down_blocks.{i}.attentions.0.norm.weight")))
            .collect();
        let up_attention: Vec<bool> = (0..levels)
            .map(|i| self.has(&format!("up_blocks.{i}.attentions.0.norm.weight")))
            .collect();
        let transformer_layers = (0..levels)
            .map(|i| {
                let prefix = if down_attention[i] {
                    format!("down_blocks.{i}.attentions.0.transformer_blocks.")
                } else {
                    "mid_block.attentions.0.transformer_blocks.".into()
                };
                self.count(&prefix).max(1)
            })
            .collect();
        let cross_attention_dim = self
            .0
            .iter()
            .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
            .map_or(0, |(_, shape)| shape[1]);
        let projection_rank = self
            .0
            .iter()
            .find(|(k, _)| k.ends_with("proj_in.weight"))
            .map_or(0, |(_, shape)| shape.len());
        UNetConfig {
            in_channels: self.dim("conv_in.weight", 1),
            out_channels: self.dim("conv_out.weight", 0),
            down_block_types: down_attention
                .iter()
                .map(|&a| {
                    if a {
                        "CrossAttnDownBlock2D"
                    } else {
                        "DownBlock2D"
                    }
                    .to_owned()
                })
                .collect(),
            up_block_types: up_attention
                .iter()
                .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_owned())
                .collect(),
            layers_per_block: self.count("down_blocks.0.resnets."),
            cross_attention_dim: PerBlock::All(cross_attention_dim),
            attention_head_dim: PerBlock::Each(
                channels.iter().map(|&c| family.unet_heads(c)).collect(),
            ),
            transformer_layers_per_block: PerBlock::Each(transformer_layers),
            use_linear_projection: projection_rank == 2,
            block_out_channels: channels,
            sample_size: family.native_size() / 8,
            ..UNetConfig::default()
        }
    }

    fn vae(&self, family: ModelFamily) -> VaeConfig {
        let levels = self.count("encoder.down_blocks.");
        VaeConfig {
            in_channels: self.dim("encoder.conv_in.weight", 1),
            out_channels: self.dim("decoder.conv_out.weight", 0),
            block_out_channels: (0..levels)
                .map(|i| {
                    self.dim(
                        &format!("encoder.down_blocks.{i}.resnets.0.conv2.weight"),
                        0,
                    )
                })
                .collect(),
            layers_per_block: self.count("encoder.down_blocks.0.resnets."),
            latent_channels: self.dim("decoder.conv_in.weight", 1),
            scaling_factor: family.vae_scaling_factor(),
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            ..VaeConfig::default()
        }
    }

    fn clip(&self, family: ModelFamily) -> ClipTextConfig {
        let hidden = self.dim("embeddings.token_embedding.weight", 1);
        ClipTextConfig {
            vocab_size: self.dim("embeddings.token_embedding.weight", 0),
            hidden_size: hidden,
            intermediate_size: self.dim("encoder.layers.0.mlp.fc1.weight", 0),
            num_hidden_layers: self.count("encoder.layers."),
            num_attention_heads: family.clip_heads(hidden).max(1),
            max_position_embeddings: self.dim("embeddings.position_embedding.weight", 0),
            hidden_act: family.clip_activation(),
            layer_norm_eps: 1e-5,
        }
    }
}
