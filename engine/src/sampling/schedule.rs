//! Noise levels: the training schedule a model declares (`scheduler/scheduler_config.json`) and
//! the sigmas a sampler visits. Each sampler places its steps as the diffusers scheduler of the same
//! name does (`set_timesteps` of EulerDiscrete, DDIM, DPMSolverMultistep, LCM), so a seed gives the
//! same image; the Karras spacing is Karras et al. (2022), eq. 5 with ρ = 7.

use serde::{Deserialize, Serialize};

use crate::family::PredictionType;
use crate::request::{Sampler, Schedule};

/// The training schedule, with diffusers' names. Older configs leave fields out; they stay `None`
/// where diffusers' schedulers disagree on the default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<String>,
    pub steps_offset: usize,
    pub set_alpha_to_one: Option<bool>,
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
            set_alpha_to_one: Some(false),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// The steps of one sampling run, in k-diffusion's terms: the model sees `x / √(σ² + 1)` at
/// `timesteps[i]`, and the latents start as unit noise times `init_noise_scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sigmas {
    /// One per step plus the final level (0, or σ at the first training step for DDIM).
    pub sigmas: Vec<f32>,
    /// The UNet timestep of each step (fractional for the Euler samplers' interpolated levels).
    pub timesteps: Vec<f32>,
    pub init_noise_scale: f32,
}

impl Sigmas {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The tail starting at `step`, as img2img runs it.
    pub fn starting_at(&self, step: usize) -> Sigmas {
        Sigmas {
            sigmas: self.sigmas[step..].to_vec(),
            timesteps: self.timesteps[step..].to_vec(),
            init_noise_scale: self.init_noise_scale,
        }
    }
}

impl SchedulerConfig {
    /// ᾱ_t for every training step, computed in f32 as torch does.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "linear" => linspace(self.beta_start, self.beta_end, n)
                .map(|b| b as f32)
                .collect(),
            // "scaled_linear" and anything unknown: SD's schedule.
            _ => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                .map(|b| {
                    let b = b as f32;
                    b * b
                })
                .collect(),
        };
        let mut product = 1f32;
        betas
            .iter()
            .map(|b| {
                product *= 1.0 - b;
                product
            })
            .collect()
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t) of every training step.
    pub fn training_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod()
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    fn spacing(&self, schedule: Schedule, sampler_default: Spacing) -> Spacing {
        if schedule == Schedule::Trailing {
            return Spacing::Trailing;
        }
        match self.timestep_spacing.as_deref() {
            Some("leading") => Spacing::Leading,
            Some("linspace") => Spacing::Linspace,
            Some("trailing") => Spacing::Trailing,
            _ => sampler_default,
        }
    }

    /// The noise levels `sampler` visits in `steps` steps with `schedule`.
    pub fn sigmas(&self, sampler: Sampler, schedule: Schedule, steps: usize) -> Sigmas {
        assert!(steps >= 1, "at least one step");
        let train = self.training_sigmas();
        let t_max = self.num_train_timesteps;
        let offset = self.steps_offset as f64;
        let karras = schedule == Schedule::Karras;
        match sampler {
            Sampler::Euler | Sampler::EulerA => {
                let spacing = self.spacing(schedule, Spacing::Linspace);
                let timesteps: Vec<f64> = match spacing {
                    Spacing::Linspace => linspace(0.0, (t_max - 1) as f64, steps)
                        .map(|t| t as f32 as f64)
                        .rev()
                        .collect(),
                    Spacing::Leading => leading(t_max, steps, offset),
                    Spacing::Trailing => trailing(t_max, t_max, steps),
                };
                let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
                let timesteps = if karras {
                    let (high, low) = (sigmas[0], sigmas[steps - 1]);
                    sigmas = karras_sigmas(low, high, steps);
                    sigmas.iter().map(|&s| sigma_to_t(s, &train)).collect()
                } else {
                    timesteps
                };
                let max = sigmas.iter().copied().fold(0.0, f64::max) as f32;
                let init_noise_scale = match spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                finish(sigmas, 0.0, timesteps, Some(init_noise_scale))
            }
            Sampler::Ddim => {
                let spacing = self.spacing(schedule, Spacing::Leading);
                let timesteps: Vec<f64> = match spacing {
                    Spacing::Linspace => linspace(0.0, (t_max - 1) as f64, steps)
                        .map(f64::round)
                        .rev()
                        .collect(),
                    Spacing::Leading => leading(t_max, steps, offset),
                    Spacing::Trailing => trailing(t_max, t_max, steps),
                };
                if karras {
                    // DDIM's own configuration has no Karras option; its update in σ terms is
                    // Euler's, so it follows the Euler Karras levels.
                    let mut euler = self.sigmas(Sampler::Euler, schedule, steps);
                    euler.init_noise_scale = (euler.sigmas[0].powi(2) + 1.0).sqrt();
                    return euler;
                }
                let sigmas = timesteps
                    .iter()
                    .map(|&t| f64::from(train[t as usize]))
                    .collect();
                // The last step lands on ᾱ = 1 or on the first training step's ᾱ.
                let last = if self.set_alpha_to_one.unwrap_or(true) {
                    0.0
                } else {
                    f64::from(train[0])
                };
                finish(sigmas, last, timesteps, None)
            }
            Sampler::DpmPp2m => {
                let spacing = self.spacing(schedule, Spacing::Linspace);
                let timesteps: Vec<f64> = if karras {
                    Vec::new()
                } else {
                    match spacing {
                        Spacing::Linspace => {
                            let mut t: Vec<f64> = linspace(0.0, (t_max - 1) as f64, steps + 1)
                                .map(f64::round)
                                .rev()
                                .collect();
                            t.pop();
                            t
                        }
                        Spacing::Leading => {
                            let ratio = (t_max / (steps + 1)) as f64;
                            let mut t: Vec<f64> = (0..=steps)
                                .rev()
                                .map(|i| (i as f64 * ratio).round() + offset)
                                .collect();
                            t.pop();
                            t
                        }
                        Spacing::Trailing => trailing(t_max, t_max, steps),
                    }
                };
                if karras {
                    let sigmas =
                        karras_sigmas(f64::from(train[0]), f64::from(train[t_max - 1]), steps);
                    let timesteps = sigmas
                        .iter()
                        .map(|&s| sigma_to_t(s, &train).round())
                        .collect();
                    finish(sigmas, 0.0, timesteps, None)
                } else {
                    let sigmas = timesteps.iter().map(|&t| interp(t, &train)).collect();
                    finish(sigmas, 0.0, timesteps, None)
                }
            }
            Sampler::Lcm => {
                // LCM keeps to the skipping schedule of its distillation (50 original steps).
                const ORIGINAL_STEPS: usize = 50;
                let k = t_max / ORIGINAL_STEPS;
                let origin: Vec<usize> = (1..=ORIGINAL_STEPS).rev().map(|i| i * k - 1).collect();
                let steps = steps.min(ORIGINAL_STEPS);
                let timesteps: Vec<f64> = (0..steps)
                    .map(|i| {
                        origin[(i as f64 * ORIGINAL_STEPS as f64 / steps as f64).floor() as usize]
                            as f64
                    })
                    .collect();
                let sigmas = timesteps
                    .iter()
                    .map(|&t| f64::from(train[t as usize]))
                    .collect();
                finish(sigmas, 0.0, timesteps, None)
            }
        }
    }
}

/// Assembles [`Sigmas`]; samplers that work on `x_t` (DDIM, DPM, LCM) start from unit noise, which is
/// `√(σ₀² + 1)` in σ terms.
fn finish(
    sigmas: Vec<f64>,
    last: f64,
    timesteps: Vec<f64>,
    init_noise_scale: Option<f32>,
) -> Sigmas {
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(last as f32);
    let init_noise_scale = init_noise_scale.unwrap_or_else(|| (sigmas[0] * sigmas[0] + 1.0).sqrt());
    Sigmas {
        sigmas,
        timesteps: timesteps.into_iter().map(|t| t as f32).collect(),
        init_noise_scale,
    }
}

/// `np.linspace(start, end, n)`.
fn linspace(start: f64, end: f64, n: usize) -> impl DoubleEndedIterator<Item = f64> {
    let step = if n > 1 {
        (end - start) / (n - 1) as f64
    } else {
        0.0
    };
    (0..n).map(move |i| {
        if i + 1 == n && n > 1 {
            end
        } else {
            start + step * i as f64
        }
    })
}

/// "leading": `(arange(n) · (T // n)).round()[::-1] + offset`.
fn leading(t_max: usize, steps: usize, offset: f64) -> Vec<f64> {
    let ratio = (t_max / steps) as f64;
    (0..steps)
        .rev()
        .map(|i| (i as f64 * ratio).round() + offset)
        .collect()
}

/// "trailing": `arange(last, 0, -T/n).round() - 1`.
fn trailing(last: usize, t_max: usize, steps: usize) -> Vec<f64> {
    let ratio = t_max as f64 / steps as f64;
    (0..steps)
        .map(|i| (last as f64 - i as f64 * ratio).round() - 1.0)
        .collect()
}

/// `np.interp(t, arange(T), sigmas)`.
fn interp(t: f64, sigmas: &[f32]) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return f64::from(sigmas[0]);
    }
    if t >= last as f64 {
        return f64::from(sigmas[last]);
    }
    let low = t.floor() as usize;
    let w = t - low as f64;
    let (a, b) = (f64::from(sigmas[low]), f64::from(sigmas[low + 1]));
    a + (b - a) * w
}

/// The (fractional) training step whose σ is `sigma`, interpolating log σ linearly.
fn sigma_to_t(sigma: f64, sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let logs: Vec<f64> = sigmas.iter().map(|&s| f64::from(s.ln())).collect();
    let low = logs
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(logs.len() - 2);
    let (lo, hi) = (logs[low], logs[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    linspace(0.0, 1.0, steps)
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(RHO))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values REFERENCE.md records for SD1's config at 4 steps.
    #[test]
    fn sd1_leading_euler_at_four_steps() {
        let config = SchedulerConfig {
            timestep_spacing: Some("leading".into()),
            ..SchedulerConfig::default()
        };
        let s = config.sigmas(Sampler::Euler, Schedule::Normal, 4);
        assert_eq!(s.timesteps, vec![751.0, 501.0, 251.0, 1.0]);
        for (got, want) in s.sigmas.iter().zip([4.1167, 1.6237, 0.6984, 0.0413, 0.0]) {
            assert!((got - want).abs() < 1e-4, "{:?}", s.sigmas);
        }
    }
}
