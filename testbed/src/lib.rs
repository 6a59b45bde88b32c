//! tpi-testbed: starts emulated clusters of tpi processes on one machine.
