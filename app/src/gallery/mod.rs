//! Finished images on disk: PNG metadata, and the studio's history.

pub mod history;
pub mod metadata;
