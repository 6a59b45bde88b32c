//! tpi-node: one rank of a tpi cluster. Model loading, the split plan, the forward
//! pass of a rank's slice of each layer, the QUIC transport with its collectives, and
//! the node server.
pub mod discovery;
pub mod model;
pub mod net;
pub mod proto;
pub mod stamp;
pub mod store;
pub mod sys;
pub mod worker;
