//! A GGUF (v3) writer whose header is built first and whose tensor data is then streamed,
//! tensor by tensor, so that a model larger than memory can be written. Used by the model
//! generator ([`crate::synth`]) and by the fuzz seeds.

use std::io::{self, Write};

/// GGUF's default data alignment (`general.alignment` is not written).
pub const ALIGN: u64 = 32;

/// The GGML type id of F32.
pub const GGML_F32: u32 = 0;

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// GGUF dimensions, innermost (row length) first.
    pub dims: Vec<u64>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Bytes of data.
    pub bytes: u64,
}

/// The metadata and tensor directory of a GGUF file.
#[derive(Default)]
pub struct GgufHeader {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<TensorInfo>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufHeader {
    /// An empty header.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }

    /// A string value.
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        put_str(&mut self.kv, v);
    }

    /// A u32 value.
    pub fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }

    /// An f32 value.
    pub fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }

    /// A bool value.
    pub fn bool(&mut self, k: &str, v: bool) {
        self.key(k, 7);
        self.kv.push(v as u8);
    }

    /// An array of strings.
    pub fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
    }

    /// An array of i32.
    pub fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }

    /// Adds a tensor to the directory; its data must later be written in this order.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, bytes: u64) {
        self.tensors.push(TensorInfo {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type,
            bytes,
        });
    }

    /// The tensors, in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The header bytes (magic, counts, metadata, directory, padding to [`ALIGN`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut off = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(off.to_le_bytes());
            off = (off + t.bytes).div_ceil(ALIGN) * ALIGN;
        }
        out.resize(
            (out.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
            0,
        );
        out
    }

    /// The length of the whole file: header plus every tensor padded to [`ALIGN`].
    pub fn file_len(&self) -> u64 {
        let data: u64 = self
            .tensors
            .iter()
            .map(|t| t.bytes.div_ceil(ALIGN) * ALIGN)
            .sum();
        self.encode().len() as u64 + data
    }

    /// Writes the header, then each tensor's data from `fill(index, sink)`, which must
    /// write exactly that tensor's bytes; pads after each. Checks every length.
    pub fn write<W: Write>(
        &self,
        out: &mut W,
        mut fill: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        out.write_all(&self.encode())?;
        for (i, t) in self.tensors.iter().enumerate() {
            let mut counted = Counted { inner: out, n: 0 };
            fill(i, &mut counted)?;
            if counted.n != t.bytes {
                return Err(io::Error::other(format!(
                    "tensor {}: wrote {} bytes, the directory says {}",
                    t.name, counted.n, t.bytes
                )));
            }
            let pad = t.bytes.div_ceil(ALIGN) * ALIGN - t.bytes;
            out.write_all(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }
}

/// A writer that counts what passes through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
