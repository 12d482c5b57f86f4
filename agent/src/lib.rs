//! Periscope's Rust agent (being built under the core-loop issue).
