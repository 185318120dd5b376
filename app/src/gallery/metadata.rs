//! PNG files that carry how they were made, in the forms other tools read: AUTOMATIC1111's
//! `parameters` text (read by A1111, ComfyUI, InvokeAI and image sites), the full request as lossless
//! JSON (`studio`), and an XMP packet marking the image as AI-generated (IPTC digital source type).
//! Files are written to a temporary sibling and linked into place, so a crash or a cancel never
//! leaves half a file, and an existing file is never replaced.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use studio_engine::request::Mode;
use studio_engine::{GenerationRequest, Sampler, Schedule};

/// The `studio` chunk: the request (without its images) and what the image came out of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    pub request: GenerationRequest,
    /// The seed of this image (the request's seed plus its place in the batch).
    pub seed: u64,
    pub model_name: String,
    /// A1111's "AutoV2" hash: the first 10 hex digits of the checkpoint file's SHA-256.
    pub model_hash: Option<String>,
    /// Whether an init image was used (img2img, inpainting, outpainting).
    pub from_image: bool,
    pub inpainted: bool,
    pub version: String,
}

impl ImageMetadata {
    pub fn new(
        request: &GenerationRequest,
        seed: u64,
        model_name: &str,
        model_hash: Option<String>,
    ) -> Self {
        let mode = request.mode();
        let mut request = request.clone();
        request.init_image = None;
        request.mask = None;
        Self {
            request,
            seed,
            model_name: model_name.to_owned(),
            model_hash,
            from_image: mode != Mode::TextToImage,
            inpainted: matches!(mode, Mode::Inpaint | Mode::Outpaint),
            version: format!("studio {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The A1111 `parameters` text.
    pub fn a1111_parameters(&self) -> String {
        let r = &self.request;
        let (width, height) = r.canvas_size();
        let mut out = r.prompt.clone();
        if !r.negative_prompt.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&r.negative_prompt);
        }
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", r.steps.to_string()),
            ("Sampler", r.sampler.a1111_name().to_owned()),
            ("Schedule type", r.schedule.a1111_name().to_owned()),
            ("CFG scale", format_number(r.cfg_scale)),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{width}x{height}")),
        ];
        if let Some(hash) = &self.model_hash {
            fields.push(("Model hash", hash.clone()));
        }
        fields.push(("Model", self.model_name.clone()));
        if self.from_image {
            fields.push(("Denoising strength", format_number(r.strength)));
        }
        if self.inpainted {
            fields.push(("Mask blur", r.mask_blur.to_string()));
        }
        fields.push(("Version", self.version.clone()));
        let fields: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("{k}: {}", quote(&v)))
            .collect();
        out.push('\n');
        out.push_str(&fields.join(", "));
        out
    }
}

fn format_number(value: f32) -> String {
    let text = format!("{value}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

/// A1111 quotes values holding its separators.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n', '"']) {
        serde_json::to_string(value).expect("strings serialise")
    } else {
        value.to_owned()
    }
}

const XMP_KEYWORD: &str = "XML:com.adobe.xmp";
const STUDIO_KEYWORD: &str = "studio";

fn xmp(composite: bool) -> String {
    let source = if composite {
        "compositeWithTrainedAlgorithmicMedia"
    } else {
        "trainedAlgorithmicMedia"
    };
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n \
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  \
         <rdf:Description rdf:about=\"\" xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\">\n   \
         <Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/{source}</Iptc4xmpExt:DigitalSourceType>\n  \
         </rdf:Description>\n \
         </rdf:RDF>\n\
         </x:xmpmeta>\n\
         <?xpacket end=\"w\"?>"
    )
}

/// The PNG bytes of `image` with its metadata.
pub fn encode_png(image: &RgbImage, metadata: &ImageMetadata) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let parameters = metadata.a1111_parameters();
    // tEXt holds Latin-1 only; anything else goes in an iTXt chunk, as PIL (and so A1111) does.
    if parameters.chars().all(|c| (c as u32) < 256) {
        encoder.add_text_chunk("parameters".into(), parameters)?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters)?;
    }
    encoder.add_itxt_chunk(STUDIO_KEYWORD.into(), serde_json::to_string(metadata)?)?;
    encoder.add_itxt_chunk(XMP_KEYWORD.into(), xmp(metadata.inpainted))?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(bytes)
}

/// Writes `bytes` to `path` only if nothing is there, atomically: readers see either no file or the
/// whole file.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; choose another name (or pass --overwrite)",
            path.display()
        );
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = temporary_sibling(path);
    let written = (|| -> Result<()> {
        let mut file = BufWriter::new(
            File::create(&temp).with_context(|| format!("cannot write in {}", dir.display()))?,
        );
        file.write_all(bytes)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        // A hard link fails if the name was taken meanwhile, where a rename would replace it.
        std::fs::hard_link(&temp, path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&temp);
    written.with_context(|| format!("writing {} failed (is the disk full?)", path.display()))
}

/// Writes `bytes` to `path`, replacing what is there, atomically.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temporary_sibling(path);
    let written = (|| -> Result<()> {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.with_context(|| format!("writing {} failed (is the disk full?)", path.display()))
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// A1111's "Model hash" of a single-file checkpoint (folders have none).
pub fn model_hash(path: &Path) -> Option<String> {
    if !path.is_file() {
        return None;
    }
    let mut file = File::open(path).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    let digest = hasher.finalize();
    Some(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}

/// Everything an image file says about how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundMetadata {
    pub request: GenerationRequest,
    /// The seed of this very image.
    pub seed: u64,
    pub model: Option<String>,
    /// Which convention it was read from.
    pub source: &'static str,
}

/// The text chunks of a PNG, by keyword.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().context("not a readable PNG")?;
    let info = reader.info();
    let mut chunks: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.compressed_latin1_text {
        if let Ok(text) = chunk.get_text() {
            chunks.push((chunk.keyword.clone(), text));
        }
    }
    for chunk in &info.utf8_text {
        if let Ok(text) = chunk.get_text() {
            chunks.push((chunk.keyword.clone(), text));
        }
    }
    Ok(chunks)
}

/// The generation parameters of a PNG written by the studio or by A1111.
pub fn read_metadata(bytes: &[u8]) -> Result<Option<FoundMetadata>> {
    let chunks = png_text_chunks(bytes)?;
    let find = |key: &str| {
        chunks
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if let Some(json) = find(STUDIO_KEYWORD)
        && let Ok(meta) = serde_json::from_str::<ImageMetadata>(json)
    {
        let mut request = meta.request;
        request.seed = meta.seed;
        request.batch = 1;
        return Ok(Some(FoundMetadata {
            request,
            seed: meta.seed,
            model: Some(meta.model_name),
            source: "studio",
        }));
    }
    if let Some(found) = find("parameters").and_then(parse_a1111) {
        return Ok(Some(found));
    }
    if let Some(found) = find("prompt").and_then(parse_comfyui) {
        return Ok(Some(found));
    }
    Ok(find("invokeai_metadata").and_then(parse_invokeai))
}

/// ComfyUI's `prompt` chunk: the executed node graph. The sampler node's inputs, the texts of the
/// prompts wired to it and the empty latent's size give the parameters.
pub fn parse_comfyui(json: &str) -> Option<FoundMetadata> {
    let graph: serde_json::Value = serde_json::from_str(json).ok()?;
    let nodes = graph.as_object()?;
    let (_, sampler) = nodes.iter().find(|(_, n)| {
        matches!(
            n["class_type"].as_str(),
            Some("KSampler" | "KSamplerAdvanced")
        )
    })?;
    let inputs = &sampler["inputs"];
    let linked =
        |key: &str| -> Option<&serde_json::Value> { nodes.get(inputs[key].get(0)?.as_str()?) };
    let text = |key: &str| {
        linked(key)
            .and_then(|n| n["inputs"]["text"].as_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let seed = inputs["seed"]
        .as_u64()
        .or_else(|| inputs["noise_seed"].as_u64())
        .unwrap_or(0);
    let mut request = GenerationRequest {
        prompt: text("positive"),
        negative_prompt: text("negative"),
        seed,
        batch: 1,
        ..GenerationRequest::default()
    };
    if let Some(steps) = inputs["steps"].as_u64() {
        request.steps = steps as usize;
    }
    if let Some(cfg) = inputs["cfg"].as_f64() {
        request.cfg_scale = cfg as f32;
    }
    request.sampler = match inputs["sampler_name"].as_str() {
        Some("euler_ancestral") => Sampler::EulerA,
        Some("ddim") => Sampler::Ddim,
        Some("dpmpp_2m") => Sampler::DpmPp2m,
        Some("lcm") => Sampler::Lcm,
        _ => Sampler::Euler,
    };
    request.schedule = match inputs["scheduler"].as_str() {
        Some("karras") => Schedule::Karras,
        Some("sgm_uniform") => Schedule::Trailing,
        _ => Schedule::Normal,
    };
    if let Some(denoise) = inputs["denoise"].as_f64().filter(|d| *d < 1.0) {
        request.strength = denoise as f32;
    }
    if let Some(latent) = linked("latent_image") {
        request.width = latent["inputs"]["width"]
            .as_u64()
            .map_or(request.width, |w| w as u32);
        request.height = latent["inputs"]["height"]
            .as_u64()
            .map_or(request.height, |h| h as u32);
    }
    let model = nodes
        .values()
        .find(|n| n["class_type"].as_str() == Some("CheckpointLoaderSimple"))
        .and_then(|n| n["inputs"]["ckpt_name"].as_str())
        .map(str::to_owned);
    Some(FoundMetadata {
        request,
        seed,
        model,
        source: "ComfyUI",
    })
}

/// InvokeAI's `invokeai_metadata` chunk.
pub fn parse_invokeai(json: &str) -> Option<FoundMetadata> {
    let meta: serde_json::Value = serde_json::from_str(json).ok()?;
    let seed = meta["seed"].as_u64().unwrap_or(0);
    let mut request = GenerationRequest {
        prompt: meta["positive_prompt"].as_str()?.to_owned(),
        negative_prompt: meta["negative_prompt"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        seed,
        batch: 1,
        ..GenerationRequest::default()
    };
    if let Some(steps) = meta["steps"].as_u64() {
        request.steps = steps as usize;
    }
    if let Some(cfg) = meta["cfg_scale"].as_f64() {
        request.cfg_scale = cfg as f32;
    }
    request.width = meta["width"].as_u64().map_or(request.width, |w| w as u32);
    request.height = meta["height"].as_u64().map_or(request.height, |h| h as u32);
    if let Some(scheduler) = meta["scheduler"].as_str() {
        // InvokeAI names a Karras schedule with a `_k` suffix ("dpmpp_2m_k").
        let (name, karras) = scheduler
            .strip_suffix("_k")
            .map_or((scheduler, false), |n| (n, true));
        request.sampler = match name {
            "euler_a" => Sampler::EulerA,
            "ddim" => Sampler::Ddim,
            "dpmpp_2m" => Sampler::DpmPp2m,
            "lcm" => Sampler::Lcm,
            _ => Sampler::Euler,
        };
        if karras {
            request.schedule = Schedule::Karras;
        }
    }
    if let Some(strength) = meta["strength"].as_f64() {
        request.strength = strength as f32;
    }
    let model = meta["model"]["name"].as_str().map(str::to_owned);
    Some(FoundMetadata {
        request,
        seed,
        model,
        source: "InvokeAI",
    })
}

/// Reads A1111's `parameters` text: prompt lines, an optional `Negative prompt:` part, and a last
/// line of `Key: value` pairs.
pub fn parse_a1111(text: &str) -> Option<FoundMetadata> {
    let text = text.trim_end();
    let (body, fields) = match text.rfind('\n') {
        Some(at) if text[at + 1..].contains("Steps: ") => (&text[..at], &text[at + 1..]),
        _ if text.starts_with("Steps: ") => ("", text),
        _ => (text, ""),
    };
    let (prompt, negative) = match body.find("Negative prompt:") {
        Some(at) => (
            body[..at].trim_end(),
            body[at + "Negative prompt:".len()..].trim(),
        ),
        None => (body, ""),
    };
    let fields = parse_fields(fields);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let mut request = GenerationRequest {
        prompt: prompt.to_owned(),
        negative_prompt: negative.to_owned(),
        batch: 1,
        ..GenerationRequest::default()
    };
    if let Some(steps) = get("Steps").and_then(|v| v.parse().ok()) {
        request.steps = steps;
    }
    if let Some(sampler) = get("Sampler") {
        // Older A1111 versions put the schedule in the sampler name ("DPM++ 2M Karras").
        let (name, karras) = match sampler.strip_suffix(" Karras") {
            Some(name) => (name, true),
            None => (sampler, false),
        };
        if let Some(sampler) = Sampler::from_a1111_name(name) {
            request.sampler = sampler;
        }
        if karras {
            request.schedule = Schedule::Karras;
        }
    }
    if let Some(schedule) = get("Schedule type") {
        request.schedule = Schedule::ALL
            .into_iter()
            .find(|s| s.a1111_name().eq_ignore_ascii_case(schedule))
            .unwrap_or(request.schedule);
    }
    if let Some(cfg) = get("CFG scale").and_then(|v| v.parse().ok()) {
        request.cfg_scale = cfg;
    }
    let seed = get("Seed").and_then(|v| v.parse().ok()).unwrap_or(0);
    request.seed = seed;
    if let Some((w, h)) = get("Size").and_then(|v| v.split_once('x')) {
        request.width = w.trim().parse().unwrap_or(request.width);
        request.height = h.trim().parse().unwrap_or(request.height);
    }
    if let Some(strength) = get("Denoising strength").and_then(|v| v.parse().ok()) {
        request.strength = strength;
    }
    if let Some(blur) = get("Mask blur").and_then(|v| v.parse().ok()) {
        request.mask_blur = blur;
    }
    Some(FoundMetadata {
        request,
        seed,
        model: get("Model").map(str::to_owned),
        source: "A1111",
    })
}

/// `Key: value, Key: "quoted, value", …`
fn parse_fields(line: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut rest = line.trim();
    while let Some(colon) = rest.find(": ") {
        let key = rest[..colon].trim().to_owned();
        rest = &rest[colon + 2..];
        let value;
        if rest.starts_with('"') {
            let mut end = 1;
            let bytes = rest.as_bytes();
            while end < bytes.len() && (bytes[end] != b'"' || bytes[end - 1] == b'\\') {
                end += 1;
            }
            value = serde_json::from_str::<String>(&rest[..(end + 1).min(rest.len())])
                .unwrap_or_else(|_| rest[1..end.min(rest.len())].to_owned());
            rest = rest.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        fields.push((key, value));
        rest = rest.trim_start_matches(',').trim_start();
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> ImageMetadata {
        let request = GenerationRequest {
            prompt: "a café, at night: 🌃".into(),
            negative_prompt: "blurry, low quality".into(),
            seed: 41,
            steps: 25,
            cfg_scale: 6.5,
            sampler: Sampler::DpmPp2m,
            schedule: Schedule::Karras,
            width: 640,
            height: 448,
            ..GenerationRequest::default()
        };
        ImageMetadata::new(&request, 42, "v1-5-pruned", Some("6ce0161689".into()))
    }

    #[test]
    fn parameters_follow_a1111() {
        let text = metadata().a1111_parameters();
        assert_eq!(
            text,
            "a café, at night: 🌃\nNegative prompt: blurry, low quality\nSteps: 25, Sampler: DPM++ 2M, \
             Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 640x448, Model hash: 6ce0161689, \
             Model: v1-5-pruned, Version: studio 0.1.0"
        );
    }

    #[test]
    fn png_round_trips_every_chunk() {
        let image = RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        let bytes = encode_png(&image, &metadata()).unwrap();
        let chunks = png_text_chunks(&bytes).unwrap();
        let keys: Vec<&str> = chunks.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            keys.contains(&"parameters") && keys.contains(&"studio") && keys.contains(&XMP_KEYWORD)
        );
        let xmp = &chunks.iter().find(|(k, _)| k == XMP_KEYWORD).unwrap().1;
        assert!(xmp.contains("digitalsourcetype/trainedAlgorithmicMedia"));
        let found = read_metadata(&bytes).unwrap().unwrap();
        assert_eq!(found.source, "studio");
        assert_eq!(found.seed, 42);
        assert_eq!(found.request.prompt, "a café, at night: 🌃");
        assert_eq!(found.request.sampler, Sampler::DpmPp2m);
        assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8(), image);
    }

    #[test]
    fn a1111_text_parses_back() {
        let found = parse_a1111(&metadata().a1111_parameters()).unwrap();
        let r = &found.request;
        assert_eq!(
            (r.prompt.as_str(), r.negative_prompt.as_str()),
            ("a café, at night: 🌃", "blurry, low quality")
        );
        assert_eq!(
            (r.steps, r.cfg_scale, found.seed, r.width, r.height),
            (25, 6.5, 42, 640, 448)
        );
        assert_eq!(
            (r.sampler, r.schedule),
            (Sampler::DpmPp2m, Schedule::Karras)
        );
        assert_eq!(found.model.as_deref(), Some("v1-5-pruned"));
        let old = parse_a1111(
            "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 9, Size: 512x512",
        )
        .unwrap();
        assert_eq!(
            (old.request.sampler, old.request.schedule, old.seed),
            (Sampler::DpmPp2m, Schedule::Karras, 9)
        );
    }

    #[test]
    fn comfyui_and_invokeai_metadata_restore() {
        let comfy = r#"{"3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
            "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0, "model": ["4", 0],
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}}}"#;
        let found = parse_comfyui(comfy).unwrap();
        let r = &found.request;
        assert_eq!(
            (r.prompt.as_str(), r.negative_prompt.as_str()),
            ("beautiful scenery", "text, watermark")
        );
        assert_eq!(
            (found.seed, r.steps, r.cfg_scale, r.width, r.height),
            (156680208700286, 20, 8.0, 512, 768)
        );
        assert_eq!(
            (r.sampler, r.schedule),
            (Sampler::DpmPp2m, Schedule::Karras)
        );
        assert_eq!(
            found.model.as_deref(),
            Some("v1-5-pruned-emaonly.safetensors")
        );

        let invoke = r#"{"positive_prompt": "a castle", "negative_prompt": "fog", "width": 640, "height": 448,
            "seed": 99, "cfg_scale": 6.0, "steps": 30, "scheduler": "euler_a", "model": {"name": "dreamshaper"}}"#;
        let found = parse_invokeai(invoke).unwrap();
        assert_eq!(
            (
                found.request.prompt.as_str(),
                found.seed,
                found.request.sampler
            ),
            ("a castle", 99, Sampler::EulerA)
        );
        assert_eq!(found.model.as_deref(), Some("dreamshaper"));
    }

    #[test]
    fn existing_files_are_never_replaced() {
        let dir = std::env::temp_dir().join(format!("studio-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.png");
        let _ = std::fs::remove_file(&path);
        write_new_file(&path, b"first").unwrap();
        let error = write_new_file(&path, b"second").unwrap_err().to_string();
        assert!(error.contains("already exists"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
