//! safetensors: an 8-byte little-endian header length, a JSON header mapping tensor names to
//! `{dtype, shape, data_offsets}`, then the data. Read from untrusted bytes (LoRA adapters), so everything is checked
//! before use: header size cap, JSON shape, dtype, shape product against the byte range, and the byte ranges
//! contiguous, non-overlapping and covering the data exactly. Also a writer (adapters exported by lorag).

use crate::{Error, Result};

fn bad(detail: impl Into<String>) -> Error {
    Error::Adapter {
        tensor: "adapter_model.safetensors".into(),
        detail: detail.into(),
    }
}

/// Element types lorag reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
    /// The header's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }
}

/// Limits on a safetensors file.
#[derive(Debug, Clone, Copy)]
pub struct SafetensorsLimits {
    /// Largest JSON header, bytes.
    pub max_header_bytes: usize,
    /// Most tensors.
    pub max_tensors: usize,
}

impl Default for SafetensorsLimits {
    fn default() -> Self {
        SafetensorsLimits {
            max_header_bytes: 16 << 20,
            max_tensors: 1 << 16,
        }
    }
}

/// One tensor's entry: name, element type, shape and absolute byte range in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major, outermost first).
    pub shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub start: usize,
    /// Byte length.
    pub len: usize,
}

impl TensorEntry {
    /// Elements.
    pub fn elements(&self) -> usize {
        self.len / self.dtype.size()
    }
}

/// A parsed header: the tensors, sorted by offset, and the `__metadata__` strings.
#[derive(Debug, Clone, Default)]
pub struct SafeTensors {
    /// Tensors in file order.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` (string → string), when present.
    pub metadata: Vec<(String, String)>,
}

impl SafeTensors {
    /// Parse and check the header of `bytes` (the whole file).
    pub fn parse(bytes: &[u8], limits: SafetensorsLimits) -> Result<SafeTensors> {
        if bytes.len() < 8 {
            return Err(bad(format!(
                "the file is {} bytes, too short for the 8-byte header length",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if n > limits.max_header_bytes as u64 {
            return Err(bad(format!(
                "the header claims {n} bytes; the limit is {}",
                limits.max_header_bytes
            )));
        }
        let n = n as usize;
        if 8 + n > bytes.len() {
            return Err(bad(format!(
                "the header claims {n} bytes but only {} follow (the file is truncated)",
                bytes.len() - 8
            )));
        }
        let head = std::str::from_utf8(&bytes[8..8 + n])
            .map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
        let head: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(head.trim_end_matches(' '))
                .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
        if head.len() > limits.max_tensors + 1 {
            return Err(bad(format!(
                "the header lists {} tensors; the limit is {}",
                head.len(),
                limits.max_tensors
            )));
        }
        let data_len = bytes.len() - 8 - n;
        let mut out = SafeTensors::default();
        for (name, v) in head {
            if name == "__metadata__" {
                let m = v
                    .as_object()
                    .ok_or_else(|| bad("__metadata__ is not an object"))?;
                for (k, v) in m {
                    let v = v
                        .as_str()
                        .ok_or_else(|| bad(format!("__metadata__.{k} is not a string")))?;
                    out.metadata.push((k.clone(), v.to_owned()));
                }
                continue;
            }
            let e = |d: &str| bad(format!("tensor {name}: {d}"));
            let o = v.as_object().ok_or_else(|| e("entry is not an object"))?;
            let dtype = match o.get("dtype").and_then(|d| d.as_str()) {
                Some("F32") => Dtype::F32,
                Some("F16") => Dtype::F16,
                Some("BF16") => Dtype::BF16,
                Some(
                    d @ ("F64" | "I64" | "I32" | "I16" | "I8" | "U8" | "U16" | "U32" | "U64"
                    | "BOOL" | "F8_E4M3" | "F8_E5M2"),
                ) => {
                    return Err(e(&format!(
                        "dtype {d} is not supported (F32, F16 and BF16 are)"
                    )))
                }
                Some(d) => return Err(e(&format!("unknown dtype {d:?}"))),
                None => return Err(e("dtype is missing")),
            };
            let shape = o
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| e("shape is missing"))?;
            if shape.len() > 8 {
                return Err(e(&format!("{} dimensions", shape.len())));
            }
            let shape: Vec<usize> = shape
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| e("shape holds something other than sizes"))?;
            let offs = o
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .filter(|a| a.len() == 2)
                .ok_or_else(|| e("data_offsets is not a pair"))?;
            let (b, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
                (Some(b), Some(end)) if b <= end && end <= data_len as u64 => {
                    (b as usize, end as usize)
                }
                _ => {
                    return Err(e(&format!(
                        "data_offsets {offs:?} are not a range inside the {data_len} data bytes"
                    )))
                }
            };
            let want = shape
                .iter()
                .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
                .ok_or_else(|| e("shape overflows"))?;
            if want != end - b {
                return Err(e(&format!(
                    "shape {shape:?} of {} needs {want} bytes but data_offsets span {}",
                    dtype.name(),
                    end - b
                )));
            }
            out.tensors.push(TensorEntry {
                name,
                dtype,
                shape,
                start: 8 + n + b,
                len: end - b,
            });
        }
        out.tensors.sort_by_key(|t| (t.start, t.len));
        let mut at = 8 + n;
        for t in &out.tensors {
            if t.start != at {
                return Err(bad(format!(
                    "tensor {} starts at data byte {} where {} was expected: tensors overlap or leave a hole",
                    t.name,
                    t.start - 8 - n,
                    at - 8 - n
                )));
            }
            at += t.len;
        }
        if at != bytes.len() {
            return Err(bad(format!(
                "the tensors cover {} data bytes but the file has {data_len}",
                at - 8 - n
            )));
        }
        Ok(out)
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A tensor's values as f32 (`bytes` is the whole file the entry came from).
pub fn to_f32(t: &TensorEntry, bytes: &[u8]) -> Vec<f32> {
    let d = &bytes[t.start..t.start + t.len];
    match t.dtype {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| super::quant::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
    }
}

/// Write F32 tensors (name, shape, values) as a safetensors file, in the order given, with optional
/// `__metadata__`.
pub fn write_f32(tensors: &[(String, Vec<usize>, &[f32])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut head = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        head.insert("__metadata__".into(), m.into());
    }
    let mut at = 0usize;
    for (name, shape, v) in tensors {
        head.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [at, at + v.len() * 4]}),
        );
        at += v.len() * 4;
    }
    let mut h = serde_json::to_vec(&head).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + at);
    out.extend((h.len() as u64).to_le_bytes());
    out.extend(h);
    for (_, _, v) in tensors {
        for x in v.iter() {
            out.extend(x.to_le_bytes());
        }
    }
    out
}
