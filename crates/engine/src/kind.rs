//! The vocabulary shared by config, engine and backends: model kinds, devices, dtypes, pooling.
//! These are enums end to end; nothing in the request path compares strings to pick behaviour.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a served model does; decides which endpoints accept it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Llm,
    Stt,
    Tts,
    Embedding,
    Rerank,
}

impl ModelKind {
    pub const ALL: [ModelKind; 5] = [Self::Llm, Self::Stt, Self::Tts, Self::Embedding, Self::Rerank];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Stt => "stt",
            Self::Tts => "tts",
            Self::Embedding => "embedding",
            Self::Rerank => "rerank",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a model runs. `Auto` picks the first accelerator compiled in and present, else the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(format!(
                    "unknown device `{s}`, expected one of `auto`, `cpu`, `cuda`, `cuda:N`, `metal`"
                )),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

/// Floating-point type of the weights and activations. `Auto` is f32 on CPU and f16 on GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

/// How token states become one sentence vector (sentence-transformers' pooling modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Average of all non-padding tokens, special tokens included.
    Mean,
    /// The first token's state ([CLS] / <s>).
    Cls,
    /// The last non-padding token's state (decoder-style embedders).
    LastToken,
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::LastToken => "last-token",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses_every_spelling() {
        let check = |s: &str, expected: Device| assert_eq!(s.parse::<Device>(), Ok(expected), "{s}");
        check("auto", Device::Auto);
        check("cpu", Device::Cpu);
        check("cuda", Device::Cuda(0));
        check("cuda:3", Device::Cuda(3));
        check("metal", Device::Metal);
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("expected one of"), "{bad}: {err}");
        }
    }

    #[test]
    fn device_display_round_trips() {
        for d in [Device::Auto, Device::Cpu, Device::Cuda(1), Device::Metal] {
            assert_eq!(d.to_string().parse::<Device>(), Ok(d));
        }
    }
}
