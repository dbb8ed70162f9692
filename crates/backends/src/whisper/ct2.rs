//! CTranslate2's model format (`model.bin`, binary version 6 as `ctranslate2.specs.model_spec`
//! writes it), read directly so faster-whisper's model folders load as they are.
//!
//! Layout (little-endian): `u32` version, name (`u16` length + bytes with a NUL), `u32` spec
//! revision, `u32` variable count; per variable: name, `u8` rank, `u32` dims, `u8` dtype,
//! `u32` byte count, data; then `u32` alias count and (alias, target) name pairs. int8 weights
//! come with a `…_scale` variable (per output row): the float weight is `q / scale`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::BackendError;

/// The variables of one model.bin, by name (aliases resolved), plus the spec's name.
pub struct Ct2Model {
    pub spec: String,
    pub revision: u32,
    variables: HashMap<String, Variable>,
}

struct Variable {
    dims: Vec<usize>,
    dtype: Ct2Type,
    data: std::sync::Arc<[u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ct2Type {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Type {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Ct2Type::F32,
            1 => Ct2Type::I8,
            2 => Ct2Type::I16,
            3 => Ct2Type::I32,
            4 => Ct2Type::F16,
            5 => Ct2Type::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Ct2Type::I8 => 1,
            Ct2Type::I16 | Ct2Type::F16 | Ct2Type::Bf16 => 2,
            Ct2Type::F32 | Ct2Type::I32 => 4,
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("the file ends inside a field at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = usize::from(self.u16()?);
        let raw = self.take(len)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
}

impl Ct2Model {
    pub fn read(path: &Path) -> Result<Self, BackendError> {
        let bytes = std::fs::read(path).map_err(|source| BackendError::Io { path: path.into(), source })?;
        Self::parse(&bytes).map_err(|why| {
            BackendError::Unsupported(format!("{}: not a CTranslate2 model: {why}", path.display()))
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u32()?;
        if !(5..=6).contains(&version) {
            return Err(format!("binary version {version} (Hearth reads 5 and 6)"));
        }
        let spec = r.string()?;
        let revision = r.u32()?;
        let count = r.u32()? as usize;
        let mut variables = HashMap::with_capacity(count);
        for _ in 0..count {
            let name = r.string()?;
            let rank = usize::from(r.u8()?);
            let dims = (0..rank).map(|_| r.u32().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            let dtype_id = r.u8()?;
            let dtype =
                Ct2Type::from_id(dtype_id).ok_or_else(|| format!("{name}: unknown dtype {dtype_id}"))?;
            let n_bytes = r.u32()? as usize;
            let elements: usize = dims.iter().product();
            if elements.checked_mul(dtype.size()) != Some(n_bytes) {
                return Err(format!("{name}: {n_bytes} bytes for dims {dims:?} of {dtype:?}"));
            }
            let data: std::sync::Arc<[u8]> = r.take(n_bytes)?.into();
            variables.insert(name, Variable { dims, dtype, data });
        }
        let aliases = r.u32()? as usize;
        for _ in 0..aliases {
            let alias = r.string()?;
            let target = r.string()?;
            let variable =
                variables.get(&target).ok_or_else(|| format!("alias {alias} names a missing {target}"))?;
            let copy =
                Variable { dims: variable.dims.clone(), dtype: variable.dtype, data: variable.data.clone() };
            variables.insert(alias, copy);
        }
        Ok(Ct2Model { spec, revision, variables })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.variables.contains_key(name)
    }

    /// An integer scalar (e.g. `encoder/num_heads`).
    pub fn scalar(&self, name: &str) -> Result<i64, BackendError> {
        let v = self.variable(name)?;
        let b = &v.data;
        Ok(match (v.dtype, b.len()) {
            (Ct2Type::I8, 1) => i64::from(b[0] as i8),
            (Ct2Type::I16, 2) => i64::from(i16::from_le_bytes([b[0], b[1]])),
            (Ct2Type::I32, 4) => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => return Err(BackendError::Unsupported(format!("{name} is not an integer scalar"))),
        })
    }

    fn variable(&self, name: &str) -> Result<&Variable, BackendError> {
        self.variables
            .get(name)
            .ok_or_else(|| BackendError::Unsupported(format!("the CTranslate2 model has no variable {name}")))
    }

    /// A float tensor in `dtype` on `device`; int8 weights are dequantized with their scales.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, BackendError> {
        let v = self.variable(name)?;
        let host = match v.dtype {
            Ct2Type::F32 => Tensor::from_raw_buffer(&v.data, DType::F32, &v.dims, &Device::Cpu)?,
            Ct2Type::F16 => Tensor::from_raw_buffer(&v.data, DType::F16, &v.dims, &Device::Cpu)?,
            Ct2Type::Bf16 => Tensor::from_raw_buffer(&v.data, DType::BF16, &v.dims, &Device::Cpu)?,
            Ct2Type::I8 => {
                let scale_name = format!("{name}_scale");
                let scale = self.tensor(&scale_name, DType::F32, &Device::Cpu)?;
                let rows = v.dims.first().copied().unwrap_or(1);
                let q: Vec<f32> = v.data.iter().map(|&b| f32::from(b as i8)).collect();
                let q = Tensor::from_vec(q, v.dims.clone(), &Device::Cpu)?;
                let scale = scale.reshape((rows, 1))?;
                q.broadcast_div(&scale)?
            }
            other => {
                return Err(BackendError::Unsupported(format!("{name}: {other:?} is not a float tensor")))
            }
        };
        Ok(host.to_dtype(dtype)?.to_device(device)?)
    }
}
