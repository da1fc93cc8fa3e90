#![no_main]
//! See `vhost_packet_fuzz::tx_reader` for the input format and what is checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vhost_packet_fuzz::tx_reader::run(data));
