//! Where the studio follows A1111 rather than diffusers: emphasis, 75-token chunks, outpainting.
//! These check the properties themselves.

use studio_engine::pipeline::{CancelToken, Outcome, Pipeline};
use studio_engine::prompt::tokenize;
use studio_engine::tokenizer::{ClipTokenizer, PadToken};
use studio_engine::{GenerationRequest, Outpaint, Tensor};
use studio_tests::{load_model, max_error};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn long_prompts_are_cut_into_chunks_at_a_recent_comma() {
    let tokenizer = ClipTokenizer::builtin(&PadToken::EndOfText).unwrap();
    // 70 tokens, a comma, then more: the chunk ends after the comma rather than mid-phrase.
    let prompt = format!(
        "{}, a small red boat on a calm lake at dawn",
        ["cat"; 70].join(" ")
    );
    let tokens = tokenize(&tokenizer, &prompt).unwrap();
    assert_eq!(tokens.chunks.len(), 2);
    assert_eq!(tokens.token_count, 70 + 1 + 10);
    let first = &tokens.chunks[0].ids;
    assert_eq!(first.len(), 77);
    assert_eq!(first[71], 267, "the first chunk ends with the comma");
    assert_eq!(first[72], 49407);
    let second = &tokens.chunks[1].ids;
    assert_eq!(
        &second[..2],
        &[49406, 320],
        "the second chunk starts with the words after it"
    );
    let breaks = tokenize(&tokenizer, "a cat BREAK a dog").unwrap();
    assert_eq!(breaks.chunks.len(), 2);
}

#[test]
fn emphasis_scales_the_weighted_tokens_and_keeps_the_mean() {
    let models = load_model("sd1");
    let pipeline = Pipeline {
        models: &models,
        taesd: None,
    };
    let plain = pipeline.conditioning("a fox in snow", None).unwrap();
    let weighted = pipeline.conditioning("a (fox:1.5) in snow", None).unwrap();
    let (p, w) = (values(plain.clone()), values(weighted.clone()));
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        (mean(&p) - mean(&w)).abs() <= 1e-4 * mean(&p).abs().max(1e-3),
        "the chunk mean is kept"
    );
    let width = 64;
    let token = |v: &[f32], i: usize| v[i * width..(i + 1) * width].to_vec();
    // Token 2 is "fox": scaled by 1.5 before the mean correction.
    let ratio: Vec<f32> = token(&w, 2)
        .iter()
        .zip(token(&p, 2))
        .map(|(a, b)| a / b)
        .collect();
    let correction = mean(&p)
        / mean(
            &p.iter()
                .enumerate()
                .map(|(i, v)| if i / width == 2 { v * 1.5 } else { *v })
                .collect::<Vec<_>>(),
        );
    for r in ratio {
        assert!((r - 1.5 * correction).abs() < 1e-3, "ratio {r}");
    }
    let (error, _) = max_error(
        &token(&w, 4),
        &token(&p, 4)
            .iter()
            .map(|v| v * correction)
            .collect::<Vec<_>>(),
    );
    assert!(
        error < 1e-4,
        "unweighted tokens only get the mean correction"
    );
    // Negative and positive halves get the same number of chunks.
    let long = "a cat ".repeat(50);
    let both = pipeline.conditioning(&long, Some("(blurry:1.3)")).unwrap();
    assert_eq!(both.dims(), [2, 154, 64]);
    // Both halves come from one pass of the text encoder: each must be what encoding its prompt
    // alone gives, weights included (the negative's second chunk is the empty prompt's).
    let halves = both.chunk(2, 0);
    let alone = [
        pipeline.conditioning("(blurry:1.3)", None).unwrap(),
        pipeline.conditioning(&long, None).unwrap(),
    ];
    let empty = pipeline.conditioning("", None).unwrap();
    let expected = [
        Tensor::cat(vec![alone[0].clone(), empty], 1),
        alone[1].clone(),
    ];
    for (half, expected) in halves.into_iter().zip(expected) {
        let (error, _) = max_error(&values(half), &values(expected));
        assert!(
            error < 1e-4,
            "a half differs from its prompt alone by {error}"
        );
    }
}

#[test]
fn outpainting_grows_the_canvas_and_keeps_the_image_away_from_the_seam() {
    let models = load_model("sd1-inpaint");
    let pipeline = Pipeline {
        models: &models,
        taesd: None,
    };
    let init = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 90]));
    let request = GenerationRequest {
        prompt: "a wider view".into(),
        steps: 3,
        init_image: Some(init.clone()),
        outpaint: Outpaint {
            left: 32,
            top: 0,
            right: 0,
            bottom: 16,
        },
        mask_blur: 4,
        ..GenerationRequest::default()
    };
    let Outcome::Finished(images) = pipeline
        .generate(&request, &CancelToken::new(), &mut |_| {})
        .unwrap()
    else {
        panic!("cancelled")
    };
    let out = &images[0].image;
    assert_eq!(out.dimensions(), (96, 80));
    // Beyond the seam band (8 px repainted into the image, then a Gaussian feather of σ = 2 px that
    // reaches 3σ further) the original pixels come back exactly.
    for y in 0..64 - 8 - 8 {
        for x in 32 + 16..96 {
            assert_eq!(out.get_pixel(x, y), init.get_pixel(x - 32, y), "({x}, {y})");
        }
    }
}
