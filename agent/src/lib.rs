//! Periscope's Rust agent (being built under the core-loop issue).

pub mod debug_parse;
