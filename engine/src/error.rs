//! The engine's errors: each message says what went wrong and what the artist can do about it.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at. Cancellation is not an error (see `Outcome`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The I/O error is part of the message (not a chained source), so it reads once however the
    /// error is printed.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error(
        "{path} is not a valid safetensors file ({reason}); it may be truncated or damaged, download it again"
    )]
    CorruptWeights { path: PathBuf, reason: String },

    #[error(
        "{path} is a pickle checkpoint (.ckpt/.pt/.pth/.bin). Pickle files can run arbitrary code when \
         opened, so the studio never opens them. Use a .safetensors version of the model, or convert it \
         once in a trusted environment (e.g. diffusers' convert_original_stable_diffusion_to_diffusers.py \
         or `safetensors.torch.save_file`)"
    )]
    PickleRefused { path: PathBuf },

    #[error("{path} is not a Stable Diffusion model the studio recognises: {reason}")]
    UnknownArchitecture { path: PathBuf, reason: String },

    #[error("{path} is a {family} model, which the studio recognises but does not support yet")]
    UnsupportedFamily { path: PathBuf, family: String },

    #[error(
        "{path} is missing {component}: a diffusers model folder needs model_index.json with unet/, vae/, \
         text_encoder/, tokenizer/ and scheduler/ beside it"
    )]
    MissingComponent { path: PathBuf, component: String },

    #[error("the weights in {path} do not fit the model: {details}")]
    WeightMismatch { path: PathBuf, details: String },

    #[error("invalid configuration in {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("compute backend error: {0}")]
    Backend(String),

    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::InvalidConfig {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
