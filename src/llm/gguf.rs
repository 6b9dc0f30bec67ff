//! GGUF (v2 and v3) container parsing, validated before anything is allocated.
//!
//! A GGUF file is: magic `GGUF`, a version, a tensor count, a metadata count, the metadata key/value pairs, the
//! tensor infos (name, dims, type, offset), padding to `general.alignment`, then the tensor data. Everything here
//! is untrusted: every length is checked against the bytes that remain *before* anything is allocated for it, counts
//! are capped ([`GgufLimits`]), tensor shapes and offsets are checked (≤ 4 dims, no overflow, aligned, inside the
//! data section, not overlapping), and every failure is an [`Error::Model`] naming what was wrong.
//!
//! Parsing does not copy tensor data: a [`TensorInfo`] records the byte range of its data in the file, and the model
//! keeps the file's bytes (one copy) and reads weights from those ranges.

use std::collections::BTreeMap;

use super::quant::GgmlType;
use crate::{Error, Result};

const FILE: &str = "model.gguf";

fn bad(detail: impl Into<String>) -> Error {
    Error::Model {
        file: FILE,
        detail: detail.into(),
    }
}

/// Caps on the parts of a GGUF header. The defaults accept every real model on the hub with room to spare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufLimits {
    /// Most metadata key/value pairs.
    pub max_kv: u64,
    /// Most tensors.
    pub max_tensors: u64,
    /// Longest string (key, value, tensor name), in bytes.
    pub max_string_bytes: u64,
    /// Most elements in one metadata array (vocabularies reach 262,144 entries).
    pub max_array_len: u64,
    /// Most metadata elements in total (all arrays together), bounding the memory the header takes.
    pub max_total_elements: u64,
}

impl Default for GgufLimits {
    fn default() -> Self {
        GgufLimits {
            max_kv: 4_096,
            max_tensors: 65_536,
            max_string_bytes: 1 << 20,
            max_array_len: 1 << 22,
            max_total_elements: 1 << 24,
        }
    }
}

/// A metadata value. Arrays are typed vectors (never a vector of enums), so a header of a million one-byte
/// elements costs a megabyte, not thirty-two.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type (u8, u16, u32, u64).
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is refused).
    Str(String),
    /// Array of strings.
    StrArray(Vec<String>),
    /// Array of signed or unsigned integers (u64 values above i64::MAX are refused).
    IntArray(Vec<i64>),
    /// Array of f32 / f64.
    FloatArray(Vec<f32>),
    /// Array of bools.
    BoolArray(Vec<bool>),
    /// Array of arrays (rare; kept only as a length).
    NestedArray(u64),
}

/// One tensor's header: name, shape (ggml order: `dims[0]` is the contiguous dimension), type, data range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (1 to 4 of them, each ≥ 1).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Rows (product of all dims but the first) and columns (`dims[0]`).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims[0] as usize;
        (self.elements() as usize / cols, cols)
    }
}

/// A parsed GGUF header: metadata and tensor infos. The tensor data stays in the caller's bytes.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    limits: GgufLimits,
    elements: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(bad(format!(
                "truncated: {what} needs {n} bytes at offset {} but only {left} remain",
                self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.limits.max_string_bytes {
            return Err(bad(format!(
                "{what}: string of {n} bytes is over the cap of {}",
                self.limits.max_string_bytes
            )));
        }
        let at = self.pos;
        let s = self.take(n, what)?;
        std::str::from_utf8(s).map(str::to_owned).map_err(|_| {
            bad(format!(
                "{what}: invalid UTF-8 in the string at offset {at}"
            ))
        })
    }

    /// Bytes one element of scalar type `t` takes, or None for string/array.
    fn scalar_size(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn scalar(&mut self, t: u32, what: &str) -> Result<Value> {
        Ok(match t {
            0 => Value::U64(self.u8(what)? as u64),
            1 => Value::I64(self.u8(what)? as i8 as i64),
            2 => Value::U64(self.u16(what)? as u64),
            3 => Value::I64(self.u16(what)? as i16 as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => return Err(bad(format!("{what}: bool byte {v} is neither 0 nor 1"))),
            },
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => return Err(bad(format!("{what}: unknown metadata value type {t}"))),
        })
    }

    fn count_elements(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.limits.max_array_len {
            return Err(bad(format!(
                "{what}: array of {n} elements is over the cap of {}",
                self.limits.max_array_len
            )));
        }
        self.elements = self.elements.saturating_add(n);
        if self.elements > self.limits.max_total_elements {
            return Err(bad(format!(
                "metadata holds more than {} array elements in total",
                self.limits.max_total_elements
            )));
        }
        Ok(())
    }

    fn value(&mut self, t: u32, what: &str, depth: u32) -> Result<Value> {
        match t {
            8 => Ok(Value::Str(self.string(what)?)),
            9 => {
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                self.count_elements(n, what)?;
                let left = (self.b.len() - self.pos) as u64;
                // Every element takes at least one byte (strings eight): refuse a count the bytes cannot hold
                // before reserving anything.
                let min = Self::scalar_size(et).unwrap_or(if et == 8 { 8 } else { 12 });
                if n.saturating_mul(min) > left {
                    return Err(bad(format!(
                        "truncated: {what} declares {n} elements but only {left} bytes remain"
                    )));
                }
                let n = n as usize;
                match et {
                    8 => {
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            v.push(self.string(what)?);
                        }
                        Ok(Value::StrArray(v))
                    }
                    9 => {
                        if depth >= 2 {
                            return Err(bad(format!("{what}: arrays nested too deep")));
                        }
                        for _ in 0..n {
                            self.value(9, what, depth + 1)?;
                        }
                        Ok(Value::NestedArray(n as u64))
                    }
                    7 => {
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            match self.scalar(7, what)? {
                                Value::Bool(b) => v.push(b),
                                _ => unreachable!(),
                            }
                        }
                        Ok(Value::BoolArray(v))
                    }
                    6 | 12 => {
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            match self.scalar(et, what)? {
                                Value::F64(f) => v.push(f as f32),
                                _ => unreachable!(),
                            }
                        }
                        Ok(Value::FloatArray(v))
                    }
                    0..=5 | 10 | 11 => {
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            v.push(match self.scalar(et, what)? {
                                Value::I64(i) => i,
                                Value::U64(u) => i64::try_from(u).map_err(|_| {
                                    bad(format!("{what}: array value {u} does not fit in i64"))
                                })?,
                                _ => unreachable!(),
                            });
                        }
                        Ok(Value::IntArray(v))
                    }
                    _ => Err(bad(format!("{what}: unknown array element type {et}"))),
                }
            }
            _ => self.scalar(t, what),
        }
    }
}

impl Gguf {
    /// Parse and validate a GGUF header from the whole file's bytes.
    pub fn parse(bytes: &[u8], limits: GgufLimits) -> Result<Gguf> {
        let mut r = Reader {
            b: bytes,
            pos: 0,
            limits,
            elements: 0,
        };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(bad(format!(
                "not a GGUF file (magic {magic:02x?}; big-endian GGUF is not supported)"
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > limits.max_tensors {
            return Err(bad(format!(
                "{n_tensors} tensors is over the cap of {}",
                limits.max_tensors
            )));
        }
        if n_kv > limits.max_kv {
            return Err(bad(format!(
                "{n_kv} metadata entries is over the cap of {}",
                limits.max_kv
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string("metadata key")?;
            let t = r.u32("metadata type")?;
            let what = format!("metadata {key:?}");
            let v = r.value(t, &what, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(bad(format!(
                    "metadata key {key:?} appears twice (entry {i})"
                )));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(Value::U64(a)) => *a,
            Some(v) => {
                return Err(bad(format!(
                    "general.alignment is {v:?}, not an unsigned integer"
                )))
            }
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(bad(format!(
                "general.alignment {alignment} is not a power of two between 1 and 2^20"
            )));
        }
        let mut raw = Vec::with_capacity((n_tensors as usize).min((bytes.len() - r.pos) / 24));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32("tensor dims")?;
            if nd == 0 || nd > 4 {
                return Err(bad(format!(
                    "tensor {name:?} has {nd} dimensions (1 to 4 are allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64("tensor dim")?);
            }
            let ty_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let ty = GgmlType::from_u32(ty_id).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?} has quantization type {ty_id}, which this build does not support"
                ))
            })?;
            raw.push((name, dims, ty, offset));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        if data_start > bytes.len() as u64 {
            return Err(bad(format!(
                "truncated: the data section starts at {data_start} but the file has {} bytes",
                bytes.len()
            )));
        }
        let data_len = bytes.len() as u64 - data_start;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, ty, offset) in raw {
            if !names.insert(name.clone()) {
                return Err(bad(format!("tensor {name:?} appears twice")));
            }
            let mut n: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(bad(format!(
                        "tensor {name:?} has a zero dimension {dims:?}"
                    )));
                }
                n = n
                    .checked_mul(d)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| bad(format!("tensor {name:?}: dims {dims:?} overflow")))?;
            }
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(bad(format!(
                    "tensor {name:?}: first dimension {} is not a multiple of the {} block size {}",
                    dims[0],
                    ty.name(),
                    ty.block_len()
                )));
            }
            let len = (n / ty.block_len() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| bad(format!("tensor {name:?}: size overflows")))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor {name:?}: offset {offset} is not aligned to {alignment}"
                )));
            }
            if offset > data_len || len > data_len - offset {
                return Err(bad(format!(
                    "truncated: tensor {name:?} needs bytes {offset}..{} of the data section, which has {data_len}",
                    offset.saturating_add(len)
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                start: (data_start + offset) as usize,
                len: len as usize,
            });
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].start);
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.start + a.len > b.start {
                return Err(bad(format!(
                    "tensors {:?} and {:?} overlap in the file",
                    a.name, b.name
                )));
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_start: data_start as usize,
        })
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string value; `Err` when present with another type.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(v) => Err(bad(format!("{key} is {}, not a string", kind(v)))),
        }
    }

    /// An unsigned integer value (any width); `Err` when negative or of another type.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::U64(u)) => Ok(Some(*u)),
            Some(Value::I64(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v) => Err(bad(format!(
                "{key} is {}, not an unsigned integer",
                kind(v)
            ))),
        }
    }

    /// A float value (integers are accepted too).
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F64(f)) => Ok(Some(*f)),
            Some(Value::U64(u)) => Ok(Some(*u as f64)),
            Some(Value::I64(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(bad(format!("{key} is {}, not a number", kind(v)))),
        }
    }

    /// A bool value.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(bad(format!("{key} is {}, not a bool", kind(v)))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::U64(_) => "an unsigned integer",
        Value::I64(_) => "a signed integer",
        Value::F64(_) => "a float",
        Value::Bool(_) => "a bool",
        Value::Str(_) => "a string",
        Value::StrArray(_) => "a string array",
        Value::IntArray(_) => "an integer array",
        Value::FloatArray(_) => "a float array",
        Value::BoolArray(_) => "a bool array",
        Value::NestedArray(_) => "a nested array",
    }
}

/// Writes GGUF files: for tests (tiny generated models, hostile headers) and for exporting adapters.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    alignment: u64,
}

impl GgufWriter {
    /// An empty file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            alignment: 32,
            ..Default::default()
        }
    }
    /// Set a key (replacing an earlier value of the same key, in place).
    fn push(&mut self, key: &str, t: u32, v: Vec<u8>) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _, _)| k == key) {
            Some(e) => *e = (key.to_owned(), t, v),
            None => self.kv.push((key.to_owned(), t, v)),
        }
        self
    }
    /// A u32 value.
    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        if key == "general.alignment" {
            self.alignment = v as u64;
        }
        self.push(key, 4, v.to_le_bytes().to_vec())
    }
    /// An f32 value.
    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.push(key, 6, v.to_le_bytes().to_vec())
    }
    /// A bool value.
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.push(key, 7, vec![v as u8])
    }
    /// A string value.
    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.push(key, 8, lstr(v))
    }
    /// An array of strings.
    pub fn str_array(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            b.extend(lstr(s));
        }
        self.push(key, 9, b)
    }
    /// An array of i32.
    pub fn i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for x in v {
            b.extend(x.to_le_bytes());
        }
        self.push(key, 9, b)
    }
    /// A raw value of any type id, bytes as they go in the file (for hostile-header tests).
    pub fn raw(&mut self, key: &str, type_id: u32, bytes: Vec<u8>) -> &mut Self {
        self.push(key, type_id, bytes)
    }
    /// A tensor: `dims` innermost first, `data` already encoded in `ty`.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment.max(1) as usize;
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kv {
            b.extend(lstr(k));
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut off = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            b.extend(lstr(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.id().to_le_bytes());
            b.extend((off as u64).to_le_bytes());
            offsets.push(off);
            off = (off + data.len()).div_ceil(align) * align;
        }
        b.resize(b.len().div_ceil(align) * align, 0);
        let base = b.len();
        for ((_, _, _, data), o) in self.tensors.iter().zip(offsets) {
            b.resize(base + o, 0);
            b.extend(data);
        }
        b
    }
}

fn lstr(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}
