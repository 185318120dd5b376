//! The networks of Stable Diffusion as Burn modules. Each is a `Config` + `Module` pair whose
//! field names are the checkpoint's key segments.

pub mod clip;
pub mod cpu_activation;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_gemm;
pub mod cpu_lanes;
pub mod cpu_linear;
pub mod cpu_narrow;
pub mod cpu_norm;
pub mod cpu_pool;
pub mod cpu_winograd;
pub mod gpu_conv;
pub mod layers;
pub mod taesd;
pub mod unet;
pub mod vae;
