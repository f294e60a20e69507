//! `--device auto|cpu|cuda[:N]`: the argument every computing command takes, and
//! its resolution to a device.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use kiln_core::Result;
use kiln_cuda::CudaDevice;

/// The device a user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when it works, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device `N` (`cuda` alone is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N (N a device number)")
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The `--device` option, flattened into each command's arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to compute: auto (CUDA when a device works, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: DeviceChoice,
}

/// A resolved device.
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

/// Opens the device `choice` names. `auto` takes CUDA device 0 when it opens, else
/// the CPU, and says on stderr which it chose and why; an explicit `cuda[:N]` that
/// does not open is an error.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => CudaDevice::open(n).map(Device::Cuda),
        DeviceChoice::Auto => match CudaDevice::open(0) {
            Ok(d) => {
                eprintln!("kiln: --device auto chose cuda:0 ({})", d.name());
                Ok(Device::Cuda(d))
            }
            Err(e) => {
                eprintln!("kiln: --device auto chose cpu ({e})");
                Ok(Device::Cpu)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        for (s, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(want), "{s}");
        }
    }

    #[test]
    fn display_round_trips() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>(), Ok(c));
        }
    }

    #[test]
    fn rejects_malformed_devices_with_a_clear_message() {
        for s in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda0", ""] {
            let e = s.parse::<DeviceChoice>().unwrap_err();
            assert!(
                e.contains(&format!("{s:?}")) && e.contains("cuda:N"),
                "{s}: {e}"
            );
        }
    }

    #[test]
    fn cpu_resolves_without_touching_cuda() {
        assert!(matches!(resolve(DeviceChoice::Cpu), Ok(Device::Cpu)));
    }

    #[test]
    fn auto_resolves_to_some_device() {
        // CUDA device 0 where it works, else the CPU: never an error.
        match resolve(DeviceChoice::Auto) {
            Ok(Device::Cpu) => {}
            Ok(Device::Cuda(d)) => assert_eq!(d.ordinal(), 0),
            Err(e) => panic!("auto must fall back to the CPU, got {e}"),
        }
    }
}
