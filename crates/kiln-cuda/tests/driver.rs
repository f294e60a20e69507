//! Opening a device never panics: without a driver it is an error that says so.
//! Runs on any machine.

use kiln_cuda::context::{device_count, driver_version};
use kiln_cuda::CudaDevice;

#[test]
fn opening_a_device_without_a_driver_is_an_error_not_a_panic() {
    match driver_version() {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("no CUDA driver found") || msg.contains("older than"),
                "{msg}"
            );
            let open = CudaDevice::open(0).unwrap_err().to_string();
            assert_eq!(open, msg, "open reports the driver problem");
            assert!(device_count().is_err());
        }
        Ok(v) => assert!(v >= 13000, "driver {v} passed the version check"),
    }
}

#[test]
fn a_device_that_does_not_exist_is_an_error() {
    let e = CudaDevice::open(4096).unwrap_err().to_string();
    assert!(
        e.contains("no CUDA driver found") || e.contains("cuda:4096 does not exist"),
        "{e}"
    );
}
