//! tpi-node: one rank of a tpi cluster. Model loading, the split plan, the forward
//! pass of a rank's slice of each layer, and the QUIC transport with its collectives.
pub mod model;
pub mod net;
