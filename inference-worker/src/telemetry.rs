//! NVML telemetry of the GPU the worker serves on: memory, utilisation, temperature,
//! power, throttle reasons and XID errors, sampled on a thread into the `/metrics`
//! families. NVML missing (a CPU node) is normal: the worker logs it once and exports no
//! GPU series.

use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};

use crate::metrics::{GpuSample, Metrics};

/// The throttle reasons exported, with the names NVIDIA's tools use.
pub const THROTTLE_REASONS: [(ThrottleReasons, &str); 7] = [
    (ThrottleReasons::GPU_IDLE, "GpuIdle"),
    (ThrottleReasons::SW_POWER_CAP, "SwPowerCap"),
    (ThrottleReasons::HW_SLOWDOWN, "HwSlowdown"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "SwThermalSlowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "HwThermalSlowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "HwPowerBrakeSlowdown",
    ),
    (ThrottleReasons::SYNC_BOOST, "SyncBoost"),
];

/// Each known reason and whether `active` has it.
pub fn throttle_flags(active: ThrottleReasons) -> Vec<(&'static str, bool)> {
    THROTTLE_REASONS
        .iter()
        .map(|(r, name)| (*name, active.contains(*r)))
        .collect()
}

/// An open NVML handle on one GPU.
pub struct Telemetry {
    nvml: &'static Nvml,
    index: u32,
    events: Option<EventSet<'static>>,
}

impl Telemetry {
    /// Opens NVML for GPU `index`. The error says why (for the log), and is expected
    /// on CPU nodes.
    pub fn open(index: u32) -> Result<Telemetry, NvmlError> {
        // The sampler lives as long as the process and the event set borrows NVML:
        // leaking the one handle gives both a 'static lifetime.
        let nvml: &'static Nvml = Box::leak(Box::new(Nvml::init()?));
        let device = nvml.device_by_index(index)?;
        let events = nvml.create_event_set().ok().and_then(|set| {
            device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .ok()
        });
        if events.is_none() {
            tracing::warn!(
                gpu = index,
                "XID events unsupported on this GPU; not counted"
            );
        }
        Ok(Telemetry {
            nvml,
            index,
            events,
        })
    }

    /// One reading (and the XID errors since the last one).
    pub fn sample(&mut self) -> Result<GpuSample, NvmlError> {
        let d = self.nvml.device_by_index(self.index)?;
        let mem = d.memory_info()?;
        let mut xids = Vec::new();
        if let Some(set) = &self.events {
            while let Ok(ev) = set.wait(0) {
                let xid = match ev.event_data {
                    Some(XidError::Value(v)) => v,
                    _ => 0,
                };
                tracing::error!(gpu = self.index, xid, "critical XID error");
                xids.push(xid);
            }
        }
        Ok(GpuSample {
            memory_used: mem.used,
            memory_total: mem.total,
            utilization: d.utilization_rates().map_or(0.0, |u| u.gpu as f64 / 100.0),
            temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            power_w: d.power_usage().map_or(0.0, |mw| mw as f64 / 1000.0),
            throttle: throttle_flags(
                d.current_throttle_reasons()
                    .unwrap_or(ThrottleReasons::NONE),
            ),
            xids,
        })
    }
}

/// The GPUs this process was given, by UUID: what NVML sees (only the devices the
/// container runtime exposed), else the UUIDs in `NVIDIA_VISIBLE_DEVICES` (how NVIDIA's
/// device plugin names its assignment; `all`, `none` and indices name no UUID).
pub fn visible_gpus() -> Vec<String> {
    let from_nvml = Nvml::init().ok().and_then(|nvml| {
        let n = nvml.device_count().ok()?;
        (0..n)
            .map(|i| nvml.device_by_index(i).ok()?.uuid().ok())
            .collect::<Option<Vec<String>>>()
    });
    match from_nvml {
        Some(uuids) if !uuids.is_empty() => uuids,
        _ => uuids_in(&std::env::var("NVIDIA_VISIBLE_DEVICES").unwrap_or_default()),
    }
}

/// The device UUIDs in an `NVIDIA_VISIBLE_DEVICES` value.
pub fn uuids_in(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|d| d.starts_with("GPU-") || d.starts_with("MIG-"))
        .map(String::from)
        .collect()
}

/// Starts sampling GPU `index` every `every` into `metrics`. Returns false, having logged
/// why, when NVML is not there (CPU nodes).
pub fn spawn(metrics: Arc<Metrics>, index: u32, every: Duration) -> bool {
    let mut t = match Telemetry::open(index) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "NVML not available: no GPU telemetry (normal on CPU nodes)");
            return false;
        }
    };
    std::thread::Builder::new()
        .name("nvml".into())
        .spawn(move || loop {
            match t.sample() {
                Ok(s) => metrics.record_gpu(index, &s),
                Err(e) => tracing::warn!(gpu = index, error = %e, "NVML sample failed"),
            }
            std::thread::sleep(every);
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_plugin_s_uuids_are_read_and_exported() {
        assert_eq!(
            uuids_in("GPU-aa, MIG-bb,0,all"),
            ["GPU-aa".to_string(), "MIG-bb".to_string()]
        );
        assert!(uuids_in("all").is_empty() && uuids_in("").is_empty());
        let m = Metrics::new();
        m.set_gpus(&["GPU-aa".into()]);
        assert!(m
            .encode()
            .contains("gpuscale_worker_gpu_info{uuid=\"GPU-aa\"} 1"));
    }

    #[test]
    fn a_reading_is_exported_in_prometheus_text() {
        let m = Metrics::new();
        let mut s = GpuSample {
            memory_used: 40 << 30,
            memory_total: 80 << 30,
            utilization: 0.97,
            temperature_c: 71,
            power_w: 612.5,
            throttle: throttle_flags(ThrottleReasons::SW_POWER_CAP),
            xids: vec![79],
        };
        m.record_gpu(0, &s);
        s.xids = vec![79, 48];
        s.throttle = throttle_flags(ThrottleReasons::NONE);
        m.record_gpu(0, &s);
        let text = m.encode();
        for line in [
            "gpuscale_worker_gpu_memory_used_bytes{gpu=\"0\"} 42949672960",
            "gpuscale_worker_gpu_memory_total_bytes{gpu=\"0\"} 85899345920",
            "gpuscale_worker_gpu_utilization_ratio{gpu=\"0\"} 0.97",
            "gpuscale_worker_gpu_temperature_celsius{gpu=\"0\"} 71",
            "gpuscale_worker_gpu_power_watts{gpu=\"0\"} 612.5",
            "gpuscale_worker_gpu_throttle_active{gpu=\"0\",reason=\"SwPowerCap\"} 0",
            "gpuscale_worker_gpu_throttle_active{gpu=\"0\",reason=\"HwThermalSlowdown\"} 0",
            "gpuscale_worker_gpu_xid_errors_total{gpu=\"0\",xid=\"79\"} 2",
            "gpuscale_worker_gpu_xid_errors_total{gpu=\"0\",xid=\"48\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn throttle_flags_name_every_reason_once() {
        let f = throttle_flags(ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_SLOWDOWN);
        assert_eq!(f.len(), THROTTLE_REASONS.len());
        let on: Vec<_> = f.iter().filter(|(_, a)| *a).map(|(n, _)| *n).collect();
        assert_eq!(on, ["SwPowerCap", "HwSlowdown"]);
    }

    #[test]
    fn without_nvml_nothing_is_exported_and_nothing_fails() {
        if Telemetry::open(0).is_ok() {
            eprintln!("SKIPPED: NVML is present on this node (the GPU machine)");
            return;
        }
        let m = Arc::new(Metrics::new());
        assert!(!spawn(Arc::clone(&m), 0, Duration::from_secs(1)));
        let text = m.encode();
        assert!(!text.contains("gpu_memory_used_bytes{"), "{text}");
        assert!(
            text.contains("gpuscale_worker_ready"),
            "the other metrics stay"
        );
    }
}
