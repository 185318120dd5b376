//! What to generate: plain data the GUI and the CLI fill in, checked before any work starts.

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The sampling algorithm, each matching the diffusers scheduler of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// `EulerDiscreteScheduler`.
    #[default]
    Euler,
    /// `EulerAncestralDiscreteScheduler`: adds fresh noise every step.
    EulerA,
    /// `DDIMScheduler` with η = 0.
    Ddim,
    /// `DPMSolverMultistepScheduler`, DPM-Solver++ of order 2.
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    /// `LCMScheduler`, for latent-consistency and turbo models.
    Lcm,
}

impl Sampler {
    pub const ALL: [Sampler; 5] = [
        Self::Euler,
        Self::EulerA,
        Self::Ddim,
        Self::DpmPp2m,
        Self::Lcm,
    ];

    /// The name used on the command line and in saved requests.
    pub fn id(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::Ddim => "ddim",
            Self::DpmPp2m => "dpmpp_2m",
            Self::Lcm => "lcm",
        }
    }

    /// The name A1111 writes in its `parameters` metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerA => "Euler a",
            Self::Ddim => "DDIM",
            Self::DpmPp2m => "DPM++ 2M",
            Self::Lcm => "LCM",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.id() == id)
    }

    pub fn from_a1111_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.a1111_name().eq_ignore_ascii_case(name))
    }
}

/// How the noise levels are spaced across the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The model's own spacing (`leading` or `linspace` as its scheduler config says).
    #[default]
    Normal,
    /// Karras et al. (2022): denser steps at low noise.
    Karras,
    /// `trailing` spacing: the first step starts at the highest noise level.
    Trailing,
}

impl Schedule {
    pub const ALL: [Schedule; 3] = [Self::Normal, Self::Karras, Self::Trailing];

    pub fn id(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Karras => "karras",
            Self::Trailing => "trailing",
        }
    }

    /// The name A1111 writes as "Schedule type".
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Normal => "Automatic",
            Self::Karras => "Karras",
            Self::Trailing => "SGM Uniform",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.id() == id)
    }
}

/// How each step's preview is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewMode {
    /// A linear projection of the latents, at latent resolution: nearly free.
    #[default]
    Projection,
    /// The TAESD tiny decoder, when one is loaded: full resolution.
    Taesd,
    Off,
}

/// Pixels to add on each side of the init image before outpainting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outpaint {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl Outpaint {
    pub fn is_empty(&self) -> bool {
        self.left + self.top + self.right + self.bottom == 0
    }
}

/// Limits that keep a request inside what the models and memory can take.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 4096;
pub const MAX_STEPS: usize = 500;
pub const MAX_BATCH: u32 = 64;

/// One generation job. Images are 8-bit sRGB; the mask is white where the image is repainted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub cfg_scale: f32,
    pub sampler: Sampler,
    pub schedule: Schedule,
    /// How much of the init image is re-noised (img2img and inpainting): 0 keeps it, 1 replaces it.
    pub strength: f32,
    /// Blur radius, in pixels, of the mask's edge when the result is composited over the original.
    pub mask_blur: u32,
    pub outpaint: Outpaint,
    /// Images to make, with seeds `seed`, `seed + 1`, …
    pub batch: u32,
    pub preview: PreviewMode,
    #[serde(skip)]
    pub init_image: Option<RgbImage>,
    #[serde(skip)]
    pub mask: Option<GrayImage>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            width: 512,
            height: 512,
            steps: 20,
            cfg_scale: 7.0,
            sampler: Sampler::default(),
            schedule: Schedule::default(),
            strength: 0.75,
            mask_blur: 4,
            outpaint: Outpaint::default(),
            batch: 1,
            preview: PreviewMode::default(),
            init_image: None,
            mask: None,
        }
    }
}

/// What a request asks of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    TextToImage,
    ImageToImage,
    Inpaint,
    Outpaint,
}

impl GenerationRequest {
    pub fn mode(&self) -> Mode {
        match (&self.init_image, &self.mask) {
            (Some(_), _) if !self.outpaint.is_empty() => Mode::Outpaint,
            (Some(_), Some(_)) => Mode::Inpaint,
            (Some(_), None) => Mode::ImageToImage,
            (None, _) => Mode::TextToImage,
        }
    }

    /// The size of the image the pipeline works on: the canvas grown by any outpainting.
    pub fn canvas_size(&self) -> (u32, u32) {
        match (&self.init_image, self.mode()) {
            (Some(image), Mode::Outpaint) => {
                let o = self.outpaint;
                (
                    image.width() + o.left + o.right,
                    image.height() + o.top + o.bottom,
                )
            }
            _ => (self.width, self.height),
        }
    }

    /// Refuses what cannot be generated, with a message saying what to change.
    ///
    /// Sizes must be multiples of 8 (the VAE works in 8×8 blocks): the studio and the CLI snap
    /// them before asking; the engine refuses rather than silently resize.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(EngineError::InvalidRequest(message));
        let (width, height) = self.canvas_size();
        for (name, side) in [("width", width), ("height", height)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&side) {
                return invalid(format!(
                    "{name} {side} is outside {MIN_SIDE}..={MAX_SIDE} pixels"
                ));
            }
            if side % 8 != 0 {
                let down = side / 8 * 8;
                return invalid(format!(
                    "{name} {side} is not a multiple of 8; use {} or {}",
                    down.max(MIN_SIDE),
                    down + 8
                ));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return invalid(format!(
                "steps must be between 1 and {MAX_STEPS}, not {}",
                self.steps
            ));
        }
        if !self.cfg_scale.is_finite() || !(0.0..=50.0).contains(&self.cfg_scale) {
            return invalid(format!(
                "CFG scale must be between 0 and 50, not {}",
                self.cfg_scale
            ));
        }
        if !self.strength.is_finite() || !(0.0..=1.0).contains(&self.strength) {
            return invalid(format!(
                "strength must be between 0 and 1, not {}",
                self.strength
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return invalid(format!(
                "batch must be between 1 and {MAX_BATCH}, not {}",
                self.batch
            ));
        }
        if let Some(mask) = &self.mask {
            let Some(image) = &self.init_image else {
                return invalid("a mask needs an init image to repaint".into());
            };
            if mask.dimensions() != image.dimensions() {
                return invalid(format!(
                    "the mask is {}×{} but the init image is {}×{}; they must be the same size",
                    mask.width(),
                    mask.height(),
                    image.width(),
                    image.height()
                ));
            }
        }
        if let Some(image) = &self.init_image {
            let mode = self.mode();
            if mode != Mode::Outpaint && image.dimensions() != (width, height) {
                return invalid(format!(
                    "the init image is {}×{} but the request is {width}×{height}; resize it or set the size to match",
                    image.width(),
                    image.height()
                ));
            }
            if mode != Mode::Outpaint && mode != Mode::TextToImage && self.strength == 0.0 {
                return invalid(
                    "strength 0 would return the init image unchanged; use a strength above 0"
                        .into(),
                );
            }
        } else if !self.outpaint.is_empty() {
            return invalid("outpainting needs an init image to extend".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> GenerationRequest {
        GenerationRequest {
            prompt: "a cat".into(),
            ..GenerationRequest::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        request().validate().unwrap();
    }

    #[test]
    fn impossible_values_are_refused_with_advice() {
        let cases: Vec<(GenerationRequest, &str)> = vec![
            (
                GenerationRequest {
                    width: 513,
                    ..request()
                },
                "use 512 or 520",
            ),
            (
                GenerationRequest {
                    height: 8,
                    ..request()
                },
                "outside",
            ),
            (
                GenerationRequest {
                    width: 100_000,
                    ..request()
                },
                "outside",
            ),
            (
                GenerationRequest {
                    steps: 0,
                    ..request()
                },
                "steps",
            ),
            (
                GenerationRequest {
                    strength: 1.5,
                    ..request()
                },
                "strength",
            ),
            (
                GenerationRequest {
                    cfg_scale: f32::NAN,
                    ..request()
                },
                "CFG",
            ),
            (
                GenerationRequest {
                    batch: 0,
                    ..request()
                },
                "batch",
            ),
            (
                GenerationRequest {
                    mask: Some(GrayImage::new(512, 512)),
                    ..request()
                },
                "needs an init image",
            ),
            (
                GenerationRequest {
                    init_image: Some(RgbImage::new(512, 512)),
                    mask: Some(GrayImage::new(256, 512)),
                    ..request()
                },
                "same size",
            ),
            (
                GenerationRequest {
                    init_image: Some(RgbImage::new(256, 256)),
                    ..request()
                },
                "resize it",
            ),
        ];
        for (request, expected) in cases {
            let error = request.validate().unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn outpaint_grows_the_canvas() {
        let request = GenerationRequest {
            init_image: Some(RgbImage::new(64, 64)),
            outpaint: Outpaint {
                left: 64,
                top: 0,
                right: 0,
                bottom: 32,
            },
            ..request()
        };
        assert_eq!(request.mode(), Mode::Outpaint);
        assert_eq!(request.canvas_size(), (128, 96));
        request.validate().unwrap();
    }
}
