//! The engine on its own thread: it owns the compute device and the models, runs commands in the
//! order they arrive, and reports plain-data events (no tensor leaves it). Previews are coalesced in
//! a latest-wins slot so a slow consumer never holds the engine up; a waker tells the consumer (the
//! GUI's `request_repaint`) that something new is there. A panic inside a job fails that job only.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::checkpoint::{Checkpoint, StableDiffusion, load_taesd};
use crate::device::{Backend, select};
use crate::family::ModelFamily;
use crate::models::taesd::Taesd;
use crate::pipeline::{CancelToken, GeneratedImage, Outcome, Pipeline, StepEvent};
use crate::preview;
use crate::request::{GenerationRequest, PreviewMode};

pub type JobId = u64;

/// What the engine is asked to do.
#[derive(Debug)]
pub enum Command {
    LoadModel {
        path: PathBuf,
        backend: Backend,
        /// A TAESD for full-resolution previews, if the artist has one.
        taesd: Option<PathBuf>,
    },
    Generate {
        job: JobId,
        request: Box<GenerationRequest>,
    },
    Shutdown,
}

/// Progress of a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub job: JobId,
    /// Image of the batch (0-based) and how many there are.
    pub image: usize,
    pub images: usize,
    /// Steps done for this image, and per image.
    pub step: usize,
    pub steps: usize,
    pub sigma: f32,
    pub elapsed: Duration,
    pub eta: Duration,
}

impl Progress {
    /// Fraction of the whole job done.
    pub fn fraction(&self) -> f32 {
        (self.image * self.steps + self.step) as f32 / (self.images * self.steps).max(1) as f32
    }
}

/// The latest preview of a job.
#[derive(Debug, Clone)]
pub struct Preview {
    pub job: JobId,
    pub step: usize,
    pub image: RgbImage,
}

/// What the engine reports.
#[derive(Debug, Clone)]
pub enum Event {
    ModelLoading {
        path: PathBuf,
    },
    ModelLoaded {
        path: PathBuf,
        family: ModelFamily,
        device: String,
        seconds: f32,
    },
    ModelFailed {
        path: PathBuf,
        error: String,
    },
    JobStarted {
        job: JobId,
    },
    Progress(Progress),
    /// A new preview is waiting in [`Engine::take_preview`].
    PreviewReady {
        job: JobId,
    },
    /// One image of a job's batch is done (a batch reports each as it finishes).
    ImageFinished {
        job: JobId,
        image: GeneratedImage,
    },
    JobFinished {
        job: JobId,
        images: usize,
        seconds: f32,
    },
    JobCancelled {
        job: JobId,
        at_step: usize,
    },
    JobFailed {
        job: JobId,
        error: String,
    },
}

type Waker = Arc<dyn Fn() + Send + Sync>;

/// The handle the GUI and the CLI hold: commands in, events out.
pub struct Engine {
    commands: Sender<Command>,
    events: Receiver<Event>,
    preview: Arc<Mutex<Option<Preview>>>,
    cancels: Arc<Mutex<HashMap<JobId, CancelToken>>>,
    next_job: JobId,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread; `waker` is called whenever an event or preview arrives.
    pub fn spawn(waker: impl Fn() + Send + Sync + 'static) -> Self {
        let (commands, inbox) = mpsc::channel();
        let (outbox, events) = mpsc::channel();
        let preview = Arc::new(Mutex::new(None));
        let cancels = Arc::new(Mutex::new(HashMap::new()));
        let worker = Worker {
            outbox,
            preview: Arc::clone(&preview),
            cancels: Arc::clone(&cancels),
            waker: Arc::new(waker),
            models: None,
            taesd: None,
        };
        let thread = std::thread::Builder::new()
            .name("studio-engine".into())
            .spawn(move || worker.run(inbox))
            .expect("spawning the engine thread");
        Self {
            commands,
            events,
            preview,
            cancels,
            next_job: 1,
            thread: Some(thread),
        }
    }

    pub fn load_model(&self, path: PathBuf, backend: Backend, taesd: Option<PathBuf>) {
        let _ = self.commands.send(Command::LoadModel {
            path,
            backend,
            taesd,
        });
    }

    /// Queues `request`; jobs run one after another in the order they were queued.
    pub fn generate(&mut self, request: GenerationRequest) -> JobId {
        let job = self.next_job;
        self.next_job += 1;
        lock(&self.cancels).insert(job, CancelToken::new());
        let _ = self.commands.send(Command::Generate {
            job,
            request: Box::new(request),
        });
        job
    }

    /// Stops `job` before its next model evaluation, or before it starts if it is queued.
    pub fn cancel(&self, job: JobId) {
        if let Some(token) = lock(&self.cancels).get(&job) {
            token.cancel();
        }
    }

    /// Cancels the running job and everything queued.
    pub fn cancel_all(&self) {
        for token in lock(&self.cancels).values() {
            token.cancel();
        }
    }

    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The newest preview, if one arrived since the last call.
    pub fn take_preview(&self) -> Option<Preview> {
        lock(&self.preview).take()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel_all();
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain inserts and takes).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Worker {
    outbox: Sender<Event>,
    preview: Arc<Mutex<Option<Preview>>>,
    cancels: Arc<Mutex<HashMap<JobId, CancelToken>>>,
    waker: Waker,
    models: Option<StableDiffusion>,
    taesd: Option<Taesd>,
}

impl Worker {
    fn send(&self, event: Event) {
        let _ = self.outbox.send(event);
        (self.waker)();
    }

    fn run(mut self, inbox: Receiver<Command>) {
        while let Ok(command) = inbox.recv() {
            match command {
                Command::Shutdown => break,
                Command::LoadModel {
                    path,
                    backend,
                    taesd,
                } => self.load(path, backend, taesd),
                Command::Generate { job, request } => {
                    let token = lock(&self.cancels).get(&job).cloned().unwrap_or_default();
                    self.generate(job, &request, &token);
                    lock(&self.cancels).remove(&job);
                }
            }
        }
    }

    fn load(&mut self, path: PathBuf, backend: Backend, taesd: Option<PathBuf>) {
        self.send(Event::ModelLoading { path: path.clone() });
        // Free the previous model before loading the next one.
        self.models = None;
        self.taesd = None;
        let started = Instant::now();
        let loaded = catch_unwind(AssertUnwindSafe(|| -> crate::Result<_> {
            let device = select(backend)?;
            let models = Checkpoint::open(&path)?
                .with_precision(device.precision)
                .load_all(&device.device)?;
            let taesd = taesd
                .map(|p| load_taesd(&p, &device.device, device.precision))
                .transpose()?;
            Ok((models, taesd, device.description))
        }));
        match loaded {
            Ok(Ok((models, taesd, device))) => {
                let family = models.family;
                self.models = Some(models);
                self.taesd = taesd;
                self.send(Event::ModelLoaded {
                    path,
                    family,
                    device,
                    seconds: started.elapsed().as_secs_f32(),
                });
            }
            Ok(Err(error)) => self.send(Event::ModelFailed {
                path,
                error: error.to_string(),
            }),
            Err(panic) => self.send(Event::ModelFailed {
                path,
                error: panic_message(&panic),
            }),
        }
    }

    fn generate(&self, job: JobId, request: &GenerationRequest, cancel: &CancelToken) {
        if cancel.is_cancelled() {
            self.send(Event::JobCancelled { job, at_step: 0 });
            return;
        }
        let Some(models) = &self.models else {
            self.send(Event::JobFailed {
                job,
                error: "no model is loaded: open a model file or folder first".into(),
            });
            return;
        };
        self.send(Event::JobStarted { job });
        let started = Instant::now();
        let pipeline = Pipeline {
            models,
            taesd: self.taesd.as_ref(),
        };
        let images = request.batch as usize;
        let factors = models.family.latent_rgb_factors();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            pipeline.generate(request, cancel, &mut |event: &StepEvent| {
                self.step(job, request.preview, &factors, images, started, event);
            })
        }));
        self.report(job, started, outcome);
    }

    /// Reports how a job ended; a panic inside it becomes a failed job.
    fn report(
        &self,
        job: JobId,
        started: Instant,
        outcome: std::thread::Result<crate::Result<Outcome>>,
    ) {
        match outcome {
            Ok(Ok(Outcome::Finished(done))) => {
                let count = done.len();
                for image in done {
                    self.send(Event::ImageFinished { job, image });
                }
                self.send(Event::JobFinished {
                    job,
                    images: count,
                    seconds: started.elapsed().as_secs_f32(),
                });
            }
            Ok(Ok(Outcome::Cancelled {
                at_step,
                images: done,
            })) => {
                for image in done {
                    self.send(Event::ImageFinished { job, image });
                }
                self.send(Event::JobCancelled { job, at_step });
            }
            Ok(Err(error)) => self.send(Event::JobFailed {
                job,
                error: error.to_string(),
            }),
            Err(panic) => self.send(Event::JobFailed {
                job,
                error: format!(
                    "the engine hit an internal error and stopped this job: {}",
                    panic_message(&panic)
                ),
            }),
        }
    }

    fn step(
        &self,
        job: JobId,
        mode: PreviewMode,
        factors: &[[f32; 3]; 4],
        images: usize,
        started: Instant,
        event: &StepEvent,
    ) {
        let elapsed = started.elapsed();
        let done = event.image * event.total + event.step + 1;
        let total = images * event.total;
        let eta = elapsed.mul_f64((total - done) as f64 / done as f64);
        self.send(Event::Progress(Progress {
            job,
            image: event.image,
            images,
            step: event.step + 1,
            steps: event.total,
            sigma: event.sigma,
            elapsed,
            eta,
        }));
        let image = match (mode, &self.taesd) {
            (PreviewMode::Off, _) => return,
            (PreviewMode::Taesd, Some(taesd)) => preview::taesd(taesd, event.denoised),
            _ => preview::project(event.denoised, factors),
        };
        *lock(&self.preview) = Some(Preview {
            job,
            step: event.step + 1,
            image,
        });
        self.send(Event::PreviewReady { job });
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_job_is_reported_as_failed() {
        let (outbox, events) = mpsc::channel();
        let worker = Worker {
            outbox,
            preview: Arc::default(),
            cancels: Arc::default(),
            waker: Arc::new(|| {}),
            models: None,
            taesd: None,
        };
        let outcome =
            catch_unwind(|| -> crate::Result<Outcome> { panic!("index out of bounds in a layer") });
        worker.report(7, Instant::now(), outcome);
        match events.try_recv() {
            Ok(Event::JobFailed { job: 7, error }) => {
                assert!(error.contains("index out of bounds"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }
}
