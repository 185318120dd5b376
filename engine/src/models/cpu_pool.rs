//! The CPU backend's thread pool, kept awake through a model's forward pass.
//!
//! A forward pass is thousands of parallel operations, many of them a millisecond or less. Called
//! from a thread outside rayon's pool, each one is injected into the pool and waited for, and
//! between two of them the pool's idle workers fall asleep. Waking them again goes through the
//! kernel (a futex), which on a virtual machine under load costs tens of microseconds per wake, or
//! more when the host runs the waker's core for the sleeper: about 16,000 futex calls in a 256² UNet
//! step. [`awake`] instead runs the whole pass on one worker, while every other worker polls for
//! its parallel work instead of sleeping. In one process, alternating, on a machine losing 20–40%
//! of its time to other guests: best step 2.13 → 1.78 s and median 3.21 → 2.28 s at 256², best
//! 7.65 → 7.42 s and median 8.82 → 7.56 s at 512²; CLIP-L's text encoding 0.92× the time.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

thread_local! {
    /// Set on the worker that runs an [`awake`] pass, so that nested passes run as they are.
    static AWAKE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a model's forward pass on `device`. On the CPU backend it runs on a worker of rayon's
/// pool, with the others polling for its parallel work until it returns; elsewhere (a GPU does
/// the work) or within another such pass it runs as it is.
pub fn awake<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if *device != Device::flex() || rayon::current_num_threads() < 2 || AWAKE.get() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            scope.spawn(move |_| {
                // The pass's own worker may pick this up while it waits for a join: polling there
                // would never let the pass finish.
                if rayon::current_thread_index() == owner {
                    return;
                }
                // A spin rather than `std::thread::yield_now`: on a virtual machine each such
                // system call costs more than a short job (yielding whenever nothing was found
                // made 3.5 million calls in a 256² step, and slowed it), and the scheduler still
                // preempts the spin for a thread that wakes (the studio's UI).
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Stops the polling however `f` ends: a panic must not leave the scope waiting for it.
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
                AWAKE.set(false);
            }
        }
        AWAKE.set(true);
        let _finish = Finish(&done);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn runs_parallel_work_and_returns() {
        let device = Device::flex();
        let sum: u64 = awake(&device, || {
            // Nested passes run in place.
            let inner = awake(&device, || (0..1000u64).into_par_iter().sum::<u64>());
            inner + (0..100u64).into_par_iter().map(|i| i * 2).sum::<u64>()
        });
        assert_eq!(sum, 499_500 + 9_900);
    }

    #[test]
    fn a_panicking_pass_does_not_hang() {
        // On a thread of its own, so that a hang fails the test instead of stalling the run.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let device = Device::flex();
            let result = std::panic::catch_unwind(|| {
                awake(&device, || {
                    (0..64)
                        .into_par_iter()
                        .for_each(|i| assert_ne!(i, 63, "boom"));
                })
            });
            // The pool still serves later passes.
            let later = awake(&device, || (0..10u32).into_par_iter().sum::<u32>());
            sender.send((result.is_err(), later)).unwrap();
        });
        let outcome = receiver.recv_timeout(std::time::Duration::from_secs(120));
        assert_eq!(
            outcome,
            Ok((true, 45)),
            "the panic reaches the caller and the pool serves the next pass"
        );
    }
}
