//! The flow of one request, in the numbered stages of diffusers' `pipeline_stable_diffusion*.py`:
//! validate, encode the prompt, choose the noise levels, prepare the latents (and for inpainting the
//! mask and masked-image latents), denoise, decode and composite. Random numbers are drawn in
//! diffusers' order from a torch-compatible generator, so a seed makes the image it makes there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Device, Int, Tensor};
use image::{GrayImage, Luma, RgbImage};

use crate::checkpoint::StableDiffusion;
use crate::error::{EngineError, Result};
use crate::family::PredictionType;
use crate::imaging::{
    composite, image_to_tensor, latent_mask, masked_tensor, outpaint_canvas, to_unit_range,
    unit_tensor_to_image,
};
use crate::models::taesd::Taesd;
use crate::noise::TorchRng;
use crate::prompt::{Chunk, tokenize};
use crate::request::{GenerationRequest, Mode};
use crate::sampling::{self, Cancelled, Denoiser, Sigmas, noise_like};

/// Asks a running job to stop before its next UNet evaluation. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the pipeline reports after every denoising step.
pub struct StepEvent<'a> {
    /// Which image of the batch.
    pub image: usize,
    /// The step just taken (0-based) and the steps each image takes.
    pub step: usize,
    pub total: usize,
    /// The noise level the step started from and the one `latents` are at now.
    pub sigma: f32,
    pub next_sigma: f32,
    pub latents: &'a Tensor<4>,
    /// The model's estimate of the clean latents at this step (for previews).
    pub denoised: &'a Tensor<4>,
}

#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub seed: u64,
}

/// How a request ended. Cancelling is an outcome, not an error.
#[derive(Debug)]
pub enum Outcome {
    Finished(Vec<GeneratedImage>),
    /// Stopped before `at_step` of image `images.len()`; the images finished before are kept.
    Cancelled {
        at_step: usize,
        images: Vec<GeneratedImage>,
    },
}

/// A loaded model, ready to generate.
pub struct Pipeline<'a> {
    pub models: &'a StableDiffusion,
    pub taesd: Option<&'a Taesd>,
}

/// The init image and mask one image is made from, after outpainting has grown the canvas.
struct Source {
    image: Option<RgbImage>,
    mask: Option<GrayImage>,
    strength: f32,
}

impl Pipeline<'_> {
    fn device(&self) -> &Device {
        &self.models.device
    }

    /// Runs `request`, calling `on_step` after every step of every image.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        on_step: &mut dyn FnMut(&StepEvent),
    ) -> Result<Outcome> {
        // 1. validate
        request.validate()?;
        let source = self.source(request);

        // 2. encode the prompt: [uncond, cond] when guidance is on (diffusers: scale > 1)
        let guidance = (request.cfg_scale > 1.0).then_some(request.cfg_scale);
        let context = self.conditioning(
            &request.prompt,
            guidance.map(|_| request.negative_prompt.as_str()),
        )?;

        // 3. the noise levels, cut short by the strength when starting from an image
        let full = self
            .models
            .scheduler
            .sigmas(request.sampler, request.schedule, request.steps);
        let start = match source.image {
            Some(_) => {
                let kept = ((full.steps() as f32 * source.strength) as usize).min(full.steps());
                if kept == 0 {
                    return Err(EngineError::InvalidRequest(format!(
                        "strength {} with {} steps leaves no step to run; raise the strength or the steps",
                        source.strength, request.steps
                    )));
                }
                full.steps() - kept
            }
            None => 0,
        };
        let sigmas = full.starting_at(start);

        let mut images = Vec::new();
        for index in 0..request.batch as usize {
            let seed = request.seed.wrapping_add(index as u64);
            match self.image(
                request, &source, &sigmas, &context, guidance, seed, index, cancel, on_step,
            )? {
                Ok(image) => images.push(GeneratedImage { image, seed }),
                Err(Cancelled { at_step }) => return Ok(Outcome::Cancelled { at_step, images }),
            }
        }
        Ok(Outcome::Finished(images))
    }

    /// The init image and mask after outpainting grew the canvas; inpainting models asked for a
    /// plain generation repaint a grey canvas everywhere.
    fn source(&self, request: &GenerationRequest) -> Source {
        let (width, height) = request.canvas_size();
        let full_mask = || GrayImage::from_pixel(width, height, Luma([255]));
        match request.mode() {
            Mode::Outpaint => {
                let image = request.init_image.as_ref().expect("validated");
                let o = request.outpaint;
                let (canvas, mask) = outpaint_canvas(
                    image,
                    (o.left, o.top),
                    (width, height),
                    request.mask_blur.max(8),
                );
                Source {
                    image: Some(canvas),
                    mask: Some(mask),
                    strength: 1.0,
                }
            }
            Mode::Inpaint => Source {
                image: request.init_image.clone(),
                mask: request.mask.clone(),
                strength: request.strength,
            },
            Mode::ImageToImage if self.models.family.is_inpaint() => Source {
                image: request.init_image.clone(),
                mask: Some(full_mask()),
                strength: request.strength,
            },
            Mode::ImageToImage => Source {
                image: request.init_image.clone(),
                mask: None,
                strength: request.strength,
            },
            Mode::TextToImage if self.models.family.is_inpaint() => Source {
                image: Some(RgbImage::from_pixel(
                    width,
                    height,
                    image::Rgb([128, 128, 128]),
                )),
                mask: Some(full_mask()),
                strength: 1.0,
            },
            Mode::TextToImage => Source {
                image: None,
                mask: None,
                strength: 1.0,
            },
        }
    }

    /// The text embeddings the UNet attends to: `[1, 77·k, d]`, or `[2, 77·k, d]` with the negative
    /// prompt first when `negative` is given.
    pub fn conditioning(&self, prompt: &str, negative: Option<&str>) -> Result<Tensor<3>> {
        let tokenizer = &self.models.tokenizer;
        let cond = tokenize(tokenizer, prompt)?.chunks;
        let Some(negative) = negative else {
            return Ok(self.encode_prompts(&[&cond]).remove(0));
        };
        let mut uncond = tokenize(tokenizer, negative)?.chunks;
        let mut cond = cond;
        // Both halves of the batch need the same length: pad the shorter with empty chunks.
        let empty = tokenize(tokenizer, "")?.chunks.remove(0);
        let chunks = cond.len().max(uncond.len());
        cond.resize(chunks, empty.clone());
        uncond.resize(chunks, empty);
        // Both in one pass of the text encoder: its products have twice the rows, and it runs half
        // as many operations (CLIP-L, side by side: 0.59× the time of two passes at best, 0.65× in
        // the median).
        Ok(Tensor::cat(self.encode_prompts(&[&uncond, &cond]), 0))
    }

    /// Encodes every chunk of every prompt in one pass, then for each prompt scales weighted
    /// tokens keeping the chunk's mean (as A1111's original emphasis does) and concatenates its
    /// chunks along the token axis.
    fn encode_prompts(&self, prompts: &[&[Chunk]]) -> Vec<Tensor<3>> {
        let device = self.device();
        let chunks = prompts.iter().flat_map(|chunks| chunks.iter());
        let ids: Vec<i64> = chunks
            .clone()
            .flat_map(|c| c.ids.iter().map(|&id| i64::from(id)))
            .collect();
        let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), device)
            .reshape([chunks.count(), crate::tokenizer::MAX_LENGTH]);
        let encoded = self.models.text_encoder.forward(ids, self.models.clip_skip);
        let [_, tokens, width] = encoded.dims();
        let mut first = 0;
        prompts
            .iter()
            .map(|chunks| {
                let parts: Vec<Tensor<3>> = chunks
                    .iter()
                    .enumerate()
                    .map(|(i, chunk)| {
                        let z = encoded.clone().narrow(0, first + i, 1);
                        if !chunk.is_weighted() {
                            return z;
                        }
                        let weights = Tensor::<1>::from_floats(chunk.weights.as_slice(), device)
                            .reshape([1, tokens, 1]);
                        let mean = z.clone().mean();
                        let weighted = z * weights;
                        let new_mean = weighted.clone().mean();
                        weighted * (mean / new_mean).reshape([1, 1, 1])
                    })
                    .collect();
                first += chunks.len();
                Tensor::cat(parts, 1).reshape([1, chunks.len() * tokens, width])
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        request: &GenerationRequest,
        source: &Source,
        sigmas: &Sigmas,
        context: &Tensor<3>,
        guidance: Option<f32>,
        seed: u64,
        index: usize,
        cancel: &CancelToken,
        on_step: &mut dyn FnMut(&StepEvent),
    ) -> Result<Result<RgbImage, Cancelled>> {
        let device = self.device();
        let models = self.models;
        let scale = models.vae_config.scaling_factor;
        let factor = models.vae_config.downscale() as u32;
        let (width, height) = request.canvas_size();
        let mut rng = TorchRng::new(seed);
        let nine_channels = models.unet_config.in_channels == 9;
        let strength_max = source.strength == 1.0;
        let shape = [
            1,
            models.vae_config.latent_channels,
            (height / factor) as usize,
            (width / factor) as usize,
        ];
        let template = Tensor::<4>::zeros(shape, device);
        let encode = |pixels: Tensor<4>, rng: &mut TorchRng| {
            models.vae.encode(pixels).sample(rng).mul_scalar(scale)
        };

        // 4. latents, drawing from the generator in diffusers' order: image latents, noise, then the
        // masked image's latents
        let image_latents = match (&source.image, &source.mask) {
            (Some(image), None) => Some(encode(image_to_tensor(image, device), &mut rng)),
            (Some(image), Some(_)) if !nine_channels || !strength_max => {
                Some(encode(image_to_tensor(image, device), &mut rng))
            }
            _ => None,
        };
        let noise = noise_like(&template, &mut rng);
        let x = match (&image_latents, source.mask.is_some() && strength_max) {
            (Some(latents), false) => latents.clone() + noise.clone().mul_scalar(sigmas.sigmas[0]),
            _ => noise.clone().mul_scalar(sigmas.init_noise_scale),
        };

        // 5. inpainting inputs: the mask at latent size, and the masked image's latents (a 9-channel
        // UNet takes both; an ordinary one has the known region blended back after each step)
        let inpaint = match (&source.image, &source.mask) {
            (Some(image), Some(mask)) => {
                let masked = encode(masked_tensor(image, mask, device), &mut rng);
                Some((latent_mask(mask, factor, device), masked))
            }
            _ => None,
        };
        let (conditioning, blend) = match inpaint {
            Some((mask, masked)) if nine_channels => (Some((mask, masked)), None),
            Some((mask, _)) => (
                None,
                Some((mask, image_latents.clone().expect("encoded above"), noise)),
            ),
            None => (None, None),
        };

        // 6. denoise
        let mut denoiser = ModelDenoiser {
            pipeline: self,
            context,
            guidance,
            prediction: models.scheduler.prediction_type,
            sigmas,
            conditioning,
            blend,
            cancel,
            on_step,
            image: index,
            denoised: None,
        };
        // The steps share their working memory; the decoder, whose activations are the largest,
        // starts without it.
        let memory = crate::models::cpu_pool::keep_working_memory();
        let sampled = sampling::sample(request.sampler, &mut denoiser, x, sigmas, &mut rng);
        drop(memory);
        let latents = match sampled {
            Ok(latents) => latents,
            Err(cancelled) => return Ok(Err(cancelled)),
        };

        // 7. decode, and put back what the mask keeps
        let decoded = unit_tensor_to_image(self.decode(latents, sigmas));
        Ok(Ok(match (&source.image, &source.mask) {
            (Some(original), Some(mask)) => composite(original, &decoded, mask, request.mask_blur),
            _ => decoded,
        }))
    }

    /// Final latents to an image in [0, 1] (`[batch, 3, h, w]`). Latents that end above σ = 0 (DDIM's
    /// last level) are brought back to `x_t` first.
    pub fn decode(&self, latents: Tensor<4>, sigmas: &Sigmas) -> Tensor<4> {
        let last = *sigmas.sigmas.last().expect("at least one level");
        let latents =
            latents.div_scalar((last * last + 1.0).sqrt() * self.models.vae_config.scaling_factor);
        to_unit_range(self.models.vae.decode(latents))
    }
}

/// The UNet as a sampler's denoiser: classifier-free guidance, the inpainting inputs, cancellation
/// before every evaluation, and a step event after every step.
struct ModelDenoiser<'a, 'p> {
    pipeline: &'a Pipeline<'p>,
    context: &'a Tensor<3>,
    guidance: Option<f32>,
    prediction: PredictionType,
    sigmas: &'a Sigmas,
    /// A 9-channel UNet's extra inputs: mask and masked-image latents.
    conditioning: Option<(Tensor<4>, Tensor<4>)>,
    /// An ordinary UNet inpainting: mask, original latents and the noise they were noised with.
    blend: Option<(Tensor<4>, Tensor<4>, Tensor<4>)>,
    cancel: &'a CancelToken,
    on_step: &'a mut dyn FnMut(&StepEvent),
    image: usize,
    denoised: Option<Tensor<4>>,
}

impl Denoiser for ModelDenoiser<'_, '_> {
    fn denoise(&mut self, x: &Tensor<4>, step: usize) -> Result<Tensor<4>, Cancelled> {
        if self.cancel.is_cancelled() {
            return Err(Cancelled { at_step: step });
        }
        let sigma = self.sigmas.sigmas[step];
        let scale_in = (sigma * sigma + 1.0).sqrt();
        let mut input = x.clone().div_scalar(scale_in);
        if let Some((mask, masked)) = &self.conditioning {
            input = Tensor::cat(vec![input, mask.clone(), masked.clone()], 1);
        }
        let timestep = self.sigmas.timesteps[step];
        // With guidance the context is [uncond, cond], and the UNet shares the latent between them.
        let out = self
            .pipeline
            .models
            .unet
            .forward(input, &[timestep], self.context.clone());
        let out = match self.guidance {
            Some(scale) => {
                let [uncond, cond] = out.chunk(2, 0).try_into().expect("two halves");
                uncond.clone() + (cond - uncond).mul_scalar(scale)
            }
            None => out,
        };
        let denoised = match self.prediction {
            PredictionType::Epsilon => x.clone() - out.mul_scalar(sigma),
            PredictionType::VPrediction => {
                x.clone().div_scalar(sigma * sigma + 1.0) - out.mul_scalar(sigma / scale_in)
            }
        };
        self.denoised = Some(denoised.clone());
        Ok(denoised)
    }

    fn after_step(&mut self, step: usize, x: Tensor<4>) -> Tensor<4> {
        let x = match &self.blend {
            Some((mask, original, noise)) => {
                // The known region at the level the latents are now at: noised like them, or on the
                // last step clean (in `x_t` terms, as diffusers blends).
                let next = self.sigmas.sigmas[step + 1];
                let known = if step + 1 < self.sigmas.steps() {
                    original.clone() + noise.clone().mul_scalar(next)
                } else {
                    original.clone().mul_scalar((next * next + 1.0).sqrt())
                };
                known * (mask.clone().neg().add_scalar(1.0)) + x * mask.clone()
            }
            None => x,
        };
        let denoised = self.denoised.as_ref().expect("denoised before stepping");
        (self.on_step)(&StepEvent {
            image: self.image,
            step,
            total: self.sigmas.steps(),
            sigma: self.sigmas.sigmas[step],
            next_sigma: self.sigmas.sigmas[step + 1],
            latents: &x,
            denoised,
        });
        x
    }
}
