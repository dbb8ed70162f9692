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

/// The configured-device value of a device candle opened (`auto` resolved).
pub fn resolved_device(device: &CandleDevice) -> Device {
    match device.location() {
        candle_core::DeviceLocation::Cpu => Device::Cpu,
        candle_core::DeviceLocation::Cuda { gpu_id } => Device::Cuda(gpu_id),
        candle_core::DeviceLocation::Metal { .. } => Device::Metal,
    }
}

/// Activation memory one forward pass may use when a model's config sets no
/// `max_batch_memory_mib`: 1 GiB on the CPU (a laptop or a small VM shares it with everything
/// else), 4 GiB on a GPU (next to the weights of several models).
pub fn default_activation_budget(device: &CandleDevice) -> usize {
    const MIB: usize = 1 << 20;
    if device.is_cpu() {
        1024 * MIB
    } else {
        4096 * MIB
    }
}

/// Padded tokens per encoder forward pass when the config sets none: on a CPU, passes of a few
/// hundred tokens run fastest per token (the activations stay in cache; 512 measured ~2x faster
/// than 16,384 for 256-token documents, the same for short sentences, on candle and on ONNX
/// Runtime: benches/README.md); on a GPU, large batches pay.
pub fn default_batch_tokens(device: &CandleDevice) -> usize {
    if device.is_cpu() {
        CPU_BATCH_TOKENS
    } else {
        16_384
    }
}

/// [`default_batch_tokens`] on a CPU (also ONNX Runtime's CPU encoders).
pub const CPU_BATCH_TOKENS: usize = 512;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_encoders_batch_a_few_hundred_tokens() {
        assert_eq!(default_batch_tokens(&CandleDevice::Cpu), CPU_BATCH_TOKENS);
        assert_eq!(CPU_BATCH_TOKENS, 512);
    }
}
