//! Integration tests for periscope-redaction, one binary.

mod accuracy;
mod config;
mod detectors;
mod fuzz;
mod keys;
mod values;
