//! A bounds-checked GGUF (v2/v3) reader on a memory map.
//!
//! Every count and length in the header is checked against the bytes that remain
//! before anything is allocated, so a truncated or corrupt file gives an error,
//! never a panic or an out-of-bounds read. Tensor data stays in the map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use tpi_kernels::DType;

use super::error::ModelError;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value, as typed in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// uint8
    U8(u8),
    /// int8
    I8(i8),
    /// uint16
    U16(u16),
    /// int16
    I16(i16),
    /// uint32
    U32(u32),
    /// int32
    I32(i32),
    /// float32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    Str(String),
    /// uint64
    U64(u64),
    /// int64
    I64(i64),
    /// float64
    F64(f64),
    /// Homogeneous array.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// The value as a float (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (columns).
    pub dims: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte length of the data.
    pub nbytes: usize,
}

impl TensorInfo {
    /// (rows, cols) of the tensor viewed as a row-major matrix (1-D tensors are one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1);
        let rows = self.dims.iter().skip(1).product::<usize>();
        (rows, cols)
    }
}

/// An opened GGUF file: metadata, tensor directory and the memory map behind them.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    meta: BTreeMap<String, MetaValue>,
    tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::corrupt(self.path, format!("{} (at byte {})", msg.into(), self.pos))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: need {n} bytes, {} remain",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ModelError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count that must be satisfiable by the remaining bytes at `min_each` bytes per item.
    fn count(&mut self, min_each: usize, what: &str) -> Result<usize, ModelError> {
        let n = self.u64()?;
        let max = (self.remaining() / min_each.max(1)) as u64;
        if n > max {
            return Err(self.err(format!(
                "{what} count {n} exceeds what the remaining file can hold"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue, ModelError> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(self.u8()? as i8),
            2 => MetaValue::U16(self.u16()?),
            3 => MetaValue::I16(self.u16()? as i16),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(self.u32()? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32()?)),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("metadata arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let min_each = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("unknown metadata array type {t}"))),
                };
                let n = self.count(min_each, "array length")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

/// Maps a GGML type id to our kernel dtype, or names the unsupported type.
pub fn ggml_dtype(id: u32) -> Result<DType, String> {
    DType::from_ggml_type_id(id)
}

/// The GGML type id GGUF uses for one of our dtypes.
pub fn ggml_type_id(d: DType) -> u32 {
    d.ggml_type_id()
}

/// Checks that the tensors tile the data section as GGUF writers lay it out: in offset
/// order from its start, each at the aligned end of the one before, with no overlap, no
/// gap and no more than the last padding after the last one. An offset moved inside
/// the file, overlapping tensors, or a type changed to one of another size all break
/// that tiling, and would otherwise read wrong bytes silently.
fn check_data_layout(
    path: &Path,
    tensors: &BTreeMap<String, TensorInfo>,
    data_start: u64,
    align: u64,
    file_len: u64,
) -> Result<(), ModelError> {
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .values()
        .map(|t| {
            (
                t.offset as u64 - data_start,
                t.nbytes as u64,
                t.name.as_str(),
            )
        })
        .collect();
    spans.sort_unstable();
    let mut expect = 0u64;
    let mut prev: Option<&str> = None;
    for &(off, len, name) in &spans {
        if off != expect {
            let after = match prev {
                Some(p) => format!("the tensor before it, `{p}`, ends (padded) at {expect}"),
                None => "the data section starts at 0".into(),
            };
            let what = if off < expect {
                "overlaps"
            } else {
                "leaves a gap"
            };
            return Err(ModelError::corrupt(
                path,
                format!(
                    "tensor `{name}` starts at data offset {off} but {after}: it {what} (a wrong offset, or a tensor type or shape that does not match its data)"
                ),
            ));
        }
        expect = (off + len).div_ceil(align) * align;
        prev = Some(name);
    }
    let data_len = file_len.saturating_sub(data_start);
    if let Some(&(off, len, name)) = spans.last() {
        if data_len >= (off + len).div_ceil(align) * align + align {
            return Err(ModelError::corrupt(
                path,
                format!(
                    "{} bytes follow the last tensor `{name}` (which ends at data offset {}): a tensor type, shape or offset does not match the data",
                    data_len - (off + len),
                    off + len
                ),
            ));
        }
    }
    Ok(())
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata and every tensor's bounds.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        // SAFETY: the map is read-only; tpi never writes model files while serving them.
        let map = unsafe { Mmap::map(&file) }.map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        Self::parse(path, Arc::new(map))
    }

    /// Parses a GGUF held in memory (a copy in an anonymous map), with every check
    /// [`GgufFile::open`] makes; `path` only names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.is_empty() {
            return Err(ModelError::corrupt(path, "empty file"));
        }
        let io = |err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        };
        let mut m = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        m.copy_from_slice(bytes);
        let map = m.make_read_only().map_err(io)?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self, ModelError> {
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        if c.take(4)? != GGUF_MAGIC {
            return Err(ModelError::corrupt(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::corrupt(
                path,
                format!("unsupported GGUF version {version} (tpi reads v2 and v3)"),
            ));
        }
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            meta.insert(key, v);
        }
        struct Raw {
            name: String,
            dims: Vec<usize>,
            ty: u32,
            off: u64,
        }
        let mut raws = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                let d = c.u64()?;
                if d == 0 || d > (1 << 40) {
                    return Err(c.err(format!("tensor `{name}` has dimension {d}")));
                }
                dims.push(d as usize);
            }
            let ty = c.u32()?;
            let off = c.u64()?;
            raws.push(Raw {
                name,
                dims,
                ty,
                off,
            });
        }
        let align = meta
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if align == 0 || !align.is_power_of_two() {
            return Err(ModelError::corrupt(path, format!("bad alignment {align}")));
        }
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for r in raws {
            let dtype = ggml_dtype(r.ty).map_err(|d| ModelError::UnsupportedDType {
                tensor: r.name.clone(),
                dtype: d,
            })?;
            let elems = r
                .dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| ModelError::corrupt(path, format!("`{}` is too large", r.name)))?;
            let cols = r.dims[0];
            let row_bytes = dtype.row_bytes(cols).ok_or_else(|| {
                ModelError::corrupt(
                    path,
                    format!(
                        "tensor `{}`: row of {cols} is not a whole number of {} blocks",
                        r.name,
                        dtype.name()
                    ),
                )
            })?;
            let nbytes = row_bytes * (elems / cols);
            if r.off % align != 0 {
                return Err(ModelError::corrupt(
                    path,
                    format!(
                        "tensor `{}` has offset {} in the data section, not a multiple of the alignment {align}",
                        r.name, r.off
                    ),
                ));
            }
            let offset = data_start
                .checked_add(r.off)
                .ok_or_else(|| ModelError::corrupt(path, format!("`{}` bad offset", r.name)))?;
            let end = offset.checked_add(nbytes as u64);
            if end.is_none_or(|e| e > map.len() as u64) {
                return Err(ModelError::corrupt(
                    path,
                    format!(
                        "tensor `{}` ({} bytes at offset {offset}) runs past the end of the file ({} bytes): truncated?",
                        r.name,
                        nbytes,
                        map.len()
                    ),
                ));
            }
            if tensors.contains_key(&r.name) {
                return Err(ModelError::corrupt(
                    path,
                    format!("duplicate tensor `{}`", r.name),
                ));
            }
            tensors.insert(
                r.name.clone(),
                TensorInfo {
                    name: r.name,
                    dtype,
                    dims: r.dims,
                    offset: offset as usize,
                    nbytes,
                },
            );
        }
        check_data_layout(path, &tensors, data_start, align, map.len() as u64)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            meta,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// All metadata.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.meta
    }
    /// One metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta.get(key)
    }
    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.meta.get(key)? {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// An integer metadata value that fits a u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.meta
            .get(key)?
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
    }
    /// A numeric metadata value as f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.meta.get(key)?.as_f64().map(|v| v as f32)
    }
    /// A bool metadata value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.meta.get(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn get_array(&self, key: &str) -> Option<&[MetaValue]> {
        match self.meta.get(key)? {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A string-array metadata value (None if absent or not all strings).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<String>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    /// A numeric-array metadata value as f32.
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect()
    }
    /// An integer-array metadata value as i32.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()))
            .collect()
    }
    /// The tensor directory.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    /// One tensor's info.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }
    /// A tensor's bytes, borrowed from the map (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.nbytes]
    }
    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    /// A shared handle on the map, for weight views that outlive this struct.
    pub fn map(&self) -> Arc<Mmap> {
        self.map.clone()
    }
}
