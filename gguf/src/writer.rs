//! A GGUF writer, laid out as llama.cpp's `gguf_write_to_file` does: header, metadata,
//! tensor table, padding to the alignment, then each tensor's data at an aligned offset.
//! Tests use it to make synthetic models; it is small enough to keep in the library.

use crate::{GgmlType, Value};

/// Builds a GGUF file in memory.
#[derive(Clone, Debug)]
pub struct Writer {
    /// GGUF version written in the header (2 or 3).
    pub version: u32,
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    alignment: u64,
}

impl Writer {
    /// An empty file of `version` with the default alignment (32).
    pub fn new(version: u32) -> Writer {
        Writer {
            version,
            kv: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    /// Adds a metadata key.
    pub fn kv(mut self, key: &str, value: Value) -> Writer {
        if key == "general.alignment" {
            if let Some(a) = value.as_u64() {
                self.alignment = a;
            }
        }
        self.kv.push((key.into(), value));
        self
    }

    /// Adds a tensor; `dims` innermost first, `data` already encoded as `ty`.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Writer {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = 0x4655_4747u32.to_le_bytes().to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_string(&mut b, k);
            b.extend(type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, t, data) in &self.tensors {
            put_string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(t.id().to_le_bytes());
            b.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        while !(b.len() as u64).is_multiple_of(self.alignment) {
            b.push(0);
        }
        let base = b.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            b.resize(base + off as usize, 0);
            b.extend(data);
        }
        b
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(u8::from(*x)),
        Value::String(s) => put_string(b, s),
        Value::Array(items) => {
            // An empty array still names an element type; u32 is what llama.cpp uses.
            b.extend(items.first().map_or(4, type_id).to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(b, i));
        }
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
    }
}
