//! Weight views over memory-mapped files or owned buffers, and the tensor store that
//! names them canonically whatever the file format (GGUF or safetensors).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use tpi_kernels::layout::{slice_keeps_units, unit_cols};
use tpi_kernels::{DType, Layout, MatRef};

pub use super::arch::Role;
use super::config::ModelConfig;
use super::error::ModelError;
use super::gguf::GgufFile;

/// Bytes behind a weight: a shared memory map or a shared heap buffer (e.g. received over the network).
#[derive(Clone)]
pub enum Blob {
    /// A region of a memory-mapped file.
    Map(Arc<Mmap>),
    /// An owned buffer.
    Owned(Arc<Vec<u8>>),
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Map(m) => m,
            Blob::Owned(v) => v,
        }
    }
}

/// A matrix (or vector, as one row) view: dtype, shape and stride over a [`Blob`].
/// Slicing is zero-copy; [`Weight::mat`] hands the kernels a [`MatRef`].
#[derive(Clone)]
pub struct Weight {
    /// Element type.
    pub dtype: DType,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Bytes from one row to the next.
    pub row_stride: usize,
    /// Row layout (shards may hold Q4 matrices packed for the VNNI kernel).
    pub layout: Layout,
    blob: Blob,
    offset: usize,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({} {}x{} stride {})",
            self.dtype.name(),
            self.rows,
            self.cols,
            self.row_stride
        )
    }
}

impl Weight {
    /// A dense weight over `blob[offset..]`, checked against the blob's length.
    pub fn new(
        dtype: DType,
        rows: usize,
        cols: usize,
        blob: Blob,
        offset: usize,
    ) -> Result<Self, ModelError> {
        let rb = dtype.row_bytes(cols).ok_or_else(|| {
            ModelError::Input(format!(
                "{cols} columns is not a whole number of {} blocks",
                dtype.name()
            ))
        })?;
        let need = rb.checked_mul(rows).and_then(|n| n.checked_add(offset));
        if need.is_none_or(|n| n > blob.bytes().len()) {
            return Err(ModelError::Input(format!(
                "{rows}x{cols} {} weight does not fit its {}-byte buffer",
                dtype.name(),
                blob.bytes().len()
            )));
        }
        Ok(Weight {
            dtype,
            rows,
            cols,
            row_stride: rb,
            layout: Layout::Ggml,
            blob,
            offset,
        })
    }

    /// This weight with rows in `layout`; errors when its dtype has no such layout.
    pub fn with_layout(mut self, layout: Layout) -> Result<Self, ModelError> {
        if !layout.supports(self.dtype) {
            return Err(ModelError::Input(format!(
                "a {} weight cannot be stored {}",
                self.dtype.name(),
                layout.name()
            )));
        }
        self.layout = layout;
        Ok(self)
    }

    /// A dense weight owning `data`.
    pub fn from_vec(
        dtype: DType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, ModelError> {
        Self::new(dtype, rows, cols, Blob::Owned(Arc::new(data)), 0)
    }

    /// Bytes of one dense row.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// The bytes this view spans.
    fn span(&self) -> &[u8] {
        let len = if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + self.row_bytes()
        };
        &self.blob.bytes()[self.offset..self.offset + len]
    }

    /// The kernel view of this weight.
    pub fn mat(&self) -> MatRef<'_> {
        MatRef {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            data: self.span(),
            layout: self.layout,
        }
    }

    /// Rows `r0..r1` (zero-copy).
    pub fn rows_range(&self, r0: usize, r1: usize) -> Result<Weight, ModelError> {
        if r0 > r1 || r1 > self.rows {
            return Err(ModelError::Plan(format!(
                "row slice {r0}..{r1} out of {} rows",
                self.rows
            )));
        }
        let mut w = self.clone();
        w.offset += r0 * self.row_stride;
        w.rows = r1 - r0;
        Ok(w)
    }

    /// Columns `c0..c1` (zero-copy; bounds must be whole quantisation blocks, and for a
    /// packed weight whole packed units or the row's end).
    pub fn cols_range(&self, c0: usize, c1: usize) -> Result<Weight, ModelError> {
        if self.layout == Layout::Packed && !slice_keeps_units(self.dtype, c0, c1, self.cols) {
            return Err(ModelError::Plan(format!(
                "column slice {c0}..{c1} of a packed {} weight does not keep whole \
                 {}-column units",
                self.dtype.name(),
                unit_cols(self.dtype)
            )));
        }
        let bl = self.dtype.block_len();
        if c0 > c1 || c1 > self.cols || !c0.is_multiple_of(bl) || !c1.is_multiple_of(bl) {
            return Err(ModelError::Plan(format!(
                "column slice {c0}..{c1} of {} is not aligned to {}-element {} blocks",
                self.cols,
                bl,
                self.dtype.name()
            )));
        }
        let mut w = self.clone();
        w.offset += c0 / bl * self.dtype.block_bytes();
        w.cols = c1 - c0;
        Ok(w)
    }

    /// Dense row-major bytes of this view (copies; used to ship slices to other ranks).
    pub fn to_dense_bytes(&self) -> Vec<u8> {
        let rb = self.row_bytes();
        let span = self.span();
        let mut out = Vec::with_capacity(rb * self.rows);
        for r in 0..self.rows {
            out.extend_from_slice(&span[r * self.row_stride..r * self.row_stride + rb]);
        }
        out
    }

    /// One row dequantised to f32 (embedding lookups).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let s = &self.span()[r * self.row_stride..r * self.row_stride + rb];
        if self.layout == Layout::Packed {
            let mut g = vec![0u8; rb];
            tpi_kernels::unpack_row(self.dtype, s, &mut g)
                .expect("packed rows are whole Q4 blocks");
            tpi_kernels::dequantize_row(self.dtype, &g, out);
        } else {
            tpi_kernels::dequantize_row(self.dtype, s, out);
        }
    }

    /// The whole view dequantised to f32 (norm weights and biases: small vectors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_f32(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }

    /// Drops this view's pages from the process's resident set (file-backed maps
    /// only; they fault back in from the file if read again). Lets a streaming pass
    /// over a large model, such as sharding it, stay small in memory.
    pub fn release_pages(&self) {
        if let Blob::Map(m) = &self.blob {
            let len = self.span().len();
            // SAFETY: the map is read-only and file-backed, so DONTNEED only drops our
            // page mappings; the data stays in the file.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.offset, len)
            };
        }
    }

    /// Bytes a GEMV over this view streams.
    pub fn nbytes(&self) -> usize {
        self.row_bytes() * self.rows
    }
}

/// Which file format the store was read from; it decides tensor names and RoPE layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A GGUF file.
    Gguf,
    /// An HF directory of safetensors.
    SafeTensors,
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    rows: usize,
    cols: usize,
    offset: usize,
}

/// The layer a per-layer tensor name belongs to (`blk.N.…` in GGUF,
/// `model.layers.N.…` in safetensors); None for global tensors.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    rest.split('.').next()?.parse().ok()
}

fn check_role_shape(name: &str, w: &Weight, rows: usize, cols: usize) -> Result<(), ModelError> {
    if (w.rows, w.cols) != (rows, cols) {
        return Err(ModelError::BadShape {
            tensor: name.to_string(),
            got: vec![w.rows, w.cols],
            expected: vec![rows, cols],
        });
    }
    Ok(())
}

/// One matrix or vector of a safetensors file, as [`parse_safetensors`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Rows (1 for a vector).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Byte offset of its data in the file.
    pub offset: usize,
}

/// The 1-D and 2-D tensors of a safetensors file's bytes (header and bounds checked by
/// the safetensors crate, dtypes by tpi); tensors of other ranks, which the engine
/// never reads (rotary caches), are left out. `path` only names the file in errors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<SafetensorsEntry>, ModelError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::corrupt(path, e.to_string()))?;
    let base = bytes.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = st_dtype(&name, view.dtype())?;
        let shape = view.shape();
        let (rows, cols) = match shape.len() {
            1 => (1, shape[0]),
            2 => (shape[0], shape[1]),
            _ => continue,
        };
        let offset = view.data().as_ptr() as usize - base;
        out.push(SafetensorsEntry {
            name,
            dtype,
            rows,
            cols,
            offset,
        });
    }
    Ok(out)
}

/// All tensors of a model, by file name, over their memory maps.
pub struct TensorStore {
    format: Format,
    maps: Vec<Arc<Mmap>>,
    entries: BTreeMap<String, Entry>,
    /// The file declares its tensors but holds none of their bytes (see
    /// [`WEIGHTS_ELSEWHERE_KEY`]): reading one is an error unless [`TensorStore::set_data`]
    /// put it in memory.
    weights_elsewhere: Option<String>,
    /// Tensors whose bytes are held in memory instead of read from the file.
    in_memory: HashMap<String, Arc<Vec<u8>>>,
}

/// GGUF metadata key of a file that declares a model's tensors without holding their
/// bytes (its data section is a hole): `tpi-testbed synth --shards-out` writes one beside
/// the shards it generates, so the shards have a model (config, vocabulary, identity)
/// without the tens of GB the weights would take a second time. Its value says where the
/// weights are.
pub const WEIGHTS_ELSEWHERE_KEY: &str = "tpi.weights_elsewhere";

fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = std::fs::File::open(path).map_err(|err| ModelError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    // SAFETY: read-only map of a model file that tpi never writes while it is open.
    unsafe { Mmap::map(&file) }.map_err(|err| ModelError::Io {
        path: path.to_path_buf(),
        err,
    })
}

fn st_dtype(name: &str, d: safetensors::Dtype) -> Result<DType, ModelError> {
    Ok(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => {
            return Err(ModelError::UnsupportedDType {
                tensor: name.to_string(),
                dtype: format!("{other:?}").to_lowercase(),
            })
        }
    })
}

impl TensorStore {
    /// The tensors of an opened GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Self {
        let entries = f
            .tensors()
            .values()
            .map(|t| {
                let (rows, cols) = t.rows_cols();
                (
                    t.name.clone(),
                    Entry {
                        file: 0,
                        dtype: t.dtype,
                        rows,
                        cols,
                        offset: t.offset,
                    },
                )
            })
            .collect();
        TensorStore {
            format: Format::Gguf,
            maps: vec![f.map()],
            entries,
            weights_elsewhere: f.meta(WEIGHTS_ELSEWHERE_KEY).map(|_| {
                f.get_str(WEIGHTS_ELSEWHERE_KEY)
                    .unwrap_or("elsewhere")
                    .to_string()
            }),
            in_memory: HashMap::new(),
        }
    }

    /// The tensors of an HF model directory (`model.safetensors` or an index of shards).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|err| ModelError::Io {
                path: index.clone(),
                err,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::corrupt(&index, e.to_string()))?;
            let wm = v
                .get("weight_map")
                .and_then(|w| w.as_object())
                .ok_or_else(|| ModelError::corrupt(&index, "no weight_map"))?;
            let mut names: Vec<String> = wm
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            let mut out = Vec::new();
            for n in names {
                if n.contains('/') || n.contains("..") {
                    return Err(ModelError::corrupt(&index, format!("bad shard name {n}")));
                }
                out.push(dir.join(n));
            }
            out
        } else {
            return Err(ModelError::Config(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            let map = map_file(path)?;
            for t in parse_safetensors(&map, path)? {
                entries.insert(
                    t.name,
                    Entry {
                        file: fi,
                        dtype: t.dtype,
                        rows: t.rows,
                        cols: t.cols,
                        offset: t.offset,
                    },
                );
            }
            maps.push(Arc::new(map));
        }
        Ok(TensorStore {
            format: Format::SafeTensors,
            maps,
            entries,
            weights_elsewhere: None,
            in_memory: HashMap::new(),
        })
    }

    /// The naming scheme of the underlying files.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every tensor's file name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// A tensor by file name.
    pub fn get(&self, name: &str) -> Result<Weight, ModelError> {
        self.lookup(name, true)
    }

    /// Tensor `name` for its type and shape only: in a file whose weights are elsewhere,
    /// a view of its (empty) place in the file.
    fn lookup(&self, name: &str, data: bool) -> Result<Weight, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if let Some(bytes) = self.in_memory.get(name) {
            return Weight::new(e.dtype, e.rows, e.cols, Blob::Owned(bytes.clone()), 0);
        }
        if let (true, Some(at)) = (data, &self.weights_elsewhere) {
            return Err(ModelError::WeightsElsewhere {
                tensor: name.to_string(),
                at: at.clone(),
            });
        }
        Weight::new(
            e.dtype,
            e.rows,
            e.cols,
            Blob::Map(self.maps[e.file].clone()),
            e.offset,
        )
    }

    /// Holds tensor `name`'s bytes in memory from now on, in place of the file's: for a
    /// generator that makes each tensor only when a shard needs it. The length must be
    /// the tensor's.
    pub fn set_data(&mut self, name: &str, bytes: Vec<u8>) -> Result<(), ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let want = e.dtype.row_bytes(e.cols).unwrap_or(0) * e.rows;
        if bytes.len() != want {
            return Err(ModelError::Input(format!(
                "tensor `{name}` takes {want} bytes, not {}",
                bytes.len()
            )));
        }
        self.in_memory.insert(name.to_string(), Arc::new(bytes));
        Ok(())
    }

    /// Forgets the in-memory bytes [`TensorStore::set_data`] gave tensor `name`.
    pub fn clear_data(&mut self, name: &str) {
        self.in_memory.remove(name);
    }

    /// Where the weights are when this file does not hold them (see
    /// [`WEIGHTS_ELSEWHERE_KEY`]).
    pub fn weights_elsewhere(&self) -> Option<&str> {
        self.weights_elsewhere.as_deref()
    }

    /// The file name of a role's tensor in `cfg`'s family.
    pub fn role_name(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
    ) -> Result<String, ModelError> {
        cfg.spec()?
            .tensor_name(role, self.format, layer, 0)
            .ok_or_else(|| {
                ModelError::Config(format!("{} models have no {role:?} tensor", cfg.arch))
            })
    }

    /// A tensor by role, with its shape checked against the config (for an expert role,
    /// expert 0; see [`TensorStore::expert`]).
    pub fn role(&self, cfg: &ModelConfig, role: Role, layer: usize) -> Result<Weight, ModelError> {
        self.role_of(cfg, role, layer, true)
    }

    /// [`TensorStore::role`] for its type and shape only (see [`TensorStore::lookup`]).
    pub fn role_shape(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
    ) -> Result<Weight, ModelError> {
        self.role_of(cfg, role, layer, false)
    }

    fn role_of(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
        data: bool,
    ) -> Result<Weight, ModelError> {
        if role.is_expert() {
            return self.expert_of(cfg, role, layer, 0, data);
        }
        let name = self.role_name(cfg, role, layer)?;
        let w = self.lookup(&name, data)?;
        let (r, c) = role.shape(cfg);
        check_role_shape(&name, &w, r, c)?;
        Ok(w)
    }

    /// Expert `e`'s tensor of an expert role: a named tensor in HF files, the `e`-th slab
    /// of rows of the layer's stacked 3-D tensor in GGUF ones (zero-copy either way).
    pub fn expert(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
        e: usize,
    ) -> Result<Weight, ModelError> {
        self.expert_of(cfg, role, layer, e, true)
    }

    /// [`TensorStore::expert`] for its type and shape only (see [`TensorStore::lookup`]).
    pub fn expert_shape(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
        e: usize,
    ) -> Result<Weight, ModelError> {
        self.expert_of(cfg, role, layer, e, false)
    }

    fn expert_of(
        &self,
        cfg: &ModelConfig,
        role: Role,
        layer: usize,
        e: usize,
        data: bool,
    ) -> Result<Weight, ModelError> {
        let name = cfg
            .spec()?
            .tensor_name(role, self.format, layer, e)
            .ok_or_else(|| {
                ModelError::Config(format!("{} models have no {role:?} tensor", cfg.arch))
            })?;
        if e >= cfg.n_experts {
            return Err(ModelError::Config(format!(
                "expert {e} of {}: out of range",
                cfg.n_experts
            )));
        }
        let w = self.lookup(&name, data)?;
        let (r, c) = role.shape(cfg);
        match self.format {
            Format::SafeTensors => {
                check_role_shape(&name, &w, r, c)?;
                Ok(w)
            }
            Format::Gguf => {
                check_role_shape(&name, &w, r * cfg.n_experts, c)?;
                w.rows_range(e * r, (e + 1) * r)
            }
        }
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.entries
            .values()
            .map(|e| e.dtype.row_bytes(e.cols).unwrap_or(0) * e.rows)
            .sum()
    }
}
