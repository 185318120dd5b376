//! The engine thread: jobs run in order, report progress and previews every step, cancel before the
//! next model evaluation, and failures leave it serving.

use std::time::Duration;

use studio_engine::device::Backend;
use studio_engine::{Engine, Event, GenerationRequest, Sampler};
use studio_tests::model;

fn request(steps: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: "a lighthouse".into(),
        width: 64,
        height: 64,
        steps,
        sampler: Sampler::Euler,
        ..GenerationRequest::default()
    }
}

/// Collects events until `done` says stop (or 60 s pass).
fn events_until(engine: &Engine, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(event) = engine.recv_timeout(Duration::from_millis(50)) {
            let stop = done(&event);
            events.push(event);
            if stop {
                return events;
            }
        }
    }
    panic!("the engine did not finish: {events:?}");
}

fn loaded(engine: &Engine) {
    engine.load_model(model("sd1.safetensors"), Backend::Cpu, Some(model("taesd")));
    let events = events_until(engine, |e| {
        matches!(e, Event::ModelLoaded { .. } | Event::ModelFailed { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::ModelLoaded { .. })),
        "{events:?}"
    );
}

#[test]
fn a_job_without_a_model_fails_and_the_engine_keeps_serving() {
    let mut engine = Engine::spawn(|| {});
    let job = engine.generate(request(2));
    let events = events_until(&engine, |e| matches!(e, Event::JobFailed { .. }));
    let Some(Event::JobFailed { job: failed, error }) = events.last() else {
        unreachable!()
    };
    assert_eq!(*failed, job);
    assert!(error.contains("open a model"), "{error}");

    loaded(&engine);
    let job = engine.generate(request(2));
    let events = events_until(&engine, |e| {
        matches!(e, Event::JobFinished { .. } | Event::JobFailed { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::JobFinished { job: j, images: 1, .. }) if *j == job),
        "{events:?}"
    );
}

#[test]
fn every_step_reports_progress_and_a_preview() {
    let mut engine = Engine::spawn(|| {});
    loaded(&engine);
    let job = engine.generate(GenerationRequest {
        batch: 2,
        seed: 10,
        ..request(3)
    });
    let mut previews = 0;
    let events = events_until(&engine, |e| {
        if matches!(e, Event::PreviewReady { .. }) {
            previews += usize::from(engine.take_preview().is_some());
        }
        matches!(e, Event::JobFinished { .. } | Event::JobFailed { .. })
    });
    let progress: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.job == job => Some((p.image, p.step)),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        vec![(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    );
    assert!(
        previews >= 1,
        "previews are coalesced but at least the latest arrives"
    );
    let seeds: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::ImageFinished { image, .. } => Some(image.seed),
            _ => None,
        })
        .collect();
    assert_eq!(seeds, vec![10, 11], "a batch uses seed, seed + 1");
}

#[test]
fn cancelling_stops_before_the_next_step_and_queued_jobs_never_start() {
    let mut engine = Engine::spawn(|| {});
    loaded(&engine);
    let running = engine.generate(request(400));
    let queued = engine.generate(request(2));
    let after = engine.generate(request(2));
    events_until(
        &engine,
        |e| matches!(e, Event::Progress(p) if p.job == running && p.step >= 2),
    );
    engine.cancel(running);
    engine.cancel(queued);
    let events = events_until(
        &engine,
        |e| matches!(e, Event::JobFinished { job, .. } if *job == after),
    );
    let cancelled: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::JobCancelled { job, at_step } => Some((*job, *at_step)),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled.len(), 2, "{events:?}");
    assert_eq!(cancelled[0].0, running);
    assert!(
        cancelled[0].1 >= 2 && cancelled[0].1 < 400,
        "stopped mid-run at {}",
        cancelled[0].1
    );
    assert_eq!(cancelled[1], (queued, 0));
    let last_progress = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.job == running => Some(p.step),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    assert!(
        last_progress <= cancelled[0].1 + 1,
        "no step ran after the cancel took effect"
    );
    assert!(!events.iter().any(
        |e| matches!(e, Event::ImageFinished { job, .. } if *job == running || *job == queued)
    ));
}
