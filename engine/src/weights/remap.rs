//! Tensor names: single-file (LDM/CompVis) checkpoints to diffusers names, and diffusers names to
//! our module paths. The LDM rules are the inverse of how the original training code laid out its
//! modules (facts also documented by diffusers' `single_file_utils.py`); every divergence of our
//! module tree from diffusers' names is in [`module_path`].

use std::collections::BTreeMap;

use super::index::TensorInfo;

/// The models a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
        }
    }
}

/// How a stored tensor becomes the one our module takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    AsIs,
    /// A 1×1 convolution kernel `[out, in, 1, 1]` used as a linear weight `[out, in]`.
    ConvToLinear,
    /// Rows `part·n..(part+1)·n` of a fused q/k/v projection (`part`: 0 = q, 1 = k, 2 = v).
    QkvPart(usize),
}

/// One destination of a single-file tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub component: Component,
    /// The diffusers name.
    pub key: String,
    pub transform: Transform,
}

/// What becomes of a single-file tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    Load(Vec<Target>),
    /// Known to be unused for inference.
    Ignore,
    /// Not part of any Stable Diffusion checkpoint we know: the load fails naming it.
    Unknown,
}

/// Training-time buffers of the original LDM code, stored beside the weights in most single-file
/// checkpoints; the schedule comes from the family instead.
const LDM_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
];

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";

/// The shape facts a single file's names depend on.
#[derive(Debug, Clone)]
pub struct SingleFileNames {
    /// Input blocks per UNet level: `layers_per_block` resnets plus the downsampler.
    unet_blocks_per_level: usize,
    /// Decoder levels (LDM numbers them bottom-up, diffusers top-down).
    vae_levels: usize,
    /// OpenCLIP resblocks loaded (the last ones are skipped, see
    /// `ModelFamily::single_file_clip_layers_skipped`).
    open_clip_layers: usize,
}

impl SingleFileNames {
    pub fn new(tensors: &BTreeMap<String, TensorInfo>, open_clip_layers_skipped: usize) -> Self {
        let indices = |prefix: &str| -> Vec<usize> {
            tensors
                .keys()
                .filter_map(|k| k.strip_prefix(prefix))
                .filter_map(|rest| rest.split('.').next()?.parse().ok())
                .collect()
        };
        let input_blocks = indices(&format!("{UNET}input_blocks."));
        let first_downsampler = tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{UNET}input_blocks.")))
            .filter_map(|rest| rest.strip_suffix(".0.op.weight")?.parse::<usize>().ok())
            .min();
        let unet_blocks_per_level =
            first_downsampler.unwrap_or_else(|| input_blocks.iter().max().map_or(1, |m| m + 1));
        let vae_levels = indices(&format!("{VAE}decoder.up."))
            .into_iter()
            .max()
            .map_or(0, |m| m + 1);
        let resblocks = indices(&format!("{OPEN_CLIP}transformer.resblocks."))
            .into_iter()
            .max()
            .map_or(0, |m| m + 1);
        Self {
            unet_blocks_per_level: unet_blocks_per_level.max(1),
            vae_levels,
            open_clip_layers: resblocks.saturating_sub(open_clip_layers_skipped),
        }
    }

    /// Where the single-file tensor `name` of shape `shape` goes.
    pub fn map(&self, name: &str, shape: &[usize]) -> Mapped {
        let target = |component, key: String, transform| {
            Mapped::Load(vec![Target {
                component,
                key,
                transform,
            }])
        };
        if LDM_BUFFERS.contains(&name) || name.starts_with("model_ema.") {
            return Mapped::Ignore;
        }
        if let Some(rest) = name.strip_prefix(UNET) {
            return match self.unet(rest) {
                Some(key) => target(Component::Unet, key, Transform::AsIs),
                None => Mapped::Unknown,
            };
        }
        if let Some(rest) = name.strip_prefix(VAE) {
            return match self.vae(rest) {
                Some(key) => {
                    let transform = if key.contains(".attentions.") && shape.len() > 2 {
                        Transform::ConvToLinear
                    } else {
                        Transform::AsIs
                    };
                    target(Component::Vae, key, transform)
                }
                None => Mapped::Unknown,
            };
        }
        if let Some(rest) = name.strip_prefix(CLIP) {
            // Already transformers' names, with or without the `text_model.` level.
            return target(Component::TextEncoder, rest.to_owned(), Transform::AsIs);
        }
        if let Some(rest) = name.strip_prefix(OPEN_CLIP) {
            return self.open_clip(rest);
        }
        Mapped::Unknown
    }

    fn unet(&self, rest: &str) -> Option<String> {
        let per = self.unet_blocks_per_level;
        let parts: Vec<&str> = rest.split('.').collect();
        let tail = |from: usize| parts[from..].join(".");
        Some(match parts.as_slice() {
            ["time_embed", "0", ..] => format!("time_embedding.linear_1.{}", tail(2)),
            ["time_embed", "2", ..] => format!("time_embedding.linear_2.{}", tail(2)),
            ["input_blocks", "0", "0", ..] => format!("conv_in.{}", tail(3)),
            ["input_blocks", n, "0", "op", ..] => {
                let n: usize = n.parse().ok()?;
                format!(
                    "down_blocks.{}.downsamplers.0.conv.{}",
                    n / per - 1,
                    tail(4)
                )
            }
            ["input_blocks", n, slot, ..] => {
                let n: usize = n.parse::<usize>().ok()?.checked_sub(1)?;
                let (level, layer) = (n / per, n % per);
                match *slot {
                    "0" => format!("down_blocks.{level}.resnets.{layer}.{}", resnet(&tail(3))),
                    "1" => format!("down_blocks.{level}.attentions.{layer}.{}", tail(3)),
                    _ => return None,
                }
            }
            ["middle_block", "0", ..] => format!("mid_block.resnets.0.{}", resnet(&tail(2))),
            ["middle_block", "1", ..] => format!("mid_block.attentions.0.{}", tail(2)),
            ["middle_block", "2", ..] => format!("mid_block.resnets.1.{}", resnet(&tail(2))),
            ["output_blocks", n, slot, rest @ ..] => {
                let n: usize = n.parse().ok()?;
                let (level, layer) = (n / per, n % per);
                match (*slot, rest.first()) {
                    ("1" | "2", Some(&"conv")) => {
                        format!("up_blocks.{level}.upsamplers.0.{}", tail(3))
                    }
                    ("0", _) => format!("up_blocks.{level}.resnets.{layer}.{}", resnet(&tail(3))),
                    ("1", _) => format!("up_blocks.{level}.attentions.{layer}.{}", tail(3)),
                    _ => return None,
                }
            }
            ["out", "0", ..] => format!("conv_norm_out.{}", tail(2)),
            ["out", "2", ..] => format!("conv_out.{}", tail(2)),
            _ => return None,
        })
    }

    fn vae(&self, rest: &str) -> Option<String> {
        let parts: Vec<&str> = rest.split('.').collect();
        let tail = |from: usize| {
            parts[from..]
                .join(".")
                .replace("nin_shortcut", "conv_shortcut")
        };
        Some(match parts.as_slice() {
            [side @ ("encoder" | "decoder"), "conv_in" | "conv_out", ..] => {
                format!("{side}.{}", tail(1))
            }
            [side @ ("encoder" | "decoder"), "norm_out", ..] => {
                format!("{side}.conv_norm_out.{}", tail(2))
            }
            ["quant_conv" | "post_quant_conv", ..] => rest.to_owned(),
            ["encoder", "down", i, "block", ..] => {
                format!("encoder.down_blocks.{i}.resnets.{}", tail(4))
            }
            ["encoder", "down", i, "downsample", ..] => {
                format!("encoder.down_blocks.{i}.downsamplers.0.{}", tail(4))
            }
            ["decoder", "up", i, kind, ..] => {
                let level = self
                    .vae_levels
                    .checked_sub(1)?
                    .checked_sub(i.parse().ok()?)?;
                match *kind {
                    "block" => format!("decoder.up_blocks.{level}.resnets.{}", tail(4)),
                    "upsample" => format!("decoder.up_blocks.{level}.upsamplers.0.{}", tail(4)),
                    _ => return None,
                }
            }
            [side, "mid", "block_1", ..] => format!("{side}.mid_block.resnets.0.{}", tail(3)),
            [side, "mid", "block_2", ..] => format!("{side}.mid_block.resnets.1.{}", tail(3)),
            [side, "mid", "attn_1", layer, param] => {
                let layer = match *layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                format!("{side}.mid_block.attentions.0.{layer}.{param}")
            }
            _ => return None,
        })
    }

    fn open_clip(&self, rest: &str) -> Mapped {
        let one = |key: &str| {
            Mapped::Load(vec![Target {
                component: Component::TextEncoder,
                key: key.to_owned(),
                transform: Transform::AsIs,
            }])
        };
        let parts: Vec<&str> = rest.split('.').collect();
        match parts.as_slice() {
            ["token_embedding", "weight"] => one("embeddings.token_embedding.weight"),
            ["positional_embedding"] => one("embeddings.position_embedding.weight"),
            ["ln_final", param] => one(&format!("final_layer_norm.{param}")),
            // The contrastive head is not used for conditioning.
            ["text_projection"] | ["logit_scale"] => Mapped::Ignore,
            ["transformer", "resblocks", i, inner @ ..] => {
                let Ok(index) = i.parse::<usize>() else {
                    return Mapped::Unknown;
                };
                if index >= self.open_clip_layers {
                    return Mapped::Ignore;
                }
                let layer = format!("encoder.layers.{index}");
                match inner {
                    ["attn", fused @ ("in_proj_weight" | "in_proj_bias")] => {
                        let param = if *fused == "in_proj_weight" {
                            "weight"
                        } else {
                            "bias"
                        };
                        Mapped::Load(
                            ["q_proj", "k_proj", "v_proj"]
                                .iter()
                                .enumerate()
                                .map(|(part, proj)| Target {
                                    component: Component::TextEncoder,
                                    key: format!("{layer}.self_attn.{proj}.{param}"),
                                    transform: Transform::QkvPart(part),
                                })
                                .collect(),
                        )
                    }
                    ["attn", "out_proj", param] => {
                        one(&format!("{layer}.self_attn.out_proj.{param}"))
                    }
                    ["ln_1", param] => one(&format!("{layer}.layer_norm1.{param}")),
                    ["ln_2", param] => one(&format!("{layer}.layer_norm2.{param}")),
                    ["mlp", "c_fc", param] => one(&format!("{layer}.mlp.fc1.{param}")),
                    ["mlp", "c_proj", param] => one(&format!("{layer}.mlp.fc2.{param}")),
                    _ => Mapped::Unknown,
                }
            }
            _ => Mapped::Unknown,
        }
    }
}

fn resnet(rest: &str) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    for (ldm, ours) in NAMES {
        if let Some(param) = rest.strip_prefix(ldm) {
            return format!("{ours}{param}");
        }
    }
    rest.to_owned()
}

/// Our module path for the diffusers name `key` of `component`, or `None` for buffers to skip.
///
/// The divergences from diffusers' names:
/// - text encoder: transformers >= 5.6 saves CLIP without the `text_model.` level that published
///   checkpoints have; both load. `position_ids` is a buffer, not a weight.
/// - UNet: the GEGLU feed-forward's `ff.net.0.proj` / `ff.net.2` (a Sequential mixing a GEGLU, a
///   dropout and a linear layer) are the fields `ff.geglu.proj` / `ff.out`.
/// - VAE: folders saved by diffusers before 0.14 name the mid-block attention `query`, `key`,
///   `value` and `proj_attn`; they are `to_q`, `to_k`, `to_v` and `to_out.0` now.
pub fn module_path(component: Component, key: &str) -> Option<String> {
    match component {
        Component::TextEncoder => {
            let key = key.strip_prefix("text_model.").unwrap_or(key);
            (!key.ends_with("position_ids")).then(|| key.to_owned())
        }
        Component::Unet => Some(
            key.replace(".ff.net.0.proj.", ".ff.geglu.proj.")
                .replace(".ff.net.2.", ".ff.out."),
        ),
        Component::Vae => Some(
            key.replace(".attentions.0.query.", ".attentions.0.to_q.")
                .replace(".attentions.0.key.", ".attentions.0.to_k.")
                .replace(".attentions.0.value.", ".attentions.0.to_v.")
                .replace(".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
        ),
    }
}
