//! The studio's panes. Each draws itself from the state it is given and returns [`Action`]s; the
//! app applies them in one place. Panes do no I/O.

pub mod canvas;
pub mod gallery;
pub mod prompt;
pub mod settings;

use std::path::PathBuf;

use crate::gallery::history::ItemId;

/// Everything a pane can ask the studio to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Generate,
    Cancel,
    OpenModelFile,
    OpenModelFolder,
    OpenTaesd,
    LoadModel(PathBuf),
    OpenInitImage,
    ClearCanvas,
    RandomSeed,
    ReuseSeed(ItemId),
    ReuseParameters(ItemId),
    SendToCanvas(ItemId),
    View(Option<ItemId>),
    Delete(ItemId),
    UndoDelete,
    Export(ItemId),
    DismissNotice(usize),
    UseDroppedAsInit,
    RestoreDropped,
}
