//! Where the models run: burn-wgpu on a real GPU, Burn's `flex` CPU backend otherwise. Software
//! Vulkan/GL adapters (lavapipe, llvmpipe) are correct but far slower than `flex`, so they only run
//! the models when asked to.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, FloatDType};

use crate::error::{EngineError, Result};

/// The environment variable that overrides [`Backend::Auto`]: `cpu` or `wgpu`.
pub const BACKEND_ENV: &str = "STUDIO_BACKEND";

/// The environment variable that keeps a GPU's models in full precision: `f32`.
pub const PRECISION_ENV: &str = "STUDIO_PRECISION";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A GPU through wgpu when one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Wgpu,
}

impl FromStr for Backend {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" | "flex" => Ok(Self::Cpu),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            other => Err(EngineError::InvalidRequest(format!(
                "unknown backend '{other}': use auto, cpu or wgpu"
            ))),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
        })
    }
}

/// The device chosen, and what it is in words.
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    pub device: Device,
    pub backend: Backend,
    pub description: String,
    /// The format the models' weights and activations are kept in: half precision on a GPU that
    /// has it (half the memory, and the GPU's faster arithmetic), f32 on the CPU, whose kernels
    /// are f32 ones.
    pub precision: FloatDType,
}

/// Picks the device for `choice`; `STUDIO_BACKEND` overrides `Auto`.
pub fn select(choice: Backend) -> Result<ComputeDevice> {
    let choice = match (choice, std::env::var(BACKEND_ENV)) {
        (Backend::Auto, Ok(value)) => value.parse()?,
        (choice, _) => choice,
    };
    match choice {
        Backend::Cpu => Ok(cpu()),
        Backend::Wgpu => wgpu_device("GPU (wgpu)".into()),
        Backend::Auto => match hardware_gpu() {
            Some(name) => wgpu_device(format!("GPU: {name}")),
            None => Ok(cpu()),
        },
    }
}

/// Half precision where the device computes in it, unless `STUDIO_PRECISION` asks for f32.
fn gpu_precision(device: &Device) -> Result<FloatDType> {
    let wanted = match std::env::var(PRECISION_ENV) {
        Ok(value) => requested_precision(&value)?,
        Err(_) => None,
    };
    let supported = device.supports_dtype(FloatDType::F16);
    match wanted {
        Some(FloatDType::F16) if !supported => Err(EngineError::Backend(
            "this GPU cannot compute in half precision: unset STUDIO_PRECISION or set it to f32"
                .into(),
        )),
        Some(precision) => Ok(precision),
        None if supported => Ok(FloatDType::F16),
        None => Ok(FloatDType::F32),
    }
}

/// A `STUDIO_PRECISION` value: a format, or `None` for the device's choice.
fn requested_precision(value: &str) -> Result<Option<FloatDType>> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "f32" | "full" => Ok(Some(FloatDType::F32)),
        "f16" | "half" => Ok(Some(FloatDType::F16)),
        other => Err(EngineError::InvalidRequest(format!(
            "unknown {PRECISION_ENV} '{other}': use auto, f16 or f32"
        ))),
    }
}

fn cpu() -> ComputeDevice {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    ComputeDevice {
        device: Device::flex(),
        backend: Backend::Cpu,
        description: format!("CPU ({threads} threads)"),
        precision: FloatDType::F32,
    }
}

/// Burn's wgpu runtime can be initialised once per process; every later request reuses it.
fn wgpu_device(name: String) -> Result<ComputeDevice> {
    static RUNTIME: OnceLock<Result<Device, String>> = OnceLock::new();
    let device = RUNTIME
        .get_or_init(|| {
            #[cfg(feature = "spirv")]
            {
                spirv_adapter(hardware_gpu().as_deref())?;
                keep_compiled_kernels();
            }
            Device::wgpu_options()
                .init()
                .map_err(|e| format!("no usable wgpu adapter: {e}"))
        })
        .clone()
        .map_err(EngineError::Backend)?;
    let precision = gpu_precision(&device)?;
    let format = if precision == FloatDType::F16 {
        "f16"
    } else {
        "f32"
    };
    let kernels = if cfg!(feature = "spirv") {
        ", SPIR-V kernels kept on disk"
    } else {
        ""
    };
    Ok(ComputeDevice {
        device,
        backend: Backend::Wgpu,
        description: format!("{name}, {format}{kernels}"),
        precision,
    })
}

/// Where kernels are SPIR-V, the adapter must be a hardware GPU: software Vulkan (lavapipe)
/// crashes the process building SPIR-V pipelines, so it is refused with what to do instead.
#[cfg_attr(not(feature = "spirv"), allow(dead_code))]
fn spirv_adapter(hardware: Option<&str>) -> std::result::Result<(), String> {
    match hardware {
        Some(_) => Ok(()),
        None => Err(
            "no hardware GPU found, and this build (the `spirv` feature) cannot run its kernels \
             on software Vulkan: use the CPU backend, or a build without the `spirv` feature"
                .into(),
        ),
    }
}

/// With the `spirv` feature CubeCL compiles kernels to SPIR-V, which it can keep on disk (its
/// `compilation.cache`, in `~/.cache/cubecl`), so only a machine's first launch compiles them.
/// Everything else comes from the `cubecl.toml` CubeCL itself would read; the cache is turned on
/// whatever that file says.
#[cfg(feature = "spirv")]
fn keep_compiled_kernels() {
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.compilation.cache = true;
    // `false` when CubeCL has read its configuration already; the one in force then stays.
    let _ = CubeClRuntimeConfig::try_set(config);
}

/// The name of the first adapter that is real hardware, if any (GL adapters are never the fast
/// path, and probing them prints display-server noise).
fn hardware_gpu() -> Option<String> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters.into_iter().map(|a| a.get_info()).find_map(|info| {
        matches!(
            info.device_type,
            wgpu::DeviceType::DiscreteGpu
                | wgpu::DeviceType::IntegratedGpu
                | wgpu::DeviceType::VirtualGpu
        )
        .then_some(info.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spirv_kernels_need_a_hardware_gpu_and_say_what_to_use_instead() {
        assert!(spirv_adapter(Some("NVIDIA H100 80GB HBM3")).is_ok());
        let error = spirv_adapter(None).unwrap_err();
        assert!(
            error.contains("software Vulkan") && error.contains("CPU backend"),
            "{error}"
        );
    }

    #[test]
    fn precision_requests_parse_and_unknown_ones_say_what_to_use() {
        assert_eq!(requested_precision(" F32 ").unwrap(), Some(FloatDType::F32));
        assert_eq!(requested_precision("half").unwrap(), Some(FloatDType::F16));
        assert_eq!(requested_precision("auto").unwrap(), None);
        let error = requested_precision("bf8").unwrap_err().to_string();
        assert!(
            error.contains("'bf8'") && error.contains("auto, f16 or f32"),
            "{error}"
        );
    }
}
