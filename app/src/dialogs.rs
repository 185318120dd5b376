//! Native file dialogs (rfd), each run on its own thread so the window never blocks on one; the
//! answer is collected by polling. Tests substitute scripted answers through the same trait.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, channel};

/// What a dialog was opened for, so its answer goes to the right place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    ModelFile,
    ModelFolder,
    Taesd,
    InitImage,
    /// Export of a gallery item.
    Export(u64),
}

pub trait Dialogs {
    /// Opens a dialog; its answer arrives later through [`Dialogs::poll`].
    fn open(&mut self, purpose: Purpose, suggested_name: Option<String>);
    /// Answers of closed dialogs: the purpose and the chosen path (`None` when cancelled).
    fn poll(&mut self) -> Vec<(Purpose, Option<PathBuf>)>;
}

/// rfd dialogs on worker threads.
#[derive(Default)]
pub struct NativeDialogs {
    pending: Vec<(Purpose, Receiver<Option<PathBuf>>)>,
}

impl Dialogs for NativeDialogs {
    fn open(&mut self, purpose: Purpose, suggested_name: Option<String>) {
        let (send, receive) = channel();
        std::thread::spawn(move || {
            let dialog = rfd::FileDialog::new();
            let answer = match purpose {
                Purpose::ModelFile => dialog
                    .set_title("Open a Stable Diffusion checkpoint")
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file(),
                Purpose::ModelFolder => dialog
                    .set_title("Open a diffusers model folder")
                    .pick_folder(),
                Purpose::Taesd => dialog
                    .set_title("Open a TAESD (AutoencoderTiny) for previews")
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file(),
                Purpose::InitImage => dialog
                    .set_title("Open an image")
                    .add_filter("images", &["png", "jpg", "jpeg", "webp"])
                    .pick_file(),
                Purpose::Export(_) => dialog
                    .set_title("Export image")
                    .add_filter("PNG", &["png"])
                    .set_file_name(suggested_name.unwrap_or_else(|| "image.png".into()))
                    .save_file(),
            };
            let _ = send.send(answer);
        });
        self.pending.push((purpose, receive));
    }

    fn poll(&mut self) -> Vec<(Purpose, Option<PathBuf>)> {
        let mut done = Vec::new();
        self.pending
            .retain(|(purpose, receive)| match receive.try_recv() {
                Ok(answer) => {
                    done.push((*purpose, answer));
                    false
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    done.push((*purpose, None));
                    false
                }
            });
        done
    }
}
