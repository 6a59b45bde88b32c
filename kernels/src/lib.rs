//! Pure compute kernels on slices for tensor-parallel CPU inference: quantised GEMV/GEMM
//! (GGML block layouts, and a packed Q4 layout for the VNNI kernel), norms, RoPE and attention, with runtime SIMD dispatch
//! (AVX-512, AVX2+FMA+F16C, NEON, scalar) and a persistent thread pool.

#![warn(missing_docs)]

pub mod attention;
pub mod bench;
pub mod dtype;
pub mod gemm;
pub mod gemv;
pub mod isa;
pub mod layout;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod rope;

pub use attention::{attention, AttnShape, KvElem};
pub use dtype::{DType, KernelError, MatRef};
pub use gemm::gemm;
pub use gemv::gemv;
pub use isa::{
    active_isa, available_isas, detected_isa, parse_isa, set_isa, set_isa_from_env, Isa,
};
pub use layout::{pack_row, unpack_row, Layout};
pub use ops::{add_in_place, all_finite, gelu_tanh_mul, rmsnorm, silu_mul, softmax};
pub use pool::ThreadPool;
pub use quant::{dequantize_row, quantize_row};
pub use rope::{apply_rope, rope_inv_freq, Llama3Scaling, RopeLayout};
