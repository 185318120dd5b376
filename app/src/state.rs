//! What the studio remembers across restarts: settings and the draft being worked on. It is its
//! own `#[serde(default)]` struct, apart from runtime handles, so an older or damaged saved state
//! still loads with defaults for whatever is missing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use studio_engine::device::Backend;
use studio_engine::{GenerationRequest, Outpaint, PreviewMode, Sampler, Schedule};

/// How many recently used models the model menu offers.
pub const RECENT_MODELS: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// A locked seed is reused; an unlocked one is rolled before every generation.
    pub seed_locked: bool,
    pub batch: u32,
    pub model: Option<PathBuf>,
    pub recent_models: Vec<PathBuf>,
    pub taesd: Option<PathBuf>,
    pub backend: Backend,
    pub sampler: Sampler,
    pub schedule: Schedule,
    pub steps: usize,
    pub cfg_scale: f32,
    pub width: u32,
    pub height: u32,
    pub aspect_locked: bool,
    pub strength: f32,
    pub preview: PreviewMode,
    pub brush: Brush,
    pub mask_blur: u32,
    pub outpaint: Outpaint,
}

impl Default for Settings {
    fn default() -> Self {
        let request = GenerationRequest::default();
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 1,
            seed_locked: false,
            batch: 1,
            model: None,
            recent_models: Vec::new(),
            taesd: None,
            backend: Backend::Auto,
            sampler: request.sampler,
            schedule: request.schedule,
            steps: request.steps,
            cfg_scale: request.cfg_scale,
            width: request.width,
            height: request.height,
            aspect_locked: false,
            strength: request.strength,
            preview: PreviewMode::Projection,
            brush: Brush::default(),
            mask_blur: request.mask_blur,
            outpaint: Outpaint::default(),
        }
    }
}

/// The mask brush.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Brush {
    /// Diameter in image pixels.
    pub size: f32,
    /// 1 is a hard edge, 0 fades from the centre.
    pub hardness: f32,
    pub opacity: f32,
}

impl Default for Brush {
    fn default() -> Self {
        Self {
            size: 48.0,
            hardness: 0.6,
            opacity: 1.0,
        }
    }
}

impl Settings {
    /// Remembers `path` as the current model, first in the recent list.
    pub fn use_model(&mut self, path: PathBuf) {
        self.recent_models.retain(|p| p != &path);
        self.recent_models.insert(0, path.clone());
        self.recent_models.truncate(RECENT_MODELS);
        self.model = Some(path);
    }

    /// Takes a request's parameters (from the gallery or a dropped image), keeping the model.
    pub fn apply(&mut self, request: &GenerationRequest) {
        self.prompt = request.prompt.clone();
        self.negative_prompt = request.negative_prompt.clone();
        self.seed = request.seed;
        self.steps = request.steps;
        self.cfg_scale = request.cfg_scale;
        self.sampler = request.sampler;
        self.schedule = request.schedule;
        self.width = request.width;
        self.height = request.height;
        self.strength = request.strength;
        self.mask_blur = request.mask_blur;
    }

    /// The request these settings describe (images and mask come from the canvas).
    pub fn request(&self) -> GenerationRequest {
        GenerationRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampler,
            schedule: self.schedule,
            strength: self.strength,
            mask_blur: self.mask_blur,
            outpaint: self.outpaint,
            batch: self.batch,
            preview: self.preview,
            init_image: None,
            mask: None,
        }
    }
}
