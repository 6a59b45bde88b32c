//! Random-weight GGUF models of named real shapes (Llama 3 70B, Llama 2 70B, Llama 3 8B),
//! written tensor by tensor so that a 40 GB model never has to fit in memory.
//!
//! The quantised blocks are drawn directly (random codes, scales chosen for a target
//! standard deviation), not quantised from f32: a matrix with input length n gets
//! weights of RMS 1/√n, so every projection keeps activations at O(1), and the LM head
//! gets RMS 3/√n, so the logits have a standard deviation near 3 (well spread, with clear
//! top-1 margins). Quantisation types follow llama.cpp's Q4_K_M rule (Q6_K for the
//! output, and for attn_v and ffn_down in the layers `use_more_bits` names; a 70B model's
//! other attn_v get Q5_K) or plain Q4_0.
//! The file carries a byte-level BPE vocabulary of the shape's size, with Llama 3's
//! special tokens and a Llama 3 chat template, so `--prompt` and `--chat` work.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use half::f16;

use super::XorShift;
use crate::gguf_write::{GgufHeader, GGML_F32};

/// A named model shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// Its name on the command line.
    pub name: &'static str,
    /// Transformer layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// MLP intermediate size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length written to the metadata.
    pub ctx: usize,
    /// RoPE base.
    pub rope_theta: f32,
}

/// Every shape the generator knows.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "llama3-70b",
        layers: 80,
        hidden: 8192,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        ffn: 28672,
        vocab: 128256,
        ctx: 8192,
        rope_theta: 500000.0,
    },
    Shape {
        name: "llama2-70b",
        layers: 80,
        hidden: 8192,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        ffn: 28672,
        vocab: 32000,
        ctx: 4096,
        rope_theta: 10000.0,
    },
    Shape {
        name: "llama3-8b",
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        vocab: 128256,
        ctx: 8192,
        rope_theta: 500000.0,
    },
];

/// Looks a shape up by name.
pub fn shape(name: &str) -> Result<Shape, String> {
    SHAPES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            format!("unknown shape {name:?}; known: {}", names.join(", "))
        })
}

/// The weight quantisation of the generated file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthQuant {
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K where `use_more_bits` says.
    Q4KM,
    /// Q4_0 everywhere.
    Q4_0,
}

impl std::str::FromStr for SynthQuant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Ok(SynthQuant::Q4KM),
            "q4_0" => Ok(SynthQuant::Q4_0),
            _ => Err(format!("unknown quantisation {s:?}; known: q4_k_m, q4_0")),
        }
    }
}

/// The block types the generator draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Block {
    /// (GGML type id, elements per block, bytes per block).
    fn layout(self) -> (u32, usize, usize) {
        match self {
            Block::Q4_0 => (2, 32, 18),
            Block::Q4K => (12, 256, 144),
            Block::Q5K => (13, 256, 176),
            Block::Q6K => (14, 256, 210),
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// one between get more bits in Q*_K_M files.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// What one tensor of the file is.
pub(crate) struct Planned {
    pub(crate) name: String,
    /// (row length, rows); rows = 1 for vectors.
    cols: usize,
    rows: usize,
    /// None: an F32 vector of ones (a norm weight).
    block: Option<Block>,
    /// Target RMS of the weights.
    rms: f32,
}

fn plan(s: &Shape, quant: SynthQuant) -> Vec<Planned> {
    let base = match quant {
        SynthQuant::Q4KM => Block::Q4K,
        SynthQuant::Q4_0 => Block::Q4_0,
    };
    let more = |i: usize| match quant {
        SynthQuant::Q4KM if use_more_bits(i, s.layers) => Block::Q6K,
        _ => base,
    };
    // llama.cpp gives a 70B model's attn_v (8× smaller than attn_q) Q5_K instead of Q4_K.
    let v_type = |i: usize| match more(i) {
        Block::Q4K if s.name.ends_with("-70b") => Block::Q5K,
        b => b,
    };
    let q = s.heads * s.head_dim;
    let kv = s.kv_heads * s.head_dim;
    let m = |name: String, cols: usize, rows: usize, block: Block, gain: f32| Planned {
        name,
        cols,
        rows,
        block: Some(block),
        rms: gain / (cols as f32).sqrt(),
    };
    let norm = |name: String| Planned {
        name,
        cols: s.hidden,
        rows: 1,
        block: None,
        rms: 1.0,
    };
    let mut v = vec![Planned {
        name: "token_embd.weight".into(),
        cols: s.hidden,
        rows: s.vocab,
        block: Some(base),
        rms: 1.0,
    }];
    for l in 0..s.layers {
        let t = |x: &str| format!("blk.{l}.{x}.weight");
        v.push(norm(t("attn_norm")));
        v.push(m(t("attn_q"), s.hidden, q, base, 1.0));
        v.push(m(t("attn_k"), s.hidden, kv, base, 1.0));
        v.push(m(t("attn_v"), s.hidden, kv, v_type(l), 1.0));
        v.push(m(t("attn_output"), q, s.hidden, base, 1.0));
        v.push(norm(t("ffn_norm")));
        v.push(m(t("ffn_gate"), s.hidden, s.ffn, base, 1.0));
        v.push(m(t("ffn_up"), s.hidden, s.ffn, base, 1.0));
        v.push(m(t("ffn_down"), s.ffn, s.hidden, more(l), 1.0));
    }
    v.push(norm("output_norm.weight".into()));
    let head = match quant {
        SynthQuant::Q4KM => Block::Q6K,
        SynthQuant::Q4_0 => Block::Q4_0,
    };
    v.push(m("output.weight".into(), s.hidden, s.vocab, head, 3.0));
    v
}

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Llama 3's special tokens, padded with reserved ones to `n`.
fn specials(n: usize) -> Vec<String> {
    let named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    let mut v: Vec<String> = named.iter().map(|s| s.to_string()).collect();
    let mut k = 0;
    while v.len() < n {
        v.push(format!("<|reserved_special_token_{k}|>"));
        k += 1;
    }
    v.truncate(n.max(named.len()));
    v
}

/// A Llama 3 style chat template.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// A byte-level BPE vocabulary of `vocab` tokens: 256 byte tokens, merged tokens built
/// from letters and the space, then the special tokens (the last 256, or 5 for small
/// vocabularies). Returns (tokens, token types, merges, bos id, eos id).
#[allow(clippy::type_complexity)]
fn vocabulary(vocab: usize, rng: &mut XorShift) -> (Vec<String>, Vec<i32>, Vec<String>, u32, u32) {
    let n_special = if vocab >= 100_000 { 256 } else { 5 };
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let alphabet: Vec<String> = (b'a'..=b'z')
        .chain(b'A'..=b'Z')
        .chain([b' ', b'.', b','])
        .map(|b| chars[b as usize].to_string())
        .collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let normal = vocab - n_special;
    // Grow words: a token so far plus one letter, so every merge joins two tokens.
    let mut pool: Vec<usize> = (0..alphabet.len())
        .map(|i| tokens.iter().position(|t| *t == alphabet[i]).unwrap())
        .collect();
    while tokens.len() < normal {
        let a = pool[rng.below(pool.len())];
        let b = &alphabet[rng.below(alphabet.len())];
        let s = format!("{}{}", tokens[a], b);
        if s.chars().count() > 10 || seen.contains(&s) {
            continue;
        }
        seen.insert(s.clone());
        merges.push(format!("{} {}", tokens[a], b));
        pool.push(tokens.len());
        tokens.push(s);
    }
    let mut types = vec![1i32; tokens.len()];
    let sp = specials(n_special);
    let bos = tokens.len() as u32;
    let eos = bos + sp.iter().position(|s| s == "<|eot_id|>").unwrap() as u32;
    tokens.extend(sp);
    types.resize(tokens.len(), 3);
    (tokens, types, merges, bos, eos)
}

/// The header of the generated file (metadata, vocabulary, tensor directory).
/// The file's header (metadata and tensor directory) and its tensors, in file order;
/// with `weights_at`, the header says the file holds no weights and where they are (see
/// [`tpi_node::model::weights::WEIGHTS_ELSEWHERE_KEY`]).
pub(crate) fn header(
    s: &Shape,
    quant: SynthQuant,
    seed: u64,
    weights_at: Option<&str>,
) -> (GgufHeader, Vec<Planned>) {
    let tensors = plan(s, quant);
    let mut h = GgufHeader::new();
    let a = "llama";
    h.str("general.architecture", a);
    if let Some(at) = weights_at {
        h.str(tpi_node::model::weights::WEIGHTS_ELSEWHERE_KEY, at);
    }
    h.str(
        "general.name",
        &format!("synthetic {} ({} layers, seed {seed})", s.name, s.layers),
    );
    h.u32(
        "general.file_type",
        match quant {
            SynthQuant::Q4KM => 15,
            SynthQuant::Q4_0 => 2,
        },
    );
    h.u32(&format!("{a}.block_count"), s.layers as u32);
    h.u32(&format!("{a}.context_length"), s.ctx as u32);
    h.u32(&format!("{a}.embedding_length"), s.hidden as u32);
    h.u32(&format!("{a}.feed_forward_length"), s.ffn as u32);
    h.u32(&format!("{a}.attention.head_count"), s.heads as u32);
    h.u32(&format!("{a}.attention.head_count_kv"), s.kv_heads as u32);
    h.u32(&format!("{a}.rope.dimension_count"), s.head_dim as u32);
    h.u32(&format!("{a}.vocab_size"), s.vocab as u32);
    h.f32(&format!("{a}.rope.freq_base"), s.rope_theta);
    h.f32(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5);
    let mut rng = XorShift(seed ^ 0x7a3b_91c4_d2e5_f607);
    let (tokens, types, merges, bos, eos) = vocabulary(s.vocab, &mut rng);
    h.str("tokenizer.ggml.model", "gpt2");
    h.str("tokenizer.ggml.pre", "llama-bpe");
    h.strs("tokenizer.ggml.tokens", &tokens);
    h.i32s("tokenizer.ggml.token_type", &types);
    h.strs("tokenizer.ggml.merges", &merges);
    h.u32("tokenizer.ggml.bos_token_id", bos);
    h.u32("tokenizer.ggml.eos_token_id", eos);
    h.bool("tokenizer.ggml.add_bos_token", true);
    h.str("tokenizer.chat_template", CHAT_TEMPLATE);
    for t in &tensors {
        match t.block {
            None => h.tensor(&t.name, &[t.cols as u64], GGML_F32, 4 * t.cols as u64),
            Some(b) => {
                let (id, per, bytes) = b.layout();
                let n = (t.cols / per * t.rows * bytes) as u64;
                h.tensor(&t.name, &[t.cols as u64, t.rows as u64], id, n);
            }
        }
    }
    (h, tensors)
}

/// The shape with `layers` layers instead of its own (a scaled model of real tensor sizes).
pub fn with_layers(mut s: Shape, layers: Option<usize>) -> Shape {
    if let Some(l) = layers {
        s.layers = l;
    }
    s
}

/// Writes tensor `index` (`t`) of the file, drawn from its own stream of the RNG (seeded
/// by `seed` and `index`, so any tensor can be made alone and is the same every time),
/// through `buf`, in batches of rows of about 8 MiB.
pub(crate) fn tensor_data(
    t: &Planned,
    seed: u64,
    index: usize,
    buf: &mut Vec<u8>,
    sink: &mut dyn Write,
) -> io::Result<()> {
    let mut rng = XorShift(
        (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
            | 1,
    );
    // Leave the seeding's low-entropy start behind.
    for _ in 0..8 {
        rng.next_u64();
    }
    match t.block {
        None => {
            for _ in 0..t.cols {
                let v = 1.0 + 0.05 * rng.unit();
                sink.write_all(&v.to_le_bytes())?;
            }
        }
        Some(b) => {
            let (_, per, bytes) = b.layout();
            let row = t.cols / per * bytes;
            let batch = (8 << 20) / row.max(1) + 1;
            let mut left = t.rows;
            while left > 0 {
                let k = left.min(batch);
                buf.resize(k * row, 0);
                random_blocks(b, t.rms, &mut rng, buf);
                sink.write_all(buf)?;
                left -= k;
            }
        }
    }
    Ok(())
}

/// The file length the generator would write for `s` and `quant`.
pub fn file_len(s: &Shape, quant: SynthQuant) -> u64 {
    header(s, quant, 0, None).0.file_len()
}

fn fill_random(rng: &mut XorShift, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// RMS of integer `k` uniform in `lo..=hi`.
fn rms_uniform(lo: i32, hi: i32) -> f32 {
    let n = (hi - lo + 1) as f64;
    ((lo..=hi).map(|k| (k * k) as f64).sum::<f64>() / n).sqrt() as f32
}

/// RMS of `q - c` for `q` uniform in `0..levels`.
fn rms_code(levels: i32, c: f32) -> f32 {
    let n = levels as f64;
    ((0..levels)
        .map(|q| (q as f64 - c as f64).powi(2))
        .sum::<f64>()
        / n)
        .sqrt() as f32
}

/// Per-sub-block scales are drawn from this range (6-bit, positive), so the f16 super-block
/// scale stays a normal number for the weight sizes of these shapes.
const SC_LO: i32 = 8;
const SC_HI: i32 = 23;

/// Fills `out` (whole blocks of `b`) with random blocks of weight RMS `rms`.
fn random_blocks(b: Block, rms: f32, rng: &mut XorShift, out: &mut [u8]) {
    fill_random(rng, out);
    let (_, _, bytes) = b.layout();
    let sc_rms = rms_uniform(SC_LO, SC_HI);
    let span = (SC_HI - SC_LO + 1) as usize;
    match b {
        // Codes q − 8 (and Q6_K's q − 32) average −1/2: the scale's sign alternates from
        // block to block so that the weights average zero.
        Block::Q4_0 => {
            let d = rms / rms_code(16, 8.0);
            let d = [d, -d].map(|d| f16::from_f32(d).to_bits().to_le_bytes());
            for (i, blk) in out.chunks_exact_mut(bytes).enumerate() {
                blk[..2].copy_from_slice(&d[i % 2]);
            }
        }
        Block::Q4K | Block::Q5K => {
            // value = d·sc·q − dmin·m with m = sc and dmin = c·d, c the codes' centre
            // (7.5 for Q4_K's 4 bits, 15.5 for Q5_K's 5): d·sc·(q − c).
            let levels = if b == Block::Q4K { 16 } else { 32 };
            let c = (levels - 1) as f32 / 2.0;
            let d = rms / (sc_rms * rms_code(levels, c));
            let dh = f16::from_f32(d).to_bits().to_le_bytes();
            let dmin = f16::from_f32(c * d).to_bits().to_le_bytes();
            for blk in out.chunks_exact_mut(bytes) {
                blk[..2].copy_from_slice(&dh);
                blk[2..4].copy_from_slice(&dmin);
                let mut sc = [0u8; 8];
                for s in &mut sc {
                    *s = (SC_LO as usize + rng.below(span)) as u8;
                }
                blk[4..16].copy_from_slice(&pack_q4k_scales(&sc, &sc));
            }
        }
        Block::Q6K => {
            let d = rms / (sc_rms * rms_code(64, 32.0));
            let d = [d, -d].map(|d| f16::from_f32(d).to_bits().to_le_bytes());
            for (i, blk) in out.chunks_exact_mut(bytes).enumerate() {
                for s in &mut blk[192..208] {
                    *s = (SC_LO as usize + rng.below(span)) as u8;
                }
                blk[208..210].copy_from_slice(&d[i % 2]);
            }
        }
    }
}

/// Packs Q4_K's (and Q5_K's) eight 6-bit scales and mins into its 12 scale bytes (the inverse of
/// ggml's `get_scale_min_k4`).
fn pack_q4k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    q
}

/// Free bytes on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// What [`write_model`] wrote.
#[derive(Debug)]
pub struct Written {
    /// File length in bytes.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
}

/// Checks that `dir`'s file system has room for `need` bytes of `what`, and 1 GiB spare so
/// the machine is not left with a full disk.
pub(crate) fn check_room(dir: &Path, need: u64, what: &str) -> Result<(), String> {
    let free = free_bytes(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    let spare = 1u64 << 30;
    if free < need + spare {
        return Err(format!(
            "{what} needs {:.2} GB (+1 GiB spare) but {} has {:.2} GB free",
            need as f64 / 1e9,
            dir.display(),
            free as f64 / 1e9
        ));
    }
    Ok(())
}

/// Writes the random-weight GGUF of shape `s` to `out` (through `out.tmp`, renamed when
/// complete), after checking that its file system has room for it.
pub fn write_model(
    s: &Shape,
    quant: SynthQuant,
    seed: u64,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Written, String> {
    let (h, tensors) = header(s, quant, seed, None);
    let need = h.file_len();
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    check_room(&dir, need, &out.display().to_string())?;
    let tmp = out.with_extension("gguf.tmp");
    let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(4 << 20, f);
    let n = tensors.len();
    let mut buf = Vec::new();
    h.write(&mut w, |i, sink| {
        progress(i, n);
        tensor_data(&tensors[i], seed, i, &mut buf, sink)
    })
    .and_then(|()| w.flush())
    .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(Written {
        bytes: need,
        tensors: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpi_kernels::quant::dequantize_row;
    use tpi_kernels::DType;

    fn stats(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let rms = (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
        (mean, rms)
    }

    #[test]
    fn random_blocks_have_the_target_rms_and_no_bias() {
        let mut rng = XorShift(7);
        for (b, dt) in [
            (Block::Q4_0, DType::Q4_0),
            (Block::Q4K, DType::Q4K),
            (Block::Q5K, DType::Q5K),
            (Block::Q6K, DType::Q6K),
        ] {
            let (_, per, bytes) = b.layout();
            for rms in [1.0f32, 1.0 / 8192f32.sqrt(), 1.0 / 28672f32.sqrt()] {
                let blocks = 4096 / per * 64;
                let mut data = vec![0u8; blocks * bytes];
                random_blocks(b, rms, &mut rng, &mut data);
                let mut out = vec![0f32; blocks * per];
                dequantize_row(dt, &data, &mut out);
                let (mean, got) = stats(&out);
                assert!(
                    (got / rms as f64 - 1.0).abs() < 0.03,
                    "{b:?}: rms {got} for target {rms}"
                );
                assert!(
                    mean.abs() < 0.05 * rms as f64,
                    "{b:?}: mean {mean} (rms {rms})"
                );
            }
        }
    }

    #[test]
    fn q4k_scale_packing_round_trips_through_the_kernels_decoder() {
        let sc = [1u8, 63, 17, 32, 5, 48, 63, 0];
        let m = [62u8, 0, 33, 9, 63, 16, 1, 40];
        let mut blk = [0u8; 144];
        blk[..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        blk[4..16].copy_from_slice(&pack_q4k_scales(&sc, &m));
        // All codes 1: each value is sc_j·1 − m_j.
        for q in &mut blk[16..] {
            *q = 0x11;
        }
        let mut out = [0f32; 256];
        dequantize_row(DType::Q4K, &blk, &mut out);
        for j in 0..8 {
            assert_eq!(out[j * 32], sc[j] as f32 - m[j] as f32, "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let s = shape("llama3-70b").unwrap();
        let p = plan(&s, SynthQuant::Q4KM);
        let ty = |n: &str| p.iter().find(|t| t.name == n).unwrap().block;
        assert_eq!(ty("output.weight"), Some(Block::Q6K));
        assert_eq!(ty("token_embd.weight"), Some(Block::Q4K));
        assert_eq!(ty("blk.0.ffn_down.weight"), Some(Block::Q6K));
        assert_eq!(ty("blk.10.ffn_down.weight"), Some(Block::Q4K));
        assert_eq!(ty("blk.12.attn_v.weight"), Some(Block::Q6K));
        assert_eq!(ty("blk.11.attn_v.weight"), Some(Block::Q5K));
        assert_eq!(ty("blk.79.attn_v.weight"), Some(Block::Q6K));
        assert_eq!(ty("blk.40.attn_q.weight"), Some(Block::Q4K));
        assert_eq!(ty("blk.40.attn_norm.weight"), None);
        // About 40 GB, as a real Llama-3-70B Q4_K_M file is (42.5 GB).
        let len = file_len(&s, SynthQuant::Q4KM);
        assert!((39e9..44e9).contains(&(len as f64)), "{len}");
    }

    #[test]
    fn vocabulary_is_a_valid_bpe_of_the_requested_size() {
        let mut rng = XorShift(3);
        let (tokens, types, merges, bos, eos) = vocabulary(32000, &mut rng);
        assert_eq!(tokens.len(), 32000);
        assert_eq!(types.len(), 32000);
        assert_eq!(tokens[bos as usize], "<|begin_of_text|>");
        assert_eq!(tokens[eos as usize], "<|eot_id|>");
        let set: HashSet<&String> = tokens.iter().collect();
        assert_eq!(set.len(), tokens.len(), "duplicate tokens");
        for m in &merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(set.contains(&a.to_string()) && set.contains(&b.to_string()));
            assert!(set.contains(&format!("{a}{b}")));
        }
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let e = shape("llama4-1t").unwrap_err();
        assert!(e.contains("llama3-70b") && e.contains("llama3-8b"), "{e}");
        let e = "q3_k".parse::<SynthQuant>().unwrap_err();
        assert!(e.contains("q4_k_m"), "{e}");
    }
}
