//! The studio's latent-diffusion engine: Stable Diffusion 1.x/2.x on Burn — CLIP text encoder,
//! UNet denoiser and VAE — loaded from the checkpoints artists have (diffusers folders and
//! single-file `.safetensors`), on the GPU through wgpu or on the CPU through Burn's `flex`.
//! It has no GUI dependency; the studio talks to it through plain data.

pub mod bench;
pub mod checkpoint;
pub mod device;
pub mod engine;
pub mod error;
pub mod family;
pub mod imaging;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod request;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use burn::module::Module;
pub use burn::tensor::{DType, Device, Distribution, FloatDType, Int, Tensor};
pub use checkpoint::{Checkpoint, StableDiffusion, load_taesd, load_vae};
pub use engine::{Command, Engine, Event, JobId, Preview, Progress};
pub use error::{EngineError, Result};
pub use family::{ModelFamily, PredictionType};
pub use pipeline::{CancelToken, GeneratedImage, Outcome};
pub use request::{GenerationRequest, Outpaint, PreviewMode, Sampler, Schedule};
