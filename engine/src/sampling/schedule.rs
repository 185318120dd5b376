//! The noise schedule a model was trained with (`scheduler/scheduler_config.json`).

use serde::Deserialize;

use crate::family::PredictionType;

/// The training schedule, with diffusers' names. Older configs leave fields out; they stay `None`
/// where diffusers' samplers disagree on the default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<String>,
    pub steps_offset: usize,
}

impl Default for SchedulerConfig {
    /// Stable Diffusion 1.x/2.x: scaled-linear betas from 0.00085 to 0.012 over 1000 steps.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 1,
        }
    }
}
