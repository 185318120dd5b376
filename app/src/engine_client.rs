//! The studio's side of the engine boundary: commands out, plain-data events in. The real client
//! is the engine thread; tests put a scripted fake behind the same trait.

use std::path::PathBuf;

use studio_engine::device::Backend;
use studio_engine::{Engine, Event, GenerationRequest, JobId, Preview};

pub trait EngineClient {
    fn load_model(&mut self, path: PathBuf, backend: Backend, taesd: Option<PathBuf>);
    /// Queues a job and returns its id.
    fn generate(&mut self, request: GenerationRequest) -> JobId;
    fn cancel(&mut self, job: JobId);
    /// Every event since the last call.
    fn poll(&mut self) -> Vec<Event>;
    /// The newest preview, if a new one arrived.
    fn take_preview(&mut self) -> Option<Preview>;
}

/// The engine thread, woken consumers repainting the window.
pub struct ThreadedEngine(Engine);

impl ThreadedEngine {
    pub fn spawn(ctx: egui::Context) -> Self {
        Self(Engine::spawn(move || ctx.request_repaint()))
    }
}

impl EngineClient for ThreadedEngine {
    fn load_model(&mut self, path: PathBuf, backend: Backend, taesd: Option<PathBuf>) {
        self.0.load_model(path, backend, taesd);
    }

    fn generate(&mut self, request: GenerationRequest) -> JobId {
        self.0.generate(request)
    }

    fn cancel(&mut self, job: JobId) {
        self.0.cancel(job);
    }

    fn poll(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.0.try_recv()).collect()
    }

    fn take_preview(&mut self) -> Option<Preview> {
        self.0.take_preview()
    }
}
