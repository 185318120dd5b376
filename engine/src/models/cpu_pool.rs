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
//!
//! A pass also lends its operations working memory ([`floats`]) that outlives each of them: a
//! buffer of tens or hundreds of megabytes, freed and allocated again for every convolution, came
//! back from the system as fresh pages that the kernel cleared on first touch (4% of a 512² UNet
//! step, in the page-fault handler). A generation keeps that memory from one step to the next
//! ([`keep_working_memory`]). Alternating steps with and without the reuse in one process: 0.94×
//! the time at best and 0.96× in the median (4.90 against 5.20 s at 512²).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use burn::tensor::Device;

thread_local! {
    /// Set on the worker that runs an [`awake`] pass, so that nested passes run as they are.
    static AWAKE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a model's forward pass on `device`. On the CPU backend it runs on a worker of rayon's
/// pool, with the others polling for its parallel work until it returns; elsewhere (a GPU does
/// the work) or within another such pass it runs as it is.
pub fn awake<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if AWAKE.get() {
        return f();
    }
    let _pass = keep_working_memory();
    if *device != Device::flex() || rayon::current_num_threads() < 2 {
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

/// The working memory that [`floats`] lends: buffers that operations gave back while a pass ran,
/// for the later operations of the same or another pass.
pub(crate) struct Spare(Mutex<Buffers>);

struct Buffers {
    /// Passes running now on any thread, and [`WorkingMemory`] guards alive. While there is one,
    /// [`Floats`] come back here instead of going to the allocator; when the last one ends, the
    /// buffers go too, so memory is held only while models run.
    holders: usize,
    /// At most [`MAX_SPARE`], the largest kept.
    kept: Vec<Vec<f32>>,
}

/// The most buffers kept: a Winograd convolution borrows three at once.
const MAX_SPARE: usize = 4;

static SPARE: Spare = Spare::new();

impl Spare {
    const fn new() -> Spare {
        Spare(Mutex::new(Buffers {
            holders: 0,
            kept: Vec::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffers> {
        // The buffers hold no invariant a panic could break.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&'static self) -> WorkingMemory {
        self.lock().holders += 1;
        WorkingMemory(self)
    }

    fn floats(&'static self, len: usize) -> Floats {
        let reused = {
            let mut buffers = self.lock();
            let kept = &mut buffers.kept;
            let fitting = (0..kept.len())
                .filter(|&i| kept[i].len() >= len)
                .min_by_key(|&i| kept[i].len());
            fitting.map(|i| kept.swap_remove(i))
        };
        // New memory is cleared by both threads: its pages fault in as they are first written.
        let buffer = reused.unwrap_or_else(|| super::cpu_conv::zeros(len));
        Floats {
            buffer,
            len,
            spare: self,
        }
    }

    /// Keeps `buffer` if anyone holds the memory, and returns what is not kept, to be freed
    /// outside the lock.
    fn give_back(&self, buffer: Vec<f32>) -> Option<Vec<f32>> {
        let mut buffers = self.lock();
        if buffers.holders == 0 {
            return Some(buffer);
        }
        let kept = &mut buffers.kept;
        kept.push(buffer);
        if kept.len() <= MAX_SPARE {
            return None;
        }
        let smallest = (0..kept.len()).min_by_key(|&i| kept[i].len());
        smallest.map(|i| kept.swap_remove(i))
    }
}

/// Keeps the working memory that passes borrow ([`floats`]) from one pass to the next until the
/// guard is dropped, as every pass does while it runs: a generation holds one over its steps, so
/// each step does not fault in its buffers again.
pub fn keep_working_memory() -> WorkingMemory {
    SPARE.hold()
}

/// The guard of [`keep_working_memory`]; the last one dropped gives the memory back.
#[must_use = "the memory is kept only while the guard lives"]
pub struct WorkingMemory(&'static Spare);

impl Drop for WorkingMemory {
    fn drop(&mut self) {
        let freed = {
            let mut buffers = self.0.lock();
            buffers.holders -= 1;
            if buffers.holders == 0 {
                std::mem::take(&mut buffers.kept)
            } else {
                Vec::new()
            }
        };
        drop(freed);
    }
}

/// Working memory for one operation: `len` floats whose values are whatever an earlier operation
/// left there (zeros when the memory is new), to be overwritten. Within a pass it reuses memory an
/// earlier operation gave back, the smallest buffer that is large enough.
pub(crate) fn floats(len: usize) -> Floats {
    SPARE.floats(len)
}

/// Memory from [`floats`]: the first `len` floats of `buffer`, which goes back when dropped.
pub(crate) struct Floats {
    buffer: Vec<f32>,
    len: usize,
    spare: &'static Spare,
}

impl std::ops::Deref for Floats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buffer[..self.len]
    }
}

impl std::ops::DerefMut for Floats {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[..self.len]
    }
}

impl Drop for Floats {
    fn drop(&mut self) {
        let freed = self.spare.give_back(std::mem::take(&mut self.buffer));
        drop(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The buffers `spare` keeps, by length.
    fn kept(spare: &Spare) -> Vec<usize> {
        let mut lens: Vec<usize> = spare.lock().kept.iter().map(Vec::len).collect();
        lens.sort_unstable();
        lens
    }

    #[test]
    fn working_memory_is_reused_while_held_and_freed_after() {
        static SPARE: Spare = Spare::new();
        // Nobody holds it: nothing is kept.
        drop(SPARE.floats(100));
        assert!(kept(&SPARE).is_empty());

        let memory = SPARE.hold();
        let mut first = SPARE.floats(1000);
        assert_eq!(first.len(), 1000);
        first.fill(7.0);
        let address = first.as_ptr();
        drop(first);
        assert_eq!(kept(&SPARE), [1000]);
        // A smaller request gets the same memory, with what was left in it.
        let second = SPARE.floats(600);
        assert_eq!((second.as_ptr(), second.len()), (address, 600));
        assert!(second.iter().all(|&x| x == 7.0));
        // A larger one gets new, zeroed memory.
        let third = SPARE.floats(3000);
        assert!(third.iter().all(|&x| x == 0.0));
        drop((second, third));
        assert_eq!(kept(&SPARE), [1000, 3000]);

        // A second holder keeps it when the first lets go.
        let pass = SPARE.hold();
        drop(memory);
        assert_eq!(kept(&SPARE), [1000, 3000]);
        // The smallest buffer that fits, and at most MAX_SPARE kept, the largest.
        let fits = SPARE.floats(900);
        assert_eq!(fits.as_ptr(), address);
        let many: Vec<Floats> = (1..=5).map(|i| SPARE.floats(i * 10_000)).collect();
        drop(fits);
        drop(many);
        assert_eq!(kept(&SPARE), [20_000, 30_000, 40_000, 50_000]);
        drop(pass);
        assert!(kept(&SPARE).is_empty());
    }

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
