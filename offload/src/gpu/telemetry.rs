//! Per-GPU telemetry from NVML (nvml-wrapper): memory, utilisation, PCIe throughput.
//!
//! NVML is initialised once per process and kept (initialising takes tens of milliseconds);
//! `Nvml::init` returns an error, not a panic, where `libnvidia-ml` is missing, and then
//! [`gpu_stats`] reports that error and callers show an empty list.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::PcieUtilCounter;
use serde::{Deserialize, Serialize};

use super::GpuError;

/// One GPU's readings. A reading NVML refuses for this device is `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStat {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of time a kernel ran over the last sample period.
    pub utilization_gpu_pct: Option<u32>,
    /// Percent of time device memory was read or written.
    pub utilization_memory_pct: Option<u32>,
    /// PCIe receive (host→device) throughput, KB/s, over NVML's 20 ms window.
    pub pcie_rx_kbps: Option<u32>,
    /// PCIe transmit (device→host) throughput, KB/s.
    pub pcie_tx_kbps: Option<u32>,
}

fn nvml() -> Result<&'static Nvml, GpuError> {
    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| GpuError::Nvml(format!("not available: {e}")))
}

/// Readings of every GPU NVML sees; an error when NVML cannot be initialised.
pub fn gpu_stats() -> Result<Vec<GpuStat>, GpuError> {
    let nvml = nvml()?;
    let count = nvml
        .device_count()
        .map_err(|e| GpuError::Nvml(format!("counting devices: {e}")))?;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = nvml
            .device_by_index(index)
            .map_err(|e| GpuError::Nvml(format!("opening device {index}: {e}")))?;
        let mem = dev
            .memory_info()
            .map_err(|e| GpuError::Nvml(format!("memory of device {index}: {e}")))?;
        let util = dev.utilization_rates().ok();
        out.push(GpuStat {
            index,
            name: dev.name().unwrap_or_else(|_| "unknown".to_string()),
            memory_total_bytes: mem.total,
            memory_used_bytes: mem.used,
            memory_free_bytes: mem.free,
            utilization_gpu_pct: util.as_ref().map(|u| u.gpu),
            utilization_memory_pct: util.as_ref().map(|u| u.memory),
            pcie_rx_kbps: dev.pcie_throughput(PcieUtilCounter::Receive).ok(),
            pcie_tx_kbps: dev.pcie_throughput(PcieUtilCounter::Send).ok(),
        });
    }
    Ok(out)
}

/// [`gpu_stats`], or an empty list when NVML is unavailable (the error is for one log line).
pub fn gpu_stats_or_empty() -> (Vec<GpuStat>, Option<String>) {
    match gpu_stats() {
        Ok(v) => (v, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    }
}
