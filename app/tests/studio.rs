//! The studio's behaviour, driven through its accessibility tree with egui_kittest, against a
//! scripted engine (and, once, the real engine with the tiny fixture model).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use egui::{Key, Modifiers, Pos2};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use image::RgbImage;
use studio::app::{SETTINGS_KEY, StudioApp};
use studio::dialogs::{Dialogs, Purpose};
use studio::engine_client::{EngineClient, ThreadedEngine};
use studio::gallery::metadata::read_metadata;
use studio::state::Settings;
use studio_engine::device::Backend;
use studio_engine::{
    Event, GeneratedImage, GenerationRequest, JobId, ModelFamily, Preview, Progress,
};

/// What the scripted engine was asked, and what it will answer.
#[derive(Default)]
struct Script {
    loaded: Vec<PathBuf>,
    requests: Vec<GenerationRequest>,
    cancelled: Vec<JobId>,
    events: Vec<Event>,
    preview: Option<Preview>,
}

#[derive(Clone, Default)]
struct FakeEngine(Rc<RefCell<Script>>);

impl EngineClient for FakeEngine {
    fn load_model(&mut self, path: PathBuf, _backend: Backend, _taesd: Option<PathBuf>) {
        self.0.borrow_mut().loaded.push(path);
    }
    fn generate(&mut self, request: GenerationRequest) -> JobId {
        let mut script = self.0.borrow_mut();
        script.requests.push(request);
        script.requests.len() as JobId
    }
    fn cancel(&mut self, job: JobId) {
        self.0.borrow_mut().cancelled.push(job);
    }
    fn poll(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.0.borrow_mut().events)
    }
    fn take_preview(&mut self) -> Option<Preview> {
        self.0.borrow_mut().preview.take()
    }
}

/// Dialogs opened, and the answers waiting to be given.
type DialogLog = (Vec<Purpose>, Vec<(Purpose, Option<PathBuf>)>);

/// Dialogs that answer at once with prepared paths.
#[derive(Clone, Default)]
struct FakeDialogs(Rc<RefCell<DialogLog>>);

impl FakeDialogs {
    fn answer(&self, purpose: Purpose, path: &Path) {
        self.0
            .borrow_mut()
            .1
            .push((purpose, Some(path.to_path_buf())));
    }
    fn opened(&self) -> Vec<Purpose> {
        self.0.borrow().0.clone()
    }
}

impl Dialogs for FakeDialogs {
    fn open(&mut self, purpose: Purpose, _suggested_name: Option<String>) {
        self.0.borrow_mut().0.push(purpose);
    }
    fn poll(&mut self) -> Vec<(Purpose, Option<PathBuf>)> {
        std::mem::take(&mut self.0.borrow_mut().1)
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("studio-gui-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

struct Studio {
    harness: Harness<'static, StudioApp>,
    engine: FakeEngine,
    dialogs: FakeDialogs,
}

fn studio(name: &str, settings: Settings) -> Studio {
    let engine = FakeEngine::default();
    let dialogs = FakeDialogs::default();
    let (e, d) = (engine.clone(), dialogs.clone());
    let dir = scratch(name);
    let harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(move |_cc| StudioApp::new(settings, Box::new(e), Box::new(d), dir));
    Studio {
        harness,
        engine,
        dialogs,
    }
}

impl Studio {
    fn push(&self, event: Event) {
        self.engine.0.borrow_mut().events.push(event);
    }

    fn loaded(&mut self) {
        self.push(Event::ModelLoaded {
            path: PathBuf::from("/models/dreamshaper.safetensors"),
            family: ModelFamily::Sd1,
            device: "CPU".into(),
            seconds: 1.0,
        });
        self.harness.run_steps(2);
    }

    fn canvas_size(&self) -> Option<(u32, u32)> {
        let canvas = &self.harness.state().runtime.canvas;
        canvas.image().map(|image| image.dimensions())
    }

    /// Job 1 finishes with one image, which lands in the (empty) gallery.
    fn finish_first_job(&mut self, image: RgbImage, seed: u64) {
        self.push(Event::ImageFinished {
            job: 1,
            image: GeneratedImage { image, seed },
        });
        self.push(Event::JobFinished {
            job: 1,
            images: 1,
            seconds: 1.0,
        });
        self.wait_for("the gallery item", |app| {
            app.gallery().is_some_and(|g| g.items().len() == 1)
        });
    }

    /// Steps the UI until `done` holds (the gallery writes on its own thread).
    fn wait_for(&mut self, what: &str, done: impl Fn(&StudioApp) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self.harness.state()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.harness.step();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn primary_button(pos: Pos2, pressed: bool) -> egui::Event {
    egui::Event::PointerButton {
        pos,
        button: egui::PointerButton::Primary,
        pressed,
        modifiers: Modifiers::default(),
    }
}

fn progress(job: JobId, step: usize, steps: usize) -> Event {
    Event::Progress(Progress {
        job,
        image: 0,
        images: 1,
        step,
        steps,
        sigma: 1.0,
        elapsed: Duration::from_secs(step as u64),
        eta: Duration::from_secs((steps - step) as u64),
    })
}

#[test]
fn first_start_asks_for_a_model_and_loads_the_one_chosen() {
    let mut s = studio("first-start", Settings::default());
    s.harness.run_steps(2);
    s.harness
        .get_by_label_contains("Open a Stable Diffusion model")
        .hover();
    s.harness.get_by_label("Open model file…").click();
    s.harness.run_steps(2);
    assert_eq!(s.dialogs.opened(), vec![Purpose::ModelFile]);
    s.dialogs
        .answer(Purpose::ModelFile, Path::new("/models/sd15.safetensors"));
    s.harness.run_steps(2);
    assert_eq!(
        s.engine.0.borrow().loaded,
        vec![PathBuf::from("/models/sd15.safetensors")]
    );
    assert_eq!(
        s.harness.state().settings.recent_models[0],
        PathBuf::from("/models/sd15.safetensors")
    );
    s.harness.get_by_label_contains("Loading sd15");
}

#[test]
fn generating_shows_progress_and_preview_and_the_image_lands_in_the_gallery() {
    let mut s = studio(
        "generate",
        Settings {
            seed: 77,
            seed_locked: true,
            ..Settings::default()
        },
    );
    s.loaded();
    s.harness
        .get_by_label("prompt")
        .type_text("a lighthouse at dusk");
    s.harness.run_steps(2);
    s.harness.get_by_label("prompt").focus();
    s.harness
        .key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    s.harness.run_steps(2);
    let request = s.engine.0.borrow().requests[0].clone();
    assert_eq!(
        (request.prompt.as_str(), request.seed),
        ("a lighthouse at dusk", 77)
    );

    s.push(Event::JobStarted { job: 1 });
    s.push(progress(1, 3, 10));
    s.engine.0.borrow_mut().preview = Some(Preview {
        job: 1,
        step: 3,
        image: RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10])),
    });
    s.push(Event::PreviewReady { job: 1 });
    s.harness.run_steps(2);
    s.harness.get_by_label_contains("step 3/10");
    s.harness.get_by_label_contains("preview · step 3");

    s.finish_first_job(RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 10])), 77);
    s.harness.run_steps(2);
    s.harness
        .get_by_label_contains("image 77: a lighthouse at dusk");
    let gallery = s.harness.state().gallery().unwrap();
    let path = gallery.path(&gallery.items()[0]);
    let found = read_metadata(&std::fs::read(path).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.request.prompt.as_str(), found.seed),
        ("a lighthouse at dusk", 77)
    );
    assert_eq!(found.model.as_deref(), Some("dreamshaper"));
    assert!(
        s.harness.query_by_label_contains("step 3/10").is_none(),
        "the progress bar is gone"
    );

    // Viewing it large, sending it to the canvas, deleting it and taking that back.
    s.harness
        .get_by_label_contains("image 77: a lighthouse at dusk")
        .click();
    // A new window shows after its sizing frame.
    s.harness.run_steps(4);
    s.harness.get_by_label("Send to canvas").click();
    s.harness.run_steps(2);
    assert_eq!(s.canvas_size(), Some((64, 64)));
    s.harness
        .get_by_label_contains("image 77: a lighthouse at dusk")
        .click();
    s.harness.run_steps(4);
    s.harness.get_by_label("Delete").click();
    s.harness.run_steps(2);
    assert!(s.harness.state().gallery().unwrap().items().is_empty());
    s.harness.get_by_label("Undo delete").click();
    s.wait_for("the restored item", |app| {
        app.gallery().is_some_and(|g| g.items().len() == 1)
    });
}

#[test]
fn a_click_counts_when_the_thumbnail_arrives_between_press_and_release() {
    let mut s = studio("thumbnail-click", Settings::default());
    s.loaded();
    s.harness.get_by_label("Generate").click();
    s.harness.run_steps(2);
    s.push(Event::JobStarted { job: 1 });
    // Large enough that decoding its thumbnail takes a while after the item shows.
    s.finish_first_job(
        RgbImage::from_fn(4096, 4096, |x, y| image::Rgb([x as u8, y as u8, 90])),
        5,
    );
    let item = s.harness.get_by_label_contains("image 5:");
    let at = item.rect().center();
    item.hover();
    s.harness.event(primary_button(at, true));
    s.harness.step();
    // The thumbnail lands in the frame that sees the release.
    std::thread::sleep(Duration::from_secs(3));
    s.harness.event(primary_button(at, false));
    s.harness.run_steps(4);
    s.harness.get_by_label("Delete");
}

#[test]
fn escape_and_the_cancel_button_cancel_the_job() {
    let mut s = studio("cancel", Settings::default());
    s.loaded();
    s.harness.get_by_label("Generate").click();
    s.harness.run_steps(2);
    s.push(progress(1, 1, 20));
    s.harness.run_steps(2);
    s.harness.get_by_label("Cancel").click();
    s.harness.run_steps(2);
    assert_eq!(s.engine.0.borrow().cancelled, vec![1]);
    s.push(Event::JobCancelled { job: 1, at_step: 1 });
    s.harness.run_steps(2);
    assert!(!s.harness.state().is_generating());
    s.harness.get_by_label("Generate").click();
    s.harness.run_steps(2);
    s.harness.key_press(Key::Escape);
    s.harness.run_steps(2);
    assert_eq!(s.engine.0.borrow().cancelled, vec![1, 2]);
}

#[test]
fn errors_show_as_dismissable_notices() {
    let mut s = studio("errors", Settings::default());
    s.push(Event::ModelFailed {
        path: "/models/broken.safetensors".into(),
        error: "the file is truncated".into(),
    });
    s.harness.run_steps(2);
    s.harness.get_by_label_contains("the file is truncated");
    s.loaded();
    s.harness.get_by_label("Generate").click();
    s.harness.run_steps(2);
    s.push(Event::JobFailed {
        job: 1,
        error: "out of memory".into(),
    });
    s.harness.run_steps(2);
    s.harness
        .get_by_label_contains("Generation failed: out of memory");
    for _ in 0..2 {
        s.harness
            .get_all_by_label("Dismiss")
            .next()
            .unwrap()
            .click();
        s.harness.run_steps(2);
    }
    assert!(s.harness.query_by_label_contains("out of memory").is_none());
    assert!(s.harness.state().notices().is_empty());
}

#[test]
fn painting_the_mask_and_undo_redo() {
    let mut s = studio("paint", Settings::default());
    s.harness
        .state_mut()
        .runtime
        .canvas
        .set_image(RgbImage::from_pixel(512, 512, image::Rgb([90, 90, 90])));
    s.harness.run_steps(2);
    let rect = s.harness.get_by_label("canvas").rect();
    let (a, b) = (
        rect.center() - egui::vec2(60.0, 0.0),
        rect.center() + egui::vec2(60.0, 0.0),
    );
    s.harness.event(egui::Event::PointerMoved(a));
    s.harness.event(primary_button(a, true));
    s.harness.step();
    for i in 1..=10 {
        let p = a + (b - a) * (i as f32 / 10.0);
        s.harness.event(egui::Event::PointerMoved(p));
        s.harness.step();
    }
    s.harness.event(primary_button(b, false));
    s.harness.run_steps(2);
    let painted = |app: &StudioApp| {
        app.runtime
            .canvas
            .painted_mask()
            .map_or(0, |m| m.pixels().filter(|p| p[0] > 0).count())
    };
    let after_stroke = painted(s.harness.state());
    assert!(
        after_stroke > 1000,
        "the stroke painted {after_stroke} pixels"
    );
    // The mask goes into the request: an init image plus a painted mask is inpainting.
    let request = s.harness.state().current_request();
    assert!(request.mask.is_some() && request.init_image.is_some());

    s.harness.event(egui::Event::PointerMoved(Pos2::new(
        rect.center().x,
        rect.center().y,
    )));
    s.harness.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    s.harness.run_steps(2);
    assert_eq!(painted(s.harness.state()), 0, "undo removes the stroke");
    s.harness
        .key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    s.harness.run_steps(2);
    assert_eq!(
        painted(s.harness.state()),
        after_stroke,
        "redo brings it back exactly"
    );
    s.harness.key_press(Key::X);
    s.harness.run_steps(1);
    assert!(
        s.harness.state().runtime.canvas.eraser,
        "X toggles the eraser"
    );
}

#[test]
fn emphasis_keys_edit_the_prompt() {
    let mut s = studio("emphasis", Settings::default());
    s.harness.get_by_label("prompt").type_text("a red fox");
    s.harness.run_steps(2);
    // The cursor is after "fox": with nothing selected, the word at the cursor is emphasised.
    s.harness
        .key_press_modifiers(Modifiers::COMMAND, Key::ArrowUp);
    s.harness.run_steps(2);
    assert_eq!(s.harness.state().settings.prompt, "a red (fox:1.1)");
    s.harness
        .key_press_modifiers(Modifiers::COMMAND, Key::ArrowUp);
    s.harness.run_steps(2);
    assert_eq!(s.harness.state().settings.prompt, "a red (fox:1.2)");
}

#[test]
fn settings_persist_across_restarts() {
    #[derive(Default)]
    struct Memory(std::collections::HashMap<String, String>);
    impl eframe::Storage for Memory {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.to_owned(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let mut s = studio("persist", Settings::default());
    {
        let settings = &mut s.harness.state_mut().settings;
        settings.prompt = "persisted prompt".into();
        settings.steps = 33;
        settings.use_model(PathBuf::from("/models/a.safetensors"));
    }
    let mut storage = Memory::default();
    eframe::App::save(s.harness.state_mut(), &mut storage);
    let restored: Settings = eframe::get_value(&storage, SETTINGS_KEY).unwrap();
    assert_eq!(restored, s.harness.state().settings);
    // A saved state from an older version, missing fields, still loads with defaults.
    eframe::Storage::set_string(&mut storage, SETTINGS_KEY, "(prompt: \"old\")".into());
    let old: Settings = eframe::get_value(&storage, SETTINGS_KEY).unwrap();
    assert_eq!(
        (old.prompt.as_str(), old.steps),
        ("old", Settings::default().steps)
    );
}

#[test]
fn the_gallery_survives_a_restart_and_deletes_can_be_undone() {
    use studio::gallery::history::Gallery;
    use studio::gallery::metadata::ImageMetadata;
    let dir = scratch("gallery-restart");
    let wait = |gallery: &mut Gallery, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while gallery.items().len() != n {
            assert!(Instant::now() < deadline);
            gallery.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    {
        let mut gallery = Gallery::open(&dir).unwrap();
        for seed in 0..3 {
            let request = GenerationRequest {
                prompt: format!("image {seed}"),
                ..GenerationRequest::default()
            };
            gallery.add(
                RgbImage::new(8, 8),
                ImageMetadata::new(&request, seed, "m", None),
            );
        }
        wait(&mut gallery, 3);
        let first = gallery.items()[0].id;
        gallery.delete(first);
        assert_eq!(gallery.items().len(), 2);
        gallery.undo_delete();
        wait(&mut gallery, 3);
        gallery.delete(first);
    }
    std::thread::sleep(Duration::from_millis(200));
    let gallery = Gallery::open(&dir).unwrap();
    let prompts: Vec<String> = gallery
        .items()
        .iter()
        .map(|i| i.metadata.request.prompt.clone())
        .collect();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
}

#[test]
fn a_dropped_png_restores_its_parameters_and_can_become_the_init_image() {
    #[derive(Debug)]
    struct File(PathBuf);
    impl egui::DroppedFile for File {
        fn path(&self) -> &Path {
            &self.0
        }
        fn bytes(&self) -> Result<Vec<u8>, String> {
            std::fs::read(&self.0).map_err(|e| e.to_string())
        }
    }
    let dir = scratch("drop");
    let path = dir.join("from-a1111.png");
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 128, 96);
        encoder.set_color(png::ColorType::Rgb);
        encoder.add_text_chunk("parameters".into(), "a castle, fog\nNegative prompt: blurry\nSteps: 31, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 4242, Size: 128x96".into()).unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&vec![120u8; 128 * 96 * 3]).unwrap();
    }
    std::fs::write(&path, bytes).unwrap();
    let mut s = studio("drop-studio", Settings::default());
    s.harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(File(path)));
    s.harness.run_steps(2);
    s.harness.get_by_label_contains("carries A1111 parameters");
    s.harness.get_by_label("Restore parameters").click();
    s.harness.run_steps(2);
    let settings = &s.harness.state().settings;
    assert_eq!(
        (
            settings.prompt.as_str(),
            settings.steps,
            settings.seed,
            settings.cfg_scale
        ),
        ("a castle, fog", 31, 4242, 5.5)
    );
    assert_eq!(settings.schedule.id(), "karras");
    assert_eq!(s.canvas_size(), None);
    s.harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(File(dir.join("from-a1111.png"))));
    s.harness.run_steps(2);
    s.harness.get_by_label("Use as init image").click();
    s.harness.run_steps(2);
    assert_eq!(s.canvas_size(), Some((128, 96)));
}

#[test]
fn end_to_end_with_the_real_engine() {
    let model = fixture("sd1");
    let settings = Settings {
        width: 64,
        height: 64,
        steps: 3,
        seed: 5,
        seed_locked: true,
        backend: Backend::Cpu,
        ..Settings::default()
    };
    let dir = scratch("end-to-end");
    let dialogs = FakeDialogs::default();
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(move |cc| {
            let engine = ThreadedEngine::spawn(cc.egui_ctx.clone());
            let mut settings = settings;
            settings.use_model(model);
            StudioApp::new(settings, Box::new(engine), Box::new(dialogs), dir)
        });
    let deadline = Instant::now() + Duration::from_secs(120);
    while harness.query_by_label("Ready.").is_none() {
        assert!(Instant::now() < deadline, "the model did not load");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness
        .get_by_label("prompt")
        .type_text("a tiny test image");
    harness.run_steps(2);
    harness.get_by_label("Generate").click();
    while harness
        .state()
        .gallery()
        .is_none_or(|g| g.items().is_empty())
    {
        assert!(Instant::now() < deadline, "no image reached the gallery");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    let gallery = harness.state().gallery().unwrap();
    let item = &gallery.items()[0];
    assert_eq!((item.width, item.height, item.metadata.seed), (64, 64, 5));
    let bytes = std::fs::read(gallery.path(item)).unwrap();
    let found = read_metadata(&bytes).unwrap().unwrap();
    assert_eq!(found.request.prompt, "a tiny test image");
    assert_eq!(
        image::load_from_memory(&bytes)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (64, 64)
    );
}
