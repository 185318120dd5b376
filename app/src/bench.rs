//! `studio bench`: speed and memory at Stable Diffusion 1.5's real sizes (random weights), printed
//! as a table and one JSON line; `--compare OURS TORCH` prints the ratio to diffusers' figures from
//! `tools/reference/bench_torch.py`; `--best-of OUT FILES…` keeps each measurement's best over
//! several runs' JSON files, for machines whose speed moves between runs; `--frames` measures the
//! studio's UI frame time while the engine generates, and while painting a mask on a 2048² canvas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use studio_engine::bench::{BenchConfig, Report, run};
use studio_engine::device::{Backend, select};

use crate::app::StudioApp;
use crate::engine_client::ThreadedEngine;
use crate::state::Settings;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where the models run (cpu, or wgpu on a GPU).
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<Backend>().map_err(|e| e.to_string()))]
    pub backend: Backend,
    /// Largest image side: 512 measures at SD1.5's native size; 256 skips the 512² measurements.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Where the random SD1.5-sized checkpoint (about 4.3 GB) is written.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure the UI's frame time (needs no display): while generating, while painting a 2048²
    /// canvas, and while scrolling a gallery of 1000 images.
    #[arg(long)]
    pub frames: bool,
    /// Measure this checkpoint instead of writing a random SD1.5-sized one (with a small --size,
    /// e.g. the tiny test model on a slow backend).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print ours/torch ratios from two JSON result files instead of measuring.
    #[arg(long, num_args = 2, value_names = ["OURS", "TORCH"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Write to OUT each measurement's best over the JSON result files that follow (the shortest
    /// time, the least memory, the highest rate), instead of measuring.
    #[arg(long, num_args = 2.., value_names = ["OUT", "FILES"])]
    pub best_of: Option<Vec<PathBuf>>,
}

pub fn bench(args: BenchArgs) -> ExitCode {
    match run_bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// mimalloc's forced collection: freed memory it keeps for reuse goes back to the system now.
fn release_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: `mi_collect` takes no pointers and may be called at any time from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    if let Some(files) = &args.compare {
        return compare(&files[0], &files[1]);
    }
    if let Some([out, files @ ..]) = args.best_of.as_deref() {
        return best_of(out, files);
    }
    let device = select(args.backend)?;
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("studio-bench"));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    eprintln!("benchmarking on {}", device.description);
    let started = Instant::now();
    let config = BenchConfig {
        size: args.size,
        scratch: scratch.clone(),
        model: args.model.clone(),
        release_freed_memory,
        precision: device.precision,
    };
    let (mut report, models) = run(&device.device, &config, |what| {
        eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f32());
    })?;
    drop(models);
    report.backend = args.backend.to_string();
    report.device = device.description.clone();
    report.threads = threads();
    if args.frames {
        eprintln!("[{:6.1} s] UI frame time", started.elapsed().as_secs_f32());
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| scratch.join("sd15-random"));
        frame_times(&model, args.backend, &mut report.results)?;
    }
    print_table(&report);
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_table(report: &Report) {
    let r = &report.results;
    println!("\n{:<34} {:>12}", "measurement", "value");
    for (name, value) in r {
        let shown = if name.ends_with("bytes") {
            format!("{:.2} GB", value / 1e9)
        } else if name.ends_with("gflops") {
            format!("{value:.1} GFLOP/s")
        } else if name.ends_with("_ms") {
            format!("{value:.2} ms")
        } else {
            format!("{value:.3} s")
        };
        println!("{name:<34} {shown:>12}");
    }
    let ratio = |a: &str, b: &str| Some(r.get(a)? / r.get(b)?);
    println!();
    for side in [512, 256] {
        if let (Some(fraction), Some(preview), Some(taesd)) = (
            ratio(&format!("unet_step_{side}_gflops"), "matmul_gflops"),
            ratio(
                &format!("preview_projection_{side}"),
                &format!("unet_step_{side}"),
            ),
            ratio(
                &format!("taesd_decode_{side}"),
                &format!("unet_step_{side}"),
            ),
        ) {
            println!(
                "UNet step at {side}²: {:.0}% of the matmul rate; preview {:.3}% of a step; TAESD {:.1}% of a step",
                fraction * 100.0,
                preview * 100.0,
                taesd * 100.0
            );
            if let Some(memory) = ratio(&format!("generate_{side}_peak_rss_bytes"), "weights_bytes")
            {
                println!("peak memory of a {side}² generation: {memory:.2}× the weights");
            }
            break;
        }
    }
    // The first UNet step of a launch is the 256² one: it prepares every kernel the later sizes share.
    for side in [256, 512] {
        if let Some(first) = ratio(
            &format!("unet_step_{side}_first"),
            &format!("unet_step_{side}"),
        ) {
            println!("first step / steady step at {side}²: {first:.2}");
        }
    }
}

/// A result file: its whole JSON, and its measurements.
fn read_results(path: &Path) -> Result<(serde_json::Value, BTreeMap<String, f64>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let results = serde_json::from_value(value["results"].clone())
        .with_context(|| format!("{} has no benchmark results", path.display()))?;
    Ok((value, results))
}

/// Each measurement's best over several runs, for those every run has: the highest rate (names
/// ending in `gflops`), otherwise the lowest (times and memory).
fn best(runs: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let Some((first, rest)) = runs.split_first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter_map(|(name, &value)| {
            let higher_is_better = name.ends_with("gflops");
            rest.iter()
                .try_fold(value, |best, run| {
                    let value = *run.get(name)?;
                    Some(if higher_is_better == (value > best) {
                        value
                    } else {
                        best
                    })
                })
                .map(|best| (name.clone(), best))
        })
        .collect()
}

/// `--best-of`: the first file's description with [`best`] of every file's results, written to
/// `out` and printed.
fn best_of(out: &Path, files: &[PathBuf]) -> Result<()> {
    let (values, results): (Vec<_>, Vec<_>) = files
        .iter()
        .map(|path| read_results(path))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let mut value = values
        .into_iter()
        .next()
        .expect("clap asks for at least one file");
    value["results"] = serde_json::to_value(best(&results))?;
    value["runs"] = files.len().into();
    let json = serde_json::to_string(&value)?;
    println!("{json}");
    std::fs::write(out, json).with_context(|| format!("cannot write {}", out.display()))
}

/// Ours / torch for every measurement both files have.
fn compare(ours: &Path, torch: &Path) -> Result<()> {
    let ((_, ours), (_, torch)) = (read_results(ours)?, read_results(torch)?);
    println!(
        "{:<28} {:>12} {:>12} {:>14}",
        "measurement", "ours", "torch", "ours / torch"
    );
    for (name, mine) in &ours {
        let Some(theirs) = torch.get(name) else {
            continue;
        };
        let unit = if name.ends_with("bytes") { 1e9 } else { 1.0 };
        println!(
            "{name:<28} {:>12.3} {:>12.3} {:>14.2}",
            mine / unit,
            theirs / unit,
            mine / theirs
        );
    }
    Ok(())
}

/// Median and 99th percentile of the UI's CPU time per frame (layout and tessellation; the GPU's
/// part is the driver's), while the engine generates, and while a stroke is painted on a 2048²
/// canvas.
fn frame_times(model: &Path, backend: Backend, results: &mut BTreeMap<String, f64>) -> Result<()> {
    let ctx = egui::Context::default();
    let data = std::env::temp_dir().join(format!("studio-bench-ui-{}", std::process::id()));
    let settings = Settings {
        model: Some(model.to_path_buf()),
        backend,
        width: 256,
        height: 256,
        steps: 6,
        prompt: "a photograph of an astronaut riding a horse".into(),
        ..Settings::default()
    };
    let engine = ThreadedEngine::spawn(ctx.clone());
    let mut app = StudioApp::new(
        settings,
        Box::new(engine),
        Box::<NoDialogs>::default(),
        data,
    );
    let frame = |app: &mut StudioApp, events: Vec<egui::Event>| -> f64 {
        let input = egui::RawInput {
            screen_rect: Some(egui::Rect::from_min_size(
                egui::Pos2::ZERO,
                egui::vec2(1280.0, 800.0),
            )),
            events,
            ..Default::default()
        };
        let start = Instant::now();
        app.update(&ctx);
        let output = ctx.run_ui(input, |ui| app.draw(ui));
        let _ = ctx.tessellate(output.shapes, output.pixels_per_point);
        start.elapsed().as_secs_f64() * 1e3
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !app.is_model_loaded() {
        anyhow::ensure!(Instant::now() < deadline, "the model did not load");
        frame(&mut app, Vec::new());
        std::thread::sleep(Duration::from_millis(50));
    }
    app.start_generation();
    let mut busy = Vec::new();
    while app.is_generating() {
        anyhow::ensure!(Instant::now() < deadline, "the generation did not finish");
        busy.push(frame(&mut app, Vec::new()));
        std::thread::sleep(Duration::from_millis(16));
    }
    record(results, "ui_frame_generating", &mut busy);

    app.runtime
        .canvas
        .set_image(image::RgbImage::new(2048, 2048));
    frame(&mut app, Vec::new());
    let mut painting = Vec::new();
    let press = |pos, pressed| egui::Event::PointerButton {
        pos,
        button: egui::PointerButton::Primary,
        pressed,
        modifiers: Default::default(),
    };
    let start = egui::pos2(400.0, 200.0);
    frame(
        &mut app,
        vec![egui::Event::PointerMoved(start), press(start, true)],
    );
    for i in 0..240 {
        let t = i as f32 / 240.0;
        let p = egui::pos2(400.0 + 300.0 * (t * 6.0).sin(), 200.0 + 400.0 * t);
        painting.push(frame(&mut app, vec![egui::Event::PointerMoved(p)]));
    }
    frame(&mut app, vec![press(start, false)]);
    record(results, "ui_frame_painting_2048", &mut painting);

    // A history of 1,000 images, scrolled through.
    let gallery = app.gallery().context("the gallery is unavailable")?;
    for seed in 0..1000 {
        let request = studio_engine::GenerationRequest {
            prompt: format!("study {seed}"),
            ..Default::default()
        };
        let metadata = crate::gallery::metadata::ImageMetadata::new(&request, seed, "bench", None);
        gallery.add(
            image::RgbImage::from_pixel(64, 64, image::Rgb([seed as u8, 90, 160])),
            metadata,
        );
    }
    while app.gallery().is_some_and(|g| g.items().len() < 1000) {
        anyhow::ensure!(Instant::now() < deadline, "the gallery did not fill");
        frame(&mut app, Vec::new());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut browsing = Vec::new();
    let over_gallery = egui::pos2(1150.0, 400.0);
    for _ in 0..240 {
        let scroll = egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -60.0),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: Default::default(),
        };
        browsing.push(frame(
            &mut app,
            vec![egui::Event::PointerMoved(over_gallery), scroll],
        ));
    }
    record(results, "ui_frame_gallery_1000", &mut browsing);
    Ok(())
}

fn record(results: &mut BTreeMap<String, f64>, name: &str, frames: &mut [f64]) {
    frames.sort_by(f64::total_cmp);
    if frames.is_empty() {
        return;
    }
    let at = |q: f64| frames[((frames.len() - 1) as f64 * q).round() as usize];
    results.insert(format!("{name}_median_ms"), at(0.5));
    results.insert(format!("{name}_p99_ms"), at(0.99));
}

#[derive(Default)]
struct NoDialogs;

impl crate::dialogs::Dialogs for NoDialogs {
    fn open(&mut self, _: crate::dialogs::Purpose, _: Option<String>) {}
    fn poll(&mut self) -> Vec<(crate::dialogs::Purpose, Option<PathBuf>)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_keeps_the_fastest_time_and_the_highest_rate() {
        let run = |step: f64, rate: f64, extra: bool| {
            let mut r = BTreeMap::from([
                ("unet_step_512".to_string(), step),
                ("matmul_gflops".to_string(), rate),
                ("generate_512_peak_rss_bytes".to_string(), step * 1e9),
            ]);
            if extra {
                r.insert("text_encode".into(), 1.0);
            }
            r
        };
        let merged = best(&[
            run(9.0, 150.0, true),
            run(8.0, 140.0, false),
            run(10.0, 170.0, true),
        ]);
        assert_eq!(merged["unet_step_512"], 8.0);
        assert_eq!(merged["matmul_gflops"], 170.0);
        assert_eq!(merged["generate_512_peak_rss_bytes"], 8e9);
        // Only what every run measured.
        assert!(!merged.contains_key("text_encode"));
        assert_eq!(merged.len(), 3);
        assert!(best(&[]).is_empty());
    }
}
