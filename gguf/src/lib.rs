//! GGUF, llama.cpp's model format: header, metadata, tensor table and (memory-mapped)
//! tensor data, versions 2 and 3, little-endian.
//!
//! [`Gguf::parse`] reads only the header and tensor table from a byte prefix, so the
//! operator can size a model without its weights; [`GgufFile::open`] memory-maps a whole
//! file for the worker. Every malformed input is an [`Error`] naming what is wrong.

pub mod split;
mod summary;
mod types;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;

pub use summary::ModelSummary;
pub use types::GgmlType;
pub use writer::Writer;

/// `GGUF` in little-endian.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
// Caps that turn a corrupt count into an error instead of a huge allocation.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
/// The furthest a tensor may end from the start of the data section (1 EiB): a header
/// that claims more is corrupt, and sums over such offsets would overflow.
const MAX_TENSOR_END: u64 = 1 << 60;
const MAX_STRING: u64 = 1 << 30;

/// What can be wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a GGUF file.
    #[error("not a GGUF file: magic is {0:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic(u32),
    /// A version this reader does not handle.
    #[error(
        "unsupported GGUF version {0} (supported: 2 and 3; big-endian files are not supported)"
    )]
    UnsupportedVersion(u32),
    /// The bytes ended inside a structure.
    #[error("truncated GGUF: needed {needed} bytes at offset {offset} while reading {what}, but the input has {len}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where.
        offset: u64,
        /// How many bytes it needed.
        needed: u64,
        /// How many bytes there are.
        len: u64,
    },
    /// A field holds a value that makes no sense.
    #[error("corrupt GGUF: {0}")]
    Corrupt(String),
    /// A tensor uses an element type this reader does not know.
    #[error("tensor {tensor:?} has unknown ggml type id {id}")]
    UnknownType {
        /// Tensor name.
        tensor: String,
        /// The type id found.
        id: u32,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("metadata key {key:?} is {problem}")]
    Metadata {
        /// The key.
        key: String,
        /// Missing, or the type found.
        problem: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, as tokenizer vocabularies sometimes hold raw bytes)
    String(String),
    /// Array of values of one type
    Array(Vec<Value>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

/// One tensor's entry in the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml orders them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the data in bytes.
    pub fn n_bytes(&self) -> u64 {
        self.ggml_type.row_bytes(self.n_elements())
    }
}

/// A parsed GGUF header: version, metadata and tensor table.
#[derive(Clone, Debug)]
pub struct Gguf {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// The shape of a Llama-family transformer, from the metadata, as placement and the
/// worker both need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// `general.architecture` (llama, qwen2, ...).
    pub architecture: String,
    /// Transformer blocks.
    pub n_layers: u64,
    /// Hidden size.
    pub embedding: u64,
    /// Query heads.
    pub n_heads: u64,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: u64,
    /// Dimension of one head.
    pub head_dim: u64,
    /// Context length the model was trained for.
    pub context_length: u64,
    /// MLP inner size.
    pub feed_forward: u64,
}

impl Gguf {
    /// Parses the header and tensor table from `bytes`, which may be just a prefix of
    /// the file (tensor data is not read). Checks that tensor offsets are aligned and
    /// do not overlap; whether they fit in the file is checked by [`GgufFile`].
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.u32("magic")?;
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(Error::Corrupt(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::Corrupt(format!(
                    "tensor {name:?} has {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let id = r.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(id).ok_or_else(|| Error::UnknownType {
                tensor: name.clone(),
                id,
            })?;
            let offset = r.u64("tensor offset")?;
            let n_elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            if n_elements.is_none_or(|n| n == 0) {
                return Err(Error::Corrupt(format!(
                    "tensor {name:?} has dimensions {dims:?}"
                )));
            }
            if !dims[0].is_multiple_of(ggml_type.block_size()) {
                return Err(Error::Corrupt(format!(
                    "tensor {name:?}: row length {} is not a multiple of the {:?} block size {}",
                    dims[0],
                    ggml_type,
                    ggml_type.block_size()
                )));
            }
            // Its bytes and its end must be numbers the layout and the reader can add
            // the data section's offset to: no file is 2^60 bytes long.
            let end = n_elements
                .and_then(|n| ggml_type.checked_row_bytes(n))
                .and_then(|bytes| bytes.checked_add(offset));
            if end.is_none_or(|e| e > MAX_TENSOR_END) {
                return Err(Error::Corrupt(format!(
                    "tensor {name:?} of {dims:?} {ggml_type:?} at offset {offset} ends past any file"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(Error::Corrupt(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let gguf = Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        };
        gguf.check_layout()?;
        Ok(gguf)
    }

    fn check_layout(&self) -> Result<()> {
        let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if !t.offset.is_multiple_of(self.alignment) {
                return Err(Error::Corrupt(format!(
                    "tensor {:?} offset {} is not aligned to {}",
                    t.name, t.offset, self.alignment
                )));
            }
            spans.push((t.offset, t.offset + t.n_bytes(), &t.name));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::Corrupt(format!(
                    "tensors {:?} and {:?} overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    }

    /// File format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.metadata.get(key).ok_or_else(|| Error::Metadata {
            key: key.into(),
            problem: "missing".into(),
        })?;
        v.as_u64().ok_or_else(|| Error::Metadata {
            key: key.into(),
            problem: format!("a {}, not an unsigned integer", v.type_name()),
        })
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.metadata.get(key).ok_or_else(|| Error::Metadata {
            key: key.into(),
            problem: "missing".into(),
        })?;
        v.as_str().ok_or_else(|| Error::Metadata {
            key: key.into(),
            problem: format!("a {}, not a string", v.type_name()),
        })
    }

    /// The tensor table.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Alignment of tensor data.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Bytes of all tensor data.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::n_bytes).sum()
    }

    /// Total parameter count (elements of every tensor).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::n_elements).sum()
    }

    /// The transformer's shape from `<arch>.*` metadata.
    pub fn shape(&self) -> Result<ModelShape> {
        let arch = self.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_heads = self.get_u64(&key("attention.head_count"))?;
        let embedding = self.get_u64(&key("embedding_length"))?;
        if n_heads == 0 || embedding % n_heads != 0 {
            return Err(Error::Corrupt(format!(
                "{arch}: embedding_length {embedding} is not divisible by head_count {n_heads}"
            )));
        }
        let n_kv_heads = match self.get(&key("attention.head_count_kv")) {
            Some(_) => self.get_u64(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::Corrupt(format!(
                "{arch}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
            )));
        }
        let head_dim = match self.get(&key("attention.key_length")) {
            Some(_) => self.get_u64(&key("attention.key_length"))?,
            None => embedding / n_heads,
        };
        Ok(ModelShape {
            n_layers: self.get_u64(&key("block_count"))?,
            embedding,
            n_heads,
            n_kv_heads,
            head_dim,
            context_length: self.get_u64(&key("context_length"))?,
            feed_forward: self.get_u64(&key("feed_forward_length"))?,
            architecture: arch,
        })
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    map: memmap2::Mmap,
    header: Gguf,
}

impl GgufFile {
    /// Maps `path` and parses it; fails when any tensor's data lies past the end.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a model file changed underneath a running
        // worker is outside what any inference server can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = Gguf::parse(&map)?;
        let len = map.len() as u64;
        for t in header.tensors() {
            let end = header.data_offset + t.offset + t.n_bytes();
            if end > len {
                return Err(Error::Truncated {
                    what: format!("tensor {:?} data", t.name),
                    offset: header.data_offset + t.offset,
                    needed: t.n_bytes(),
                    len,
                });
            }
        }
        Ok(GgufFile { map, header })
    }

    /// The parsed header.
    pub fn header(&self) -> &Gguf {
        &self.header
    }

    /// The tensor table.
    pub fn tensors(&self) -> &[TensorInfo] {
        self.header.tensors()
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        &self.map[start..start + t.n_bytes() as usize]
    }

    /// Says that this process will not read tensor `t` through the map again soon (a
    /// backend copied it): the pages wholly inside it leave the resident set now
    /// instead of when memory runs short. Reading it later stays correct: the map is
    /// read-only, so the pages fault in again from the file (`madvise(2)`,
    /// MADV_DONTNEED on a private file mapping). A refusal changes nothing and is
    /// ignored.
    pub fn release(&self, t: &TensorInfo) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = (self.header.data_offset + t.offset) as usize;
            let (from, to) = (
                start.div_ceil(PAGE) * PAGE,
                (start + t.n_bytes() as usize) / PAGE * PAGE,
            );
            if to > from {
                // SAFETY: the map is private and never written, so dropping its pages
                // loses nothing: the next read maps the file's bytes again.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        from,
                        to - from,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = t;
    }
}

/// For tests: the SmolLM2-135M-Instruct GGUF that `scripts/ensure-tools.sh` fetches,
/// named by `GPUSCALE_SMOLLM2_GGUF`. `None` (the caller skips, saying so) only outside
/// CI; under CI a missing model is a failure, so tests that need it never silently skip.
#[doc(hidden)]
pub fn smollm2_fixture() -> Option<std::path::PathBuf> {
    match std::env::var_os("GPUSCALE_SMOLLM2_GGUF") {
        Some(p) => Some(p.into()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must provide GPUSCALE_SMOLLM2_GGUF (run through scripts/test.sh)")
        }
        None => {
            eprintln!("SKIPPED: GPUSCALE_SMOLLM2_GGUF not set (run through scripts/test.sh)");
            None
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let available = (self.bytes.len() - self.pos) as u64;
        if n > available {
            return Err(Error::Truncated {
                what: what.into(),
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(Error::Corrupt(format!("{what} claims {len} bytes")));
        }
        Ok(String::from_utf8_lossy(self.take(len, what)?).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::Corrupt(format!("{key:?}: bool byte {b}"))),
            },
            8 => Value::String(self.string(key)?),
            9 if depth == 0 => {
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Each element takes at least one byte: a larger count is corrupt.
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(Error::Truncated {
                        what: format!("array {key:?} of {n} elements"),
                        offset: self.pos as u64,
                        needed: n,
                        len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            9 => return Err(Error::Corrupt(format!("{key:?}: nested arrays"))),
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::Corrupt(format!(
                    "{key:?}: unknown metadata value type {other}"
                )))
            }
        })
    }
}
