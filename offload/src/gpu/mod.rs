//! The GPU tier and what surrounds it: device memory through the CUDA driver, loaded at run time.
//!
//! - [`probe`]: whether a driver and device are there, without ever panicking (cudarc panics
//!   when it creates a context and `libcuda` is missing, so [`is_driver_present`] runs first);
//! - [`device`]: [`GpuDevice`], one context and a few streams; device allocations, host↔device
//!   copies, page-locked (pinned) host buffers and registration of existing host memory;
//! - [`buffer`]: [`DeviceBuffer`], an owned allocation with safe, bounds-checked copies;
//! - [`slots`]: the device arena's slot bookkeeping, free of CUDA and tested without a device;
//! - [`tier`]: [`GpuTier`], a [`kvtier_cache::Tier`] over device arenas carved into slots;
//! - [`pinned`]: [`PinnedArenas`], host-tier arenas page-locked with the driver;
//! - [`gather`]: one-launch gather/scatter of scattered pages (a small nvrtc kernel);
//! - [`ipc`]: engine buffers mapped by CUDA IPC, saved and restored by page id;
//! - [`telemetry`]: per-GPU memory, utilisation and PCIe throughput from NVML.
//!
//! Everything here builds without CUDA installed; without a driver every constructor returns
//! a [`GpuError`] that the caller logs once.

pub mod buffer;
pub mod device;
pub mod gather;
pub mod ipc;
pub mod pinned;
pub mod slots;
pub mod telemetry;
pub mod tier;

pub use buffer::DeviceBuffer;
pub use device::{GpuDevice, PinnedBuf};
pub use gather::PageCopier;
pub use pinned::PinnedArenas;
pub use telemetry::{GpuStat, gpu_stats};
pub use tier::{GpuBudget, GpuConfig, GpuTier};

use kvtier_cache::{CacheError, TierKind};

/// Everything that can go wrong talking to the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libcuda` could not be loaded: no NVIDIA driver on this machine.
    #[error("no cuda driver found (libcuda could not be loaded); gpu features are disabled")]
    NoDriver,
    /// The driver loaded but there is no device with this ordinal.
    #[error("no cuda device {ordinal} (the driver reports {count})")]
    NoDevice { ordinal: usize, count: usize },
    /// A driver call failed.
    #[error("cuda driver error while {context}: {message}")]
    Driver { context: String, message: String },
    /// The CUDA bindings panicked (a symbol missing from this driver, for instance).
    #[error("cuda bindings failed while {context}: {message}")]
    Panicked { context: String, message: String },
    /// A configuration value out of range.
    #[error("invalid gpu configuration: {0}")]
    Config(String),
    /// Compiling or loading the gather kernel failed.
    #[error("gather kernel unavailable: {0}")]
    Kernel(String),
    /// NVML could not be initialised or queried.
    #[error("nvml: {0}")]
    Nvml(String),
}

impl GpuError {
    pub(crate) fn driver(context: &str, e: impl std::fmt::Display) -> Self {
        GpuError::Driver {
            context: context.to_string(),
            message: e.to_string(),
        }
    }
}

impl From<GpuError> for CacheError {
    fn from(e: GpuError) -> Self {
        CacheError::Backend {
            tier: TierKind::Gpu,
            message: e.to_string(),
        }
    }
}

/// Whether the CUDA driver library can be loaded. Cheap; never panics.
pub fn is_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names; no symbol is called.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Runs `f`, turning a panic inside the CUDA bindings into [`GpuError::Panicked`].
pub(crate) fn guarded<T>(
    context: &str,
    f: impl FnOnce() -> Result<T, GpuError>,
) -> Result<T, GpuError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string());
            Err(GpuError::Panicked {
                context: context.to_string(),
                message,
            })
        }
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub compute_capability: (i32, i32),
}

/// Opens device `ordinal` and describes it; [`GpuError::NoDriver`] without a driver.
pub fn probe(ordinal: usize) -> Result<GpuInfo, GpuError> {
    let dev = GpuDevice::open(ordinal)?;
    dev.info()
}

/// Whether GPU tests must run: `KVTIER_REQUIRE_GPU=1` turns a missing GPU into a failure.
pub fn gpu_required() -> bool {
    std::env::var("KVTIER_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// For tests: the device, or `None` after printing plainly that the GPU tests did not run.
/// Panics when [`gpu_required`] and no device opens, so a suite never passes on a GPU machine
/// with zero GPU tests executed.
pub fn test_device(test: &str) -> Option<std::sync::Arc<GpuDevice>> {
    match GpuDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) if gpu_required() => {
            panic!("KVTIER_REQUIRE_GPU=1 but no gpu for {test}: {e}")
        }
        Err(e) => {
            say(&format!("gpu tests: {test} skipped, not run: {e}"));
            None
        }
    }
}

/// Writes one line to stderr past the test harness's output capture (which only intercepts
/// the `print!` family), so a skipped GPU test is visible in every test run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
