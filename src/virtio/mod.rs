//! virtio-net on the device side: feature bits, the net header, descriptor chains, the used
//! ring and the configuration space.

pub mod chain;
pub mod config_space;
pub mod features;
pub mod header;
pub mod used;
