//! Helpers shared by the integration tests. Not every test uses every helper.
#![allow(dead_code)]

pub mod daemon;
pub mod dpdk;
pub mod frontend;
pub mod guest;
pub mod netns;
pub mod packets;
