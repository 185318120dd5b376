//! The gallery's history on disk: one PNG per image (with its metadata) and an index, in the
//! platform's data directory. All disk work runs on a background thread; an item appears in the
//! gallery only once its file is fully written, and the index is replaced atomically, so killing the
//! studio loses nothing it has shown. Deleting moves the file to a trash folder, so it can be undone;
//! files a crash left out of the index are found again at start-up.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::metadata::{ImageMetadata, encode_png, read_metadata, replace_file, write_new_file};

pub type ItemId = u64;

/// One finished image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: ItemId,
    /// File name inside the gallery folder.
    pub file: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub width: u32,
    pub height: u32,
    pub metadata: ImageMetadata,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    items: Vec<Item>,
}

const INDEX: &str = "index.json";
const TRASH: &str = "trash";

enum Job {
    Save(Box<RgbImage>, Box<ImageMetadata>),
    Trash(ItemId),
    Restore(Box<Item>),
    Export(ItemId, PathBuf),
}

/// What the disk thread reports.
#[derive(Debug)]
pub enum Done {
    Saved(Item),
    Restored(Item),
    Exported(PathBuf),
    Failed(String),
}

/// The history as the studio shows it, newest first.
pub struct Gallery {
    dir: PathBuf,
    items: Vec<Item>,
    deleted: Vec<Item>,
    jobs: Sender<Job>,
    done: Receiver<Done>,
}

impl Gallery {
    /// Opens (or creates) the history in `dir`, reading the index and recovering unindexed files.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join(TRASH))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut items = load_index(dir);
        items.retain(|item| dir.join(&item.file).is_file());
        recover_unindexed(dir, &mut items);
        items.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        let (jobs, inbox) = channel();
        let (outbox, done) = channel();
        let worker = Worker {
            dir: dir.to_path_buf(),
            items: items.clone(),
            next_id: items.iter().map(|i| i.id).max().unwrap_or(0) + 1,
        };
        std::thread::Builder::new()
            .name("studio-gallery".into())
            .spawn(move || worker.run(inbox, outbox))
            .context("starting the gallery thread")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            items,
            deleted: Vec::new(),
            jobs,
            done,
        })
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn get(&self, id: ItemId) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
    }

    pub fn path(&self, item: &Item) -> PathBuf {
        self.dir.join(&item.file)
    }

    /// Saves a finished image; it shows once written (see [`Gallery::poll`]).
    pub fn add(&self, image: RgbImage, metadata: ImageMetadata) {
        let _ = self
            .jobs
            .send(Job::Save(Box::new(image), Box::new(metadata)));
    }

    /// Moves an item to the trash; [`Gallery::undo_delete`] brings it back.
    pub fn delete(&mut self, id: ItemId) {
        if let Some(at) = self.items.iter().position(|i| i.id == id) {
            self.deleted.push(self.items.remove(at));
            let _ = self.jobs.send(Job::Trash(id));
        }
    }

    pub fn can_undo_delete(&self) -> bool {
        !self.deleted.is_empty()
    }

    pub fn undo_delete(&mut self) {
        if let Some(item) = self.deleted.pop() {
            let _ = self.jobs.send(Job::Restore(Box::new(item)));
        }
    }

    /// Copies an item's PNG (metadata included) to `path`, which the save dialog confirmed.
    pub fn export(&self, id: ItemId, path: PathBuf) {
        let _ = self.jobs.send(Job::Export(id, path));
    }

    /// Applies what the disk thread finished; returns it for notices.
    pub fn poll(&mut self) -> Vec<Done> {
        let done: Vec<Done> = std::iter::from_fn(|| self.done.try_recv().ok()).collect();
        for event in &done {
            if let Done::Saved(item) | Done::Restored(item) = event {
                let at = self.items.partition_point(|i| {
                    i.created > item.created || (i.created == item.created && i.id > item.id)
                });
                self.items.insert(at, item.clone());
            }
        }
        done
    }
}

fn load_index(dir: &Path) -> Vec<Item> {
    std::fs::read_to_string(dir.join(INDEX))
        .ok()
        .and_then(|text| serde_json::from_str::<Index>(&text).ok())
        .map(|index| index.items)
        .unwrap_or_default()
}

/// Adds PNGs that a crash left out of the index (written, but the index not yet replaced).
fn recover_unindexed(dir: &Path, items: &mut Vec<Item>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut next = items.iter().map(|i| i.id).max().unwrap_or(0) + 1;
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.ends_with(".png") || file.starts_with('.') || items.iter().any(|i| i.file == file)
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(Some(found)) = read_metadata(&bytes) else {
            continue;
        };
        let Ok(image) = image::load_from_memory(&bytes) else {
            continue;
        };
        let created = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
            .unwrap_or(0);
        let metadata = ImageMetadata::new(
            &found.request,
            found.seed,
            found.model.as_deref().unwrap_or(""),
            None,
        );
        items.push(Item {
            id: next,
            file,
            created,
            width: image.width(),
            height: image.height(),
            metadata,
        });
        next += 1;
    }
}

struct Worker {
    dir: PathBuf,
    /// The index as on disk.
    items: Vec<Item>,
    next_id: ItemId,
}

impl Worker {
    fn run(mut self, inbox: Receiver<Job>, outbox: Sender<Done>) {
        for job in inbox {
            let done = match job {
                Job::Save(image, metadata) => self.save(&image, *metadata).map(Done::Saved),
                Job::Trash(id) => match self.trash(id) {
                    Ok(()) => continue,
                    Err(error) => Err(error),
                },
                Job::Restore(item) => self.restore(*item).map(Done::Restored),
                Job::Export(id, path) => self.export(id, &path).map(|()| Done::Exported(path)),
            };
            let done = done.unwrap_or_else(|error| Done::Failed(format!("{error:#}")));
            if outbox.send(done).is_err() {
                break;
            }
        }
    }

    fn save_index(&self) -> Result<()> {
        let index = Index {
            items: self.items.clone(),
        };
        replace_file(
            &self.dir.join(INDEX),
            serde_json::to_string(&index)?.as_bytes(),
        )
    }

    fn save(&mut self, image: &RgbImage, metadata: ImageMetadata) -> Result<Item> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = self.next_id;
        self.next_id += 1;
        let file = format!("{created}-{id:05}-{}.png", metadata.seed);
        let bytes = encode_png(image, &metadata)?;
        write_new_file(&self.dir.join(&file), &bytes)?;
        let item = Item {
            id,
            file,
            created,
            width: image.width(),
            height: image.height(),
            metadata,
        };
        self.items.push(item.clone());
        self.save_index()?;
        Ok(item)
    }

    fn trash(&mut self, id: ItemId) -> Result<()> {
        let Some(at) = self.items.iter().position(|i| i.id == id) else {
            return Ok(());
        };
        let item = self.items.remove(at);
        std::fs::rename(
            self.dir.join(&item.file),
            self.dir.join(TRASH).join(&item.file),
        )
        .with_context(|| format!("cannot move {} to the trash", item.file))?;
        self.save_index()
    }

    fn restore(&mut self, item: Item) -> Result<Item> {
        std::fs::rename(
            self.dir.join(TRASH).join(&item.file),
            self.dir.join(&item.file),
        )
        .with_context(|| format!("cannot restore {}", item.file))?;
        self.items.push(item.clone());
        self.save_index()?;
        Ok(item)
    }

    fn export(&self, id: ItemId, path: &Path) -> Result<()> {
        let item = self
            .items
            .iter()
            .find(|i| i.id == id)
            .context("the image is no longer in the gallery")?;
        let bytes = std::fs::read(self.dir.join(&item.file))?;
        replace_file(path, &bytes)
    }
}

impl Done {
    /// A `Failed` result's message.
    pub fn error(&self) -> Option<&str> {
        match self {
            Done::Failed(message) => Some(message),
            _ => None,
        }
    }
}

/// Decodes thumbnails off the GUI thread.
pub struct Thumbnails {
    requests: Sender<(ItemId, PathBuf)>,
    results: Receiver<(ItemId, Option<image::RgbaImage>)>,
}

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL: u32 = 128;

impl Default for Thumbnails {
    fn default() -> Self {
        let (requests, inbox) = channel::<(ItemId, PathBuf)>();
        let (outbox, results) = channel();
        std::thread::Builder::new()
            .name("studio-thumbnails".into())
            .spawn(move || {
                for (id, path) in inbox {
                    let thumbnail = image::open(&path)
                        .ok()
                        .map(|i| i.thumbnail(THUMBNAIL, THUMBNAIL).to_rgba8());
                    if outbox.send((id, thumbnail)).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the thumbnail thread");
        Self { requests, results }
    }
}

impl Thumbnails {
    pub fn request(&self, id: ItemId, path: PathBuf) {
        let _ = self.requests.send((id, path));
    }

    pub fn poll(&self) -> Vec<(ItemId, Option<image::RgbaImage>)> {
        std::iter::from_fn(|| self.results.try_recv().ok()).collect()
    }
}
