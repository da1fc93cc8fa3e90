//! vhost-packet: a vhost-user virtio-net backend that moves frames between a guest's virtio-net
//! queues and a host interface through an AF_PACKET socket carrying the virtio net header.
//!
//! See docs/architecture.md for the threads and the life of one RX and one TX packet.

pub mod activation;
pub mod affinity;
pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod metrics;
pub mod packet;
pub mod privileges;
pub mod relay;
pub mod signals;
pub mod stats;
pub mod virtio;
pub mod wire;

pub use config::Config;
pub use error::Error;
