//! The pipeline equals diffusers' Stable Diffusion pipelines step by step: every sampler and schedule,
//! guidance on and off, a prompt past 77 tokens, v-prediction, img2img, and inpainting with a
//! 9-channel and an ordinary UNet (`tools/reference/make_pipeline_dumps.py`). Per-step latents must
//! agree within 1e-3 of their scale, the final image within 1e-3 in [0, 1].

use serde_json::Value;
use studio_engine::Tensor;
use studio_engine::pipeline::{CancelToken, Outcome, Pipeline};
use studio_engine::request::{GenerationRequest, Sampler, Schedule};
use studio_tests::{Reference, assert_close, fixtures, load_model, max_error};

const STEP_TOLERANCE: f32 = 1e-3;
const IMAGE_TOLERANCE: f32 = 1e-3;

fn cases() -> Vec<Value> {
    let path = fixtures().join("reference/pipeline/cases.json");
    serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn png(name: &str) -> image::DynamicImage {
    image::open(fixtures().join("reference/pipeline").join(name)).unwrap()
}

pub fn request(case: &Value) -> GenerationRequest {
    let text = |k: &str| case[k].as_str().unwrap().to_owned();
    let mode = text("mode");
    GenerationRequest {
        prompt: text("prompt"),
        negative_prompt: text("negative_prompt"),
        seed: case["seed"].as_u64().unwrap(),
        width: 64,
        height: 64,
        steps: case["steps"].as_u64().unwrap() as usize,
        cfg_scale: case["cfg_scale"].as_f64().unwrap() as f32,
        sampler: Sampler::from_id(&text("sampler")).unwrap(),
        schedule: Schedule::from_id(&text("schedule")).unwrap(),
        strength: case["strength"].as_f64().unwrap() as f32,
        mask_blur: 0,
        init_image: (mode != "txt2img").then(|| png("init.png").to_rgb8()),
        mask: (mode == "inpaint").then(|| png("mask.png").to_luma8()),
        ..GenerationRequest::default()
    }
}

/// diffusers' DDIM, DPM-Solver and LCM schedulers hold `x_t = x / √(σ² + 1)` between steps.
fn works_on_x_t(sampler: Sampler) -> bool {
    matches!(sampler, Sampler::Ddim | Sampler::DpmPp2m | Sampler::Lcm)
}

fn check(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let models = load_model(case["model"].as_str().unwrap());
    let pipeline = Pipeline {
        models: &models,
        taesd: None,
    };
    let request = request(case);
    let reference = Reference::load(&format!("pipeline/{name}"));

    let full = models
        .scheduler
        .sigmas(request.sampler, request.schedule, request.steps);
    let timesteps = &reference.get("timesteps").values;
    let (error, _) = max_error(&full.timesteps, timesteps);
    assert!(
        error <= 1e-3,
        "{name}: timesteps {:?}, diffusers {timesteps:?}",
        full.timesteps
    );
    if let Some(sigmas) = reference_sigmas(&reference, request.sampler) {
        let (error, scale) = max_error(&full.sigmas, &sigmas);
        assert!(
            error <= 1e-5 * scale,
            "{name}: sigmas {:?}, diffusers {sigmas:?}",
            full.sigmas
        );
    }

    let mut steps: Vec<(Tensor<4>, f32)> = Vec::new();
    let outcome = pipeline
        .generate(&request, &CancelToken::new(), &mut |event| {
            steps.push((event.latents.clone(), event.next_sigma))
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let Outcome::Finished(images) = outcome else {
        panic!("{name} was cancelled")
    };
    let expected_steps = (0..)
        .take_while(|i| reference_has(&reference, &format!("step{i}")))
        .count();
    assert_eq!(steps.len(), expected_steps, "{name}: step count");
    for (i, (latents, sigma)) in steps.iter().enumerate() {
        let latents = if works_on_x_t(request.sampler) {
            latents.clone().div_scalar((sigma * sigma + 1.0).sqrt())
        } else {
            latents.clone()
        };
        assert_close(
            &format!("{name} step {i}"),
            latents,
            reference.get(&format!("step{i}")),
            STEP_TOLERANCE,
        );
    }

    let last = steps.last().unwrap().0.clone();
    let sigmas = full.starting_at(full.steps() - steps.len());
    let decoded = pipeline
        .decode(last, &sigmas)
        .permute([0, 2, 3, 1])
        .reshape([64, 64, 3]);
    let expected = reference.get("image");
    let values: Vec<f32> = decoded.into_data().try_to_vec::<f32>().unwrap();
    let (error, _) = max_error(&values, &expected.values);
    assert!(
        error <= IMAGE_TOLERANCE,
        "{name}: final image differs by {error:e}"
    );

    // The 8-bit result is that image, with the original put back outside a hard mask.
    let image = &images[0].image;
    let init = request.init_image.as_ref();
    for (x, y, pixel) in image.enumerate_pixels() {
        let keep = request
            .mask
            .as_ref()
            .is_some_and(|m| m.get_pixel(x, y)[0] < 128);
        if keep {
            assert_eq!(
                pixel,
                init.unwrap().get_pixel(x, y),
                "{name}: kept pixel ({x}, {y}) changed"
            );
        } else {
            for c in 0..3 {
                let want = values[((y * 64 + x) * 3) as usize + c] * 255.0;
                assert!(
                    (f32::from(pixel[c]) - want).abs() <= 0.5 + 1e-3,
                    "{name}: pixel ({x}, {y})"
                );
            }
        }
    }
}

fn reference_has(reference: &Reference, name: &str) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reference.get(name).values.len()
    }))
    .is_ok()
}

/// diffusers keeps σ for the samplers that work in σ; DDIM and LCM have none to compare.
fn reference_sigmas(reference: &Reference, sampler: Sampler) -> Option<Vec<f32>> {
    matches!(sampler, Sampler::Euler | Sampler::EulerA | Sampler::DpmPp2m)
        .then(|| reference.get("sigmas").values.clone())
}

macro_rules! cases {
    ($($test:ident: $case:literal,)*) => {
        $(
            #[test]
            fn $test() {
                let case = cases().into_iter().find(|c| c["name"] == $case).expect($case);
                check(&case);
            }
        )*

        #[test]
        fn every_dumped_case_has_a_test() {
            let tested = [$($case),*];
            for case in cases() {
                let name = case["name"].as_str().unwrap().to_owned();
                assert!(tested.contains(&name.as_str()), "no test for {name}");
            }
        }
    };
}

cases! {
    txt2img_euler_normal: "txt2img_euler_normal",
    txt2img_euler_karras: "txt2img_euler_karras",
    txt2img_euler_trailing: "txt2img_euler_trailing",
    txt2img_euler_a_normal: "txt2img_euler_a_normal",
    txt2img_euler_a_trailing: "txt2img_euler_a_trailing",
    txt2img_ddim_normal: "txt2img_ddim_normal",
    txt2img_ddim_trailing: "txt2img_ddim_trailing",
    txt2img_dpmpp_2m_normal: "txt2img_dpmpp_2m_normal",
    txt2img_dpmpp_2m_karras: "txt2img_dpmpp_2m_karras",
    txt2img_dpmpp_2m_trailing: "txt2img_dpmpp_2m_trailing",
    txt2img_lcm_normal: "txt2img_lcm_normal",
    txt2img_euler_no_cfg: "txt2img_euler_no_cfg",
    txt2img_dpmpp_2m_six_steps: "txt2img_dpmpp_2m_six_steps",
    txt2img_long_prompt_is_chunked: "txt2img_long_prompt",
    sd2_vpred_euler: "sd2_vpred_euler",
    sd2_vpred_ddim: "sd2_vpred_ddim",
    img2img_euler: "img2img_euler",
    img2img_euler_a: "img2img_euler_a",
    img2img_ddim: "img2img_ddim",
    inpaint_nine_channel_euler: "inpaint9_euler",
    inpaint_nine_channel_euler_a: "inpaint9_euler_a",
    inpaint_nine_channel_partial_strength: "inpaint9_euler_strength",
    inpaint_ordinary_unet_euler: "inpaint4_euler",
    inpaint_ordinary_unet_ddim_partial_strength: "inpaint4_ddim_strength",
}
