//! Which kind of Stable Diffusion a checkpoint is, told from its tensor names and shapes alone (as
//! stable-diffusion.cpp's `get_sd_version`), and every constant that depends on it. The rest of the
//! engine asks the family; nothing else matches on versions.

use crate::models::clip::ClipActivation;
use crate::tokenizer::PadToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelFamily {
    Sd1,
    Sd1Inpaint,
    Sd2,
    Sd2Inpaint,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
}

/// The outcome of looking at a checkpoint's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Supported(ModelFamily),
    /// A known architecture the studio cannot run yet, by name.
    Unsupported(&'static str),
    /// Not a Stable Diffusion checkpoint, and why.
    Unknown(String),
}

/// Where the tensors of the checkpoint live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One LDM-named file (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`).
    SingleFile,
    /// The `unet/` weights of a diffusers folder.
    DiffusersUnet,
}

/// Tells the family from `(name, shape)` pairs. SD2 is recognised by its linear transformer
/// projections (SD1 uses 1×1 convolutions), inpainting by a 9-channel UNet input.
pub fn detect<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    layout: Layout,
) -> Detection {
    let (unet_prefix, conv_in) = match layout {
        Layout::SingleFile => (
            "model.diffusion_model.",
            "model.diffusion_model.input_blocks.0.0.weight",
        ),
        Layout::DiffusersUnet => ("", "conv_in.weight"),
    };
    let mut input_channels = None;
    let mut projection_rank = None;
    let mut any_unet = false;
    for (name, shape) in tensors {
        if name.starts_with("conditioner.embedders.1.")
            || name.ends_with("label_emb.0.0.weight")
            || name.starts_with("add_embedding.")
        {
            return Detection::Unsupported("Stable Diffusion XL");
        }
        if name.contains("joint_blocks.") || name.contains("double_blocks.") {
            return Detection::Unsupported("Stable Diffusion 3 / Flux (transformer)");
        }
        if !name.starts_with(unet_prefix) {
            continue;
        }
        any_unet = true;
        if name == conv_in {
            input_channels = shape.get(1).copied();
        }
        if name.ends_with("proj_in.weight") && projection_rank.is_none() {
            projection_rank = Some(shape.len());
        }
    }
    let Some(input_channels) = input_channels else {
        return Detection::Unknown(if any_unet {
            format!("the UNet has no input convolution '{conv_in}'")
        } else {
            "it holds no Stable Diffusion UNet weights".into()
        });
    };
    let sd2 = match projection_rank {
        Some(2) => true,
        Some(4) => false,
        _ => return Detection::Unknown("the UNet has no recognisable cross-attention".into()),
    };
    match (input_channels, sd2) {
        (4, false) => Detection::Supported(ModelFamily::Sd1),
        (9, false) => Detection::Supported(ModelFamily::Sd1Inpaint),
        (4, true) => Detection::Supported(ModelFamily::Sd2),
        (9, true) => Detection::Supported(ModelFamily::Sd2Inpaint),
        (other, _) => Detection::Unknown(format!("a UNet with {other} input channels")),
    }
}

impl ModelFamily {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "Stable Diffusion 1.x",
            Self::Sd1Inpaint => "Stable Diffusion 1.x inpainting",
            Self::Sd2 => "Stable Diffusion 2.x",
            Self::Sd2Inpaint => "Stable Diffusion 2.x inpainting",
        }
    }

    pub fn is_sd2(self) -> bool {
        matches!(self, Self::Sd2 | Self::Sd2Inpaint)
    }

    /// A 9-channel UNet that takes the mask and the masked image's latents beside the noisy latents.
    pub fn is_inpaint(self) -> bool {
        matches!(self, Self::Sd1Inpaint | Self::Sd2Inpaint)
    }

    /// Latents are the VAE's output times this factor.
    pub fn vae_scaling_factor(self) -> f32 {
        0.18215
    }

    /// What the UNet predicts when the checkpoint does not say: SD2's 768 models predict v, its
    /// inpainting model noise (single-file checkpoints may state it in `modelspec.prediction_type`).
    pub fn default_prediction(self) -> PredictionType {
        match self {
            Self::Sd2 => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        }
    }

    /// The image side the model was trained at.
    pub fn native_size(self) -> usize {
        match self {
            Self::Sd2 => 768,
            _ => 512,
        }
    }

    pub fn pad_token(self) -> PadToken {
        if self.is_sd2() {
            PadToken::Special("!".into())
        } else {
            PadToken::EndOfText
        }
    }

    pub fn clip_activation(self) -> ClipActivation {
        if self.is_sd2() {
            ClipActivation::Gelu
        } else {
            ClipActivation::QuickGelu
        }
    }

    /// Attention heads of a UNet level with `channels` channels, which single-file checkpoints do
    /// not record: SD1 uses 8 heads everywhere, SD2 64-wide heads.
    pub fn unet_heads(self, channels: usize) -> usize {
        if self.is_sd2() { channels / 64 } else { 8 }
    }

    /// Latent channel → RGB contributions for a quick preview of x̂₀ (values then in [-1, 1]).
    /// SD1 and SD2 share a VAE; these factors are @torridgristle's, as InvokeAI (Apache-2.0)
    /// publishes them in `invokeai/app/util/step_callback.py`.
    pub fn latent_rgb_factors(self) -> [[f32; 3]; 4] {
        [
            [0.3444, 0.1385, 0.0670],
            [0.1247, 0.4027, 0.1494],
            [-0.3192, 0.2513, 0.2103],
            [-0.1307, -0.1874, -0.7445],
        ]
    }

    /// CLIP heads are 64 wide in both text encoders.
    pub fn clip_heads(self, hidden: usize) -> usize {
        hidden / 64
    }

    /// Final layers of a single file's text encoder that SD leaves out: SD2 was trained on
    /// OpenCLIP's penultimate layer.
    pub fn single_file_clip_layers_skipped(self) -> usize {
        usize::from(self.is_sd2())
    }
}
