//! `studio generate`: the engine without the window. It loads the model on the engine thread,
//! queues one job, draws a progress bar on stderr and writes PNGs with metadata; Ctrl-C cancels
//! before the next model evaluation and writes nothing unfinished.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use studio_engine::device::Backend;
use studio_engine::{Checkpoint, Engine, Event, GenerationRequest, Outpaint, Sampler, Schedule};

use crate::app::{display_name, random_seed};
use crate::gallery::metadata::{
    ImageMetadata, encode_png, model_hash, replace_file, write_new_file,
};

/// A native AI image studio: Stable Diffusion 1.x/2.x on your GPU or CPU. Without a command it
/// opens the studio window.
#[derive(Debug, Parser)]
#[command(name = "studio", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Open the studio with this model (a .safetensors file or a diffusers folder) loaded.
    pub model: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images headless, as the studio would.
    Generate(GenerateArgs),
    /// Measure speed and memory at Stable Diffusion 1.5's sizes (random weights).
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers model folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Seed of the first image (random when omitted; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f32,
    /// Image width; defaults to the model's native size (or the init image's). Rounded to a
    /// multiple of 8.
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long, default_value = "euler", value_parser = parse_sampler)]
    pub sampler: Sampler,
    #[arg(long, default_value = "normal", value_parser = parse_schedule)]
    pub schedule: Schedule,
    /// Init image for img2img, inpainting or outpainting.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// How much of the init image is re-noised (0..1).
    #[arg(long, default_value_t = 0.75)]
    pub strength: f32,
    /// Inpainting mask, white where the image is repainted (same size as --init).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Feather, in pixels, of the mask's edge when compositing.
    #[arg(long, default_value_t = 4)]
    pub mask_blur: u32,
    /// Pixels to add on each side of --init before outpainting: LEFT,TOP,RIGHT,BOTTOM.
    #[arg(long, value_parser = parse_outpaint)]
    pub outpaint: Option<Outpaint>,
    /// Number of images, with seeds seed, seed+1, …
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    pub backend: Backend,
    /// A TAESD (AutoencoderTiny) for full-resolution previews.
    #[arg(long)]
    pub taesd: Option<PathBuf>,
    /// Save the preview of every step into this folder.
    #[arg(long)]
    pub preview_dir: Option<PathBuf>,
    /// Output PNG; a batch writes NAME-1.png, NAME-2.png, …
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing output files instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    Sampler::from_id(s).ok_or_else(|| {
        format!(
            "unknown sampler '{s}': use {}",
            ids(Sampler::ALL.map(Sampler::id))
        )
    })
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    Schedule::from_id(s).ok_or_else(|| {
        format!(
            "unknown schedule '{s}': use {}",
            ids(Schedule::ALL.map(Schedule::id))
        )
    })
}

fn ids<const N: usize>(ids: [&str; N]) -> String {
    ids.join(", ")
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
        .map_err(|e: studio_engine::EngineError| e.to_string())
}

fn parse_outpaint(s: &str) -> Result<Outpaint, String> {
    let values: Vec<u32> = s
        .split(',')
        .map(|v| v.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not LEFT,TOP,RIGHT,BOTTOM in pixels"))?;
    let [left, top, right, bottom] = values[..] else {
        return Err(format!("'{s}' needs four numbers: LEFT,TOP,RIGHT,BOTTOM"));
    };
    Ok(Outpaint {
        left,
        top,
        right,
        bottom,
    })
}

/// `value` rounded to the nearest multiple of 8, with a warning when that changes it.
fn snap_to_8(name: &str, value: u32) -> u32 {
    let snapped = ((value + 4) / 8 * 8).max(8);
    if snapped != value {
        eprintln!("warning: {name} {value} is not a multiple of 8; using {snapped}");
    }
    snapped
}

/// The files a batch writes.
pub fn output_paths(out: &Path, batch: u32) -> Vec<PathBuf> {
    if batch == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (1..=batch)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{extension}")))
        .collect()
}

fn load_image(path: &Path) -> Result<image::DynamicImage> {
    image::open(path).with_context(|| format!("cannot read the image {}", path.display()))
}

/// Builds the request from the arguments, with the model family's defaults.
fn request(args: &GenerateArgs, native: u32) -> Result<GenerationRequest> {
    if args.mask.is_some() && args.init.is_none() {
        bail!("--mask needs --init: the image to repaint");
    }
    let init = args
        .init
        .as_deref()
        .map(load_image)
        .transpose()?
        .map(|i| i.to_rgb8());
    let mask = args
        .mask
        .as_deref()
        .map(load_image)
        .transpose()?
        .map(|m| m.to_luma8());
    let (default_w, default_h) = init.as_ref().map_or((native, native), |i| i.dimensions());
    let width = snap_to_8("width", args.width.unwrap_or(default_w));
    let height = snap_to_8("height", args.height.unwrap_or(default_h));
    let resize = |image: image::RgbImage| {
        if image.dimensions() == (width, height) || args.outpaint.is_some() {
            image
        } else {
            eprintln!(
                "note: resizing the init image from {}×{} to {width}×{height}",
                image.width(),
                image.height()
            );
            image::imageops::resize(&image, width, height, image::imageops::FilterType::Lanczos3)
        }
    };
    let init = init.map(resize);
    if let (Some(init), Some(mask)) = (&init, &mask)
        && init.dimensions() != mask.dimensions()
        && args.width.is_none()
    {
        bail!(
            "the mask is {}×{} but the init image is {}×{}; they must be the same size",
            mask.width(),
            mask.height(),
            init.width(),
            init.height()
        );
    }
    let mask = match (&init, mask) {
        (Some(init), Some(mask)) if mask.dimensions() != init.dimensions() => {
            Some(image::imageops::resize(
                &mask,
                init.width(),
                init.height(),
                image::imageops::FilterType::Nearest,
            ))
        }
        (_, mask) => mask,
    };
    let outpaint = args.outpaint.map(|o| Outpaint {
        left: snap_to_8("outpaint left", o.left),
        top: snap_to_8("outpaint top", o.top),
        right: snap_to_8("outpaint right", o.right),
        bottom: snap_to_8("outpaint bottom", o.bottom),
    });
    let request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        seed: args.seed.unwrap_or_else(random_seed),
        width,
        height,
        steps: args.steps,
        cfg_scale: args.cfg,
        sampler: args.sampler,
        schedule: args.schedule,
        strength: args.strength,
        mask_blur: args.mask_blur,
        outpaint: outpaint.unwrap_or_default(),
        batch: args.batch,
        init_image: init,
        mask,
        ..GenerationRequest::default()
    };
    request.validate()?;
    Ok(request)
}

/// Runs `studio generate`.
pub fn generate(args: GenerateArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status when Ctrl-C (or SIGTERM) cancelled the job.
const CANCELLED: u8 = 130;

fn run(args: &GenerateArgs) -> Result<ExitCode> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let family = checkpoint.family();
    let request = request(args, family.native_size() as u32)?;
    let outputs = output_paths(&args.out, request.batch);
    if !args.overwrite
        && let Some(existing) = outputs.iter().find(|p| p.exists())
    {
        bail!(
            "{} already exists; choose another --out or pass --overwrite",
            existing.display()
        );
    }
    if let Some(dir) = &args.preview_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    eprintln!("seed: {}", request.seed);
    let model_name = display_name(&args.model);
    let hash_path = args.model.clone();
    let hashing = std::thread::spawn(move || model_hash(&hash_path));

    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let mut engine = Engine::spawn(|| {});
    engine.load_model(args.model.clone(), args.backend, args.taesd.clone());
    eprintln!("loading {} ({})…", args.model.display(), family.name());
    loop {
        if interrupted.load(Ordering::SeqCst) {
            eprintln!("cancelled while loading; nothing was written");
            return Ok(ExitCode::from(CANCELLED));
        }
        match engine.recv_timeout(Duration::from_millis(100)) {
            Some(Event::ModelLoaded {
                device, seconds, ..
            }) => {
                eprintln!("loaded in {seconds:.1} s on {device}");
                break;
            }
            Some(Event::ModelFailed { error, .. }) => bail!(error),
            _ => {}
        }
    }

    let model_hash = hashing.join().ok().flatten();
    let job = engine.generate(request.clone());
    let progress = Progress::new(request.steps as u64 * u64::from(request.batch));
    let mut written = 0usize;
    let mut cancelling = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !cancelling {
            cancelling = true;
            engine.cancel(job);
            progress.message("cancelling…");
        }
        let Some(event) = engine.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        match event {
            Event::Progress(p) => progress.update(&p),
            Event::PreviewReady { .. } => {
                if let (Some(dir), Some(preview)) = (&args.preview_dir, engine.take_preview()) {
                    let path = dir.join(format!("preview-{:03}.png", progress.done()));
                    preview
                        .image
                        .save(&path)
                        .with_context(|| format!("cannot save {}", path.display()))?;
                }
            }
            Event::ImageFinished { image, .. } => {
                let path = &outputs[written];
                let metadata =
                    ImageMetadata::new(&request, image.seed, &model_name, model_hash.clone());
                let bytes = encode_png(&image.image, &metadata)?;
                if args.overwrite {
                    replace_file(path, &bytes)?;
                } else {
                    write_new_file(path, &bytes)?;
                }
                progress.println(&format!("wrote {} (seed {})", path.display(), image.seed));
                written += 1;
            }
            Event::JobFinished { seconds, .. } => {
                progress.finish(&format!("done in {seconds:.1} s"));
                return Ok(ExitCode::SUCCESS);
            }
            Event::JobCancelled { at_step, .. } => {
                progress.finish(&format!(
                    "cancelled before step {}; unfinished images were not written",
                    at_step + 1
                ));
                return Ok(ExitCode::from(CANCELLED));
            }
            Event::JobFailed { error, .. } => {
                progress.finish("failed");
                bail!(error);
            }
            _ => {}
        }
    }
}

/// A bar on a terminal; plain lines, at most one a second, when stderr is a file or a pipe.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: std::cell::Cell<u64>,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:32}] step {pos}/{len}  ETA {eta}  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            total,
            done: Default::default(),
            last_line: Default::default(),
        }
    }

    fn done(&self) -> u64 {
        self.done.get()
    }

    fn update(&self, p: &studio_engine::Progress) {
        let done = (p.image * p.steps + p.step) as u64;
        self.done.set(done);
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let due = self
                    .last_line
                    .get()
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || done == self.total {
                    self.last_line.set(Some(Instant::now()));
                    eprintln!(
                        "step {done}/{} ({:.1} s, ETA {:.1} s)",
                        self.total,
                        p.elapsed.as_secs_f32(),
                        p.eta.as_secs_f32()
                    );
                }
            }
        }
    }

    fn message(&self, text: &'static str) {
        match &self.bar {
            Some(bar) => bar.set_message(text),
            None => eprintln!("{text}"),
        }
    }

    fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(text.to_owned()),
            None => eprintln!("{text}"),
        }
    }
}
