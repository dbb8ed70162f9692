//! Maps the configured device and dtype onto candle's, resolving `auto`.

use candle_core::{DType as CandleDType, Device as CandleDevice};
use hearth_engine::{DType, Device};

use crate::error::BackendError;

pub fn select_device(device: Device) -> Result<CandleDevice, BackendError> {
    let wrap = |source| BackendError::Device { device: device.to_string(), source };
    match device {
        Device::Cpu => Ok(CandleDevice::Cpu),
        Device::Cuda(ordinal) => CandleDevice::new_cuda(ordinal).map_err(wrap),
        Device::Metal => CandleDevice::new_metal(0).map_err(wrap),
        Device::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(cuda) = CandleDevice::new_cuda(0) {
                    return Ok(cuda);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(metal) = CandleDevice::new_metal(0) {
                    return Ok(metal);
                }
            }
            Ok(CandleDevice::Cpu)
        }
    }
}

/// `auto` is f32 on the CPU (half precision is slower there) and f16 on GPUs.
pub fn select_dtype(dtype: DType, device: &CandleDevice) -> CandleDType {
    match dtype {
        DType::F32 => CandleDType::F32,
        DType::F16 => CandleDType::F16,
        DType::Bf16 => CandleDType::BF16,
        DType::Auto if device.is_cpu() => CandleDType::F32,
        DType::Auto => CandleDType::F16,
    }
}

pub fn describe(device: &CandleDevice) -> String {
    match device {
        CandleDevice::Cpu => "cpu".into(),
        CandleDevice::Cuda(_) => "cuda".into(),
        CandleDevice::Metal(_) => "metal".into(),
    }
}

/// Fixes candle's CPU thread count for the life of the process.
///
/// candle 0.11 works out its matmul thread count on every CPU matmul, by parsing `/proc/cpuinfo`
/// for the physical core count unless `RAYON_NUM_THREADS` is set. That costs tens of microseconds
/// per matmul on a small VM and milliseconds on a large server. Computing it once and publishing
/// it through `RAYON_NUM_THREADS` keeps candle's choice (physical cores) and makes every later
/// lookup an environment read. A value the user set is left alone.
///
/// Call it at the start of `main`, before any other thread exists: it changes the environment.
pub fn pin_cpu_threads() -> usize {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    threads
}
