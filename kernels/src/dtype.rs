//! Element/block types, the crate error type and the strided weight-matrix view.

use std::fmt;

use crate::isa::Isa;
use crate::layout::{slice_keeps_units, unit_cols, Layout};

/// Storage type of a weight matrix; quantised types use the GGML block layouts (GGUF-compatible).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 single precision, 4 bytes per element.
    F32,
    /// IEEE-754 half precision, 2 bytes per element.
    F16,
    /// bfloat16 (upper half of an f32), 2 bytes per element.
    BF16,
    /// GGML Q8_0: blocks of 32 `{f16 d; i8 qs[32]}`, value = q*d.
    Q8_0,
    /// GGML Q4_0: blocks of 32 `{f16 d; u8 qs[16]}`, value = (nibble-8)*d.
    Q4_0,
    /// GGML Q4_1: blocks of 32 `{f16 d; f16 m; u8 qs[16]}`, value = nibble*d + m.
    Q4_1,
    /// GGML Q5_0: blocks of 32 `{f16 d; u32 qh; u8 qs[16]}`, value = (q5-16)*d.
    Q5_0,
    /// GGML Q5_1: blocks of 32 `{f16 d; f16 m; u32 qh; u8 qs[16]}`, value = q5*d + m.
    Q5_1,
    /// GGML IQ4_NL: blocks of 32 `{f16 d; u8 qs[16]}`, value = `d * KVALUES[nibble]` (non-linear).
    IQ4NL,
    /// GGML Q2_K: super-blocks of 256 `{u8 scales[16]; u8 qs[64]; f16 d, dmin}`, 16 sub-blocks
    /// of 16 with 4-bit scale and min, value = d*sc*q2 - dmin*m.
    Q2K,
    /// GGML Q3_K: super-blocks of 256 `{u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}`,
    /// 16 sub-blocks of 16 with 6-bit signed scales, value = d*(sc-32)*(q3-4).
    Q3K,
    /// GGML Q4_K: super-blocks of 256 `{f16 d, dmin; u8 scales[12]; u8 qs[128]}`, 8 sub-blocks
    /// of 32 with 6-bit scale and min, value = d*sc*q4 - dmin*m.
    Q4K,
    /// GGML Q5_K: super-blocks of 256 `{f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`,
    /// as Q4_K with a fifth bit.
    Q5K,
    /// GGML Q6_K: super-blocks of 256 `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`,
    /// 16 sub-blocks of 16, value = d*sc*(q6-32).
    Q6K,
    /// GGML IQ4_XS: super-blocks of 256 `{f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}`,
    /// 8 sub-blocks of 32 with 6-bit scales, value = `d*(sc-32)*KVALUES[nibble]`.
    IQ4XS,
}

impl DType {
    /// Every storage type, floats first (for sweeps in tests and benchmarks).
    pub const ALL: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::IQ4NL,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4XS,
    ];

    /// Elements per storage block: 1 for float types, 32 for the small-block quantised
    /// types, 256 for the K-quants' and IQ4_XS's super-blocks.
    pub const fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4NL => {
                32
            }
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::IQ4XS => 256,
        }
    }

    /// Bytes per storage block (GGML layout).
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::IQ4NL => 18,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::IQ4XS => 136,
        }
    }

    /// Bytes per weight in storage: `block_bytes / block_len` (4.5 for Q4_K, 6.5625 for Q6_K).
    /// The one definition the planner, the simulator and the benchmarks use.
    pub fn bytes_per_weight(self) -> f64 {
        self.block_bytes() as f64 / self.block_len() as f64
    }

    /// Byte offsets of the f16 scale fields inside one block (for tests and fuzzers that
    /// build valid random blocks: every other byte of a block is free-form bits).
    pub const fn f16_fields(self) -> &'static [usize] {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => &[],
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4NL | DType::IQ4XS => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q2K => &[80, 82],
            DType::Q3K => &[108],
            DType::Q6K => &[208],
        }
    }

    /// Whether [`crate::quantize_row`] can write this type (the float types and ggml's
    /// simple 32-blocks; the K-quants and IQ4 are read, not written).
    pub const fn can_quantize(self) -> bool {
        matches!(
            self,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::Q8_0
                | DType::Q4_0
                | DType::Q4_1
                | DType::Q5_0
                | DType::Q5_1
        )
    }

    /// GGML's type id for this type (`ggml_type`, as GGUF files store it).
    pub const fn ggml_type_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::IQ4NL => 20,
            DType::IQ4XS => 23,
            DType::BF16 => 30,
        }
    }

    /// The type with GGML type id `id`, or `Err` with GGML's name for a type tpi does not
    /// read (`"iq2_xxs"`, `"mxfp4"`, ...; `"ggml type N"` for an id GGML does not define).
    pub fn from_ggml_type_id(id: u32) -> Result<DType, String> {
        if let Some(d) = DType::ALL.into_iter().find(|d| d.ggml_type_id() == id) {
            return Ok(d);
        }
        const OTHERS: [(u32, &str); 14] = [
            (9, "q8_1"),
            (15, "q8_k"),
            (16, "iq2_xxs"),
            (17, "iq2_xs"),
            (18, "iq3_xxs"),
            (19, "iq1_s"),
            (21, "iq3_s"),
            (22, "iq2_s"),
            (24, "i8"),
            (25, "i16"),
            (26, "i32"),
            (27, "i64"),
            (28, "f64"),
            (29, "iq1_m"),
        ];
        const LATER: [(u32, &str); 4] =
            [(34, "tq1_0"), (35, "tq2_0"), (39, "mxfp4"), (40, "nvfp4")];
        Err(OTHERS
            .iter()
            .chain(LATER.iter())
            .find(|(i, _)| *i == id)
            .map_or_else(|| format!("ggml type {id}"), |(_, n)| (*n).to_string()))
    }

    /// Names of every type tpi reads, for error messages ("f32, f16, ..., iq4_xs").
    pub fn supported_names() -> String {
        DType::ALL.map(DType::name).join(", ")
    }

    /// The type named `s` (as [`DType::name`] spells it; upper case and GGML's own
    /// spellings such as `Q4_K` and `IQ4_XS` are accepted).
    pub fn from_name(s: &str) -> Option<DType> {
        let l = s.to_ascii_lowercase();
        DType::ALL.into_iter().find(|d| d.name() == l)
    }

    /// Bytes of one row of `cols` elements, or `None` when `cols` is not a multiple of the block length.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_len()) {
            return None;
        }
        (cols / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Lower-case GGML-style name ("f32", "q4_1", ...), for logs and CLI output.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::IQ4NL => "iq4_nl",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::IQ4XS => "iq4_xs",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors for bad shapes, lengths or settings; kernels return these instead of panicking.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// `cols` is not a multiple of the dtype's block length.
    UnalignedCols {
        /// Matrix dtype.
        dtype: DType,
        /// Offending column count or column offset.
        cols: usize,
    },
    /// The byte buffer is shorter (or, for dense views, different) than the shape requires.
    DataLength {
        /// Bytes the shape requires.
        expected: usize,
        /// Bytes actually provided.
        actual: usize,
    },
    /// Row stride smaller than the row's byte length.
    Stride {
        /// Stride given.
        stride: usize,
        /// Minimum (row bytes).
        row_bytes: usize,
    },
    /// A row or column range outside the matrix or reversed.
    Range {
        /// "rows" or "cols".
        axis: &'static str,
        /// Range start.
        start: usize,
        /// Range end (exclusive).
        end: usize,
        /// Extent of that axis.
        len: usize,
    },
    /// A slice argument has the wrong length.
    Shape {
        /// Which argument.
        what: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        actual: usize,
    },
    /// Any other invalid argument combination.
    Invalid(String),
    /// The requested SIMD path cannot run on this CPU.
    IsaUnavailable(Isa),
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::UnalignedCols { dtype, cols } => write!(
                f,
                "{cols} columns is not a multiple of the {dtype} block length {}",
                dtype.block_len()
            ),
            KernelError::DataLength { expected, actual } => {
                write!(
                    f,
                    "matrix data has {actual} bytes, shape requires {expected}"
                )
            }
            KernelError::Stride { stride, row_bytes } => {
                write!(
                    f,
                    "row stride {stride} is smaller than the row length {row_bytes} bytes"
                )
            }
            KernelError::Range {
                axis,
                start,
                end,
                len,
            } => {
                write!(f, "{axis} range {start}..{end} is invalid for {len} {axis}")
            }
            KernelError::Shape {
                what,
                expected,
                actual,
            } => {
                write!(f, "{what} has length {actual}, expected {expected}")
            }
            KernelError::Invalid(s) => write!(f, "invalid argument: {s}"),
            KernelError::IsaUnavailable(isa) => {
                write!(f, "ISA {isa:?} is not available on this CPU")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// Row-major weight matrix view: row `r` starts at byte `r*row_stride` of `data`.
/// A stride larger than the row lets a column slice be a zero-copy view.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Storage type.
    pub dtype: DType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Number of columns (input features), a multiple of `dtype.block_len()`.
    pub cols: usize,
    /// Bytes between consecutive row starts (>= row bytes).
    pub row_stride: usize,
    /// Backing bytes.
    pub data: &'a [u8],
    /// Row layout ([`Layout::Packed`] only for Q4 types).
    pub layout: Layout,
}

fn row_bytes_checked(dtype: DType, cols: usize) -> Result<usize, KernelError> {
    dtype
        .row_bytes(cols)
        .ok_or(KernelError::UnalignedCols { dtype, cols })
}

fn overflow() -> KernelError {
    KernelError::Invalid("matrix size overflows usize".into())
}

impl<'a> MatRef<'a> {
    /// Dense view; `data.len()` must equal `rows * row_bytes(cols)`.
    pub fn new(
        dtype: DType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let rb = row_bytes_checked(dtype, cols)?;
        let expected = rows.checked_mul(rb).ok_or_else(overflow)?;
        if data.len() != expected {
            return Err(KernelError::DataLength {
                expected,
                actual: data.len(),
            });
        }
        Ok(MatRef {
            dtype,
            rows,
            cols,
            row_stride: rb,
            data,
            layout: Layout::Ggml,
        })
    }

    /// Strided view; requires `row_stride >= row_bytes` and `data.len() >= (rows-1)*stride + row_bytes`.
    pub fn with_stride(
        dtype: DType,
        rows: usize,
        cols: usize,
        row_stride: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let rb = row_bytes_checked(dtype, cols)?;
        if row_stride < rb {
            return Err(KernelError::Stride {
                stride: row_stride,
                row_bytes: rb,
            });
        }
        if rows > 0 {
            let expected = (rows - 1)
                .checked_mul(row_stride)
                .and_then(|v| v.checked_add(rb))
                .ok_or_else(overflow)?;
            if data.len() < expected {
                return Err(KernelError::DataLength {
                    expected,
                    actual: data.len(),
                });
            }
        }
        Ok(MatRef {
            dtype,
            rows,
            cols,
            row_stride,
            data,
            layout: Layout::Ggml,
        })
    }

    /// The same view with rows in `layout`; errors when the dtype has no such layout. A
    /// packed view must cover whole packed rows: slice it after marking it packed, so that
    /// [`MatRef::cols_range`] can keep the slice on whole units.
    pub fn with_layout(self, layout: Layout) -> Result<MatRef<'a>, KernelError> {
        if !layout.supports(self.dtype) {
            return Err(KernelError::Invalid(format!(
                "{} has no {} layout",
                self.dtype,
                layout.name()
            )));
        }
        Ok(MatRef { layout, ..self })
    }

    /// Sub-view of rows `r0..r1` (zero-copy).
    pub fn rows_range(&self, r0: usize, r1: usize) -> Result<MatRef<'a>, KernelError> {
        if r0 > r1 || r1 > self.rows {
            return Err(KernelError::Range {
                axis: "rows",
                start: r0,
                end: r1,
                len: self.rows,
            });
        }
        let rb = self.row_bytes();
        let data = if r1 > r0 {
            let start = r0 * self.row_stride;
            let end = (r1 - 1 - r0) * self.row_stride + rb + start;
            self.data.get(start..end).ok_or(KernelError::DataLength {
                expected: end,
                actual: self.data.len(),
            })?
        } else {
            &self.data[..0]
        };
        MatRef::with_stride(self.dtype, r1 - r0, self.cols, self.row_stride, data)?
            .with_layout(self.layout)
    }

    /// Sub-view of columns `c0..c1` (multiples of the block length); same stride, data offset by bytes.
    pub fn cols_range(&self, c0: usize, c1: usize) -> Result<MatRef<'a>, KernelError> {
        if c0 > c1 || c1 > self.cols {
            return Err(KernelError::Range {
                axis: "cols",
                start: c0,
                end: c1,
                len: self.cols,
            });
        }
        let bl = self.dtype.block_len();
        if !c0.is_multiple_of(bl) {
            return Err(KernelError::UnalignedCols {
                dtype: self.dtype,
                cols: c0,
            });
        }
        if !c1.is_multiple_of(bl) {
            return Err(KernelError::UnalignedCols {
                dtype: self.dtype,
                cols: c1,
            });
        }
        // A packed slice must keep whole units: it starts on one and ends on one or at the
        // row's end (whose last blocks stay in GGML order either way).
        if self.layout == Layout::Packed && !slice_keeps_units(self.dtype, c0, c1, self.cols) {
            return Err(KernelError::Invalid(format!(
                "columns {c0}..{c1} of a packed {} matrix: a slice must start at a multiple of \
                 {} and end at one or at the last column",
                self.dtype,
                unit_cols(self.dtype)
            )));
        }
        let off = c0 / bl * self.dtype.block_bytes();
        let data = self.data.get(off..).unwrap_or(&self.data[..0]);
        MatRef::with_stride(self.dtype, self.rows, c1 - c0, self.row_stride, data)?
            .with_layout(self.layout)
    }

    /// Bytes of row `r` (`row_bytes` long). Panics if `r >= rows`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        let s = r * self.row_stride;
        &self.data[s..s + self.row_bytes()]
    }

    /// Bytes a GEMV over this matrix streams: `rows * row_bytes(cols)`.
    pub fn weight_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Bytes of one row (valid by construction).
    pub(crate) fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// Rows `r0..r1` in GGML order: `None` for a GGML view (read it in place), else the rows
    /// unpacked into a dense buffer.
    pub(crate) fn ggml_rows(&self, r0: usize, r1: usize) -> Option<Vec<u8>> {
        if self.layout == Layout::Ggml {
            return None;
        }
        let mut out = Vec::new();
        self.unpack_rows_into(r0, r1, &mut out);
        Some(out)
    }

    /// Rows `r0..r1` of a packed view unpacked into `out` (resized to fit), dense.
    pub(crate) fn unpack_rows_into(&self, r0: usize, r1: usize, out: &mut Vec<u8>) {
        let rb = self.row_bytes();
        out.resize((r1 - r0) * rb, 0);
        for (r, dst) in (r0..r1).zip(out.chunks_exact_mut(rb.max(1))) {
            crate::layout::regroup(self.dtype, self.row(r), dst, false);
        }
    }
}
