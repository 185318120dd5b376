//! Reading weights: safetensors headers, name remapping, strict loading.

pub mod index;
pub mod load;
pub mod remap;
