//! `--device auto|cpu|cuda:N`: what was asked, what the node has, what runs, and why.
//! The decision is pure ([`select`]); [`Probe::detect`] reads the node.

use std::fmt;
use std::str::FromStr;

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA when a driver, a GPU and NVRTC are present, else CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device N; an error when it cannot be used.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device (use auto, cpu, cuda or cuda:N)")),
        }
    }
}

/// The device that runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What the node offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// libcuda loads.
    pub driver: bool,
    /// GPUs the driver reports.
    pub gpus: usize,
    /// libnvrtc loads (kernels are compiled at start).
    pub nvrtc: bool,
}

impl Probe {
    /// Reads the node: dlopen probes only, no panics when libraries are missing.
    pub fn detect() -> Probe {
        // SAFETY: only tries to dlopen libcuda.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        Probe {
            driver,
            gpus: if driver {
                crate::backend::cuda::device_count()
            } else {
                0
            },
            nvrtc: crate::backend::cuda::kernels::nvrtc_present(),
        }
    }
}

/// The device chosen, and a sentence saying why (logged at start).
pub fn select(req: DeviceRequest, p: Probe) -> Result<(Device, String), String> {
    let missing = if !p.driver {
        Some("no CUDA driver (libcuda.so.1 not found)".to_string())
    } else if p.gpus == 0 {
        Some("the CUDA driver reports no GPU".to_string())
    } else if !p.nvrtc {
        Some("NVRTC (libnvrtc.so.12) not found, so kernels cannot be compiled".to_string())
    } else {
        None
    };
    match (req, missing) {
        (DeviceRequest::Cpu, _) => Ok((Device::Cpu, "--device cpu".into())),
        (DeviceRequest::Auto, Some(why)) => Ok((Device::Cpu, format!("auto: {why}"))),
        (DeviceRequest::Auto, None) => Ok((
            Device::Cuda(0),
            format!("auto: {} GPU(s) with a CUDA driver and NVRTC", p.gpus),
        )),
        (DeviceRequest::Cuda(n), Some(why)) => Err(format!("--device cuda:{n}: {why}")),
        (DeviceRequest::Cuda(n), None) if n >= p.gpus => Err(format!(
            "--device cuda:{n}: this node has {} GPU(s) (cuda:0..cuda:{})",
            p.gpus,
            p.gpus - 1
        )),
        (DeviceRequest::Cuda(n), None) => Ok((Device::Cuda(n), format!("--device cuda:{n}"))),
    }
}

/// The devices of `--device a,b,...`, in order (a layer split when more than one), each
/// with why. `auto` stands alone: which devices a split uses is the user's choice. A
/// device may appear twice (two parts on one GPU, as the split's GPU test runs).
pub fn select_all(reqs: &[DeviceRequest], p: Probe) -> Result<Vec<(Device, String)>, String> {
    if reqs.len() > 1 && reqs.contains(&DeviceRequest::Auto) {
        return Err(
            "--device: auto cannot be part of a list; name each device of a split (cuda:0,cuda:1)"
                .into(),
        );
    }
    if reqs.is_empty() {
        return Err("--device: no device given".into());
    }
    reqs.iter().map(|r| select(*r, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: Probe = Probe {
        driver: true,
        gpus: 2,
        nvrtc: true,
    };
    const NONE: Probe = Probe {
        driver: false,
        gpus: 0,
        nvrtc: false,
    };

    #[test]
    fn parses_the_flag() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(e.contains("use auto, cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_picks_cuda_only_when_everything_is_there_and_says_why_not() {
        assert_eq!(select(DeviceRequest::Auto, GPU).unwrap().0, Device::Cuda(0));
        let (d, why) = select(DeviceRequest::Auto, NONE).unwrap();
        assert_eq!(d, Device::Cpu);
        assert!(why.contains("no CUDA driver"), "{why}");
        let no_gpu = Probe { gpus: 0, ..GPU };
        assert!(select(DeviceRequest::Auto, no_gpu)
            .unwrap()
            .1
            .contains("reports no GPU"));
        let no_nvrtc = Probe {
            nvrtc: false,
            ..GPU
        };
        let (d, why) = select(DeviceRequest::Auto, no_nvrtc).unwrap();
        assert_eq!(d, Device::Cpu);
        assert!(why.contains("NVRTC"), "{why}");
    }

    #[test]
    fn an_explicit_cuda_device_that_cannot_run_is_an_error() {
        assert_eq!(
            select(DeviceRequest::Cuda(1), GPU).unwrap().0,
            Device::Cuda(1)
        );
        let e = select(DeviceRequest::Cuda(2), GPU).unwrap_err();
        assert!(e.contains("has 2 GPU(s) (cuda:0..cuda:1)"), "{e}");
        let e = select(DeviceRequest::Cuda(0), NONE).unwrap_err();
        assert!(e.starts_with("--device cuda:0: no CUDA driver"), "{e}");
        assert_eq!(select(DeviceRequest::Cpu, GPU).unwrap().0, Device::Cpu);
    }

    #[test]
    fn probing_this_node_never_panics() {
        // On a CPU-only machine (CI) this is the absent-driver path; on the GPU machine
        // it finds the devices. Either way auto resolves to something that can run.
        let p = Probe::detect();
        let (d, why) = select(DeviceRequest::Auto, p).unwrap();
        eprintln!("this node: {p:?} -> {d} ({why})");
        assert_eq!(d == Device::Cpu, !(p.driver && p.gpus > 0 && p.nvrtc));
    }

    #[test]
    fn a_list_is_a_split_in_order_and_auto_stands_alone() {
        use DeviceRequest::{Auto, Cpu, Cuda};
        let got = select_all(&[Cuda(1), Cuda(0), Cpu], GPU).unwrap();
        let devices: Vec<Device> = got.into_iter().map(|d| d.0).collect();
        assert_eq!(devices, [Device::Cuda(1), Device::Cuda(0), Device::Cpu]);
        assert_eq!(select_all(&[Cpu, Cpu], NONE).unwrap().len(), 2);
        let e = select_all(&[Auto, Cpu], GPU).unwrap_err();
        assert!(e.contains("auto cannot be part of a list"), "{e}");
        let e = select_all(&[Cuda(0), Cuda(2)], GPU).unwrap_err();
        assert!(e.contains("--device cuda:2: this node has 2 GPU(s)"), "{e}");
        assert!(select_all(&[Cuda(0)], NONE).is_err());
    }
}
