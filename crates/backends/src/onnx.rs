//! ONNX Runtime, loaded at run time (`ort`'s `load-dynamic`) from the library the config names:
//! once per process, shared by every model that runs on it (Piper voices, ONNX encoders).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::BackendError;

static ENVIRONMENT: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// ONNX Runtime, loaded from `library` the first time (`load-dynamic`): a missing or unusable
/// library is an error naming the path, never a panic.
pub fn onnx_environment(library: &Path) -> Result<Environment, BackendError> {
    let loaded = ENVIRONMENT.get_or_init(|| {
        if !library.is_file() {
            return Err(format!(
                "ONNX Runtime was not found at {} (set `[server] onnxruntime_library` or ORT_DYLIB_PATH; \
                 `scripts/fetch-models onnxruntime` installs it)",
                library.display()
            ));
        }
        let builder = ort::init_from(library)
            .map_err(|e| format!("could not load ONNX Runtime from {}: {e}", library.display()))?;
        // A process-wide intra-op thread pool (ONNX Runtime's default size: the physical cores),
        // spinning between operators. Piper voices run their two halves on it, so one half's
        // idle threads never spin against the other's; ONNX encoders keep pools of their own.
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_spin_control(true)
            .map_err(|e| format!("could not configure ONNX Runtime's thread pool: {e}"))?;
        let environment = builder
            .with_name("hearth")
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| format!("could not start ONNX Runtime from {}: {e}", library.display()))?;
        Ok((library.to_path_buf(), environment))
    });
    match loaded {
        Ok((path, environment)) => {
            if path != library {
                tracing::warn!(
                    loaded = %path.display(),
                    asked = %library.display(),
                    "ONNX Runtime is loaded once per process; using the library loaded first"
                );
            }
            Ok(environment.clone())
        }
        Err(message) => Err(BackendError::Unsupported(message.clone())),
    }
}

/// The environment an earlier [`onnx_environment`] call loaded, for code that runs after the loader
/// has named the library.
pub fn loaded_environment() -> Result<Environment, BackendError> {
    match ENVIRONMENT.get() {
        Some(Ok((_, environment))) => Ok(environment.clone()),
        Some(Err(message)) => Err(BackendError::Unsupported(message.clone())),
        None => Err(BackendError::Unsupported("ONNX Runtime has not been loaded".into())),
    }
}
