//! tpi-sim: user-space link emulation and the cluster simulator.
