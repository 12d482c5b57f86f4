//! Integration tests for periscope-redaction, one binary.

mod accuracy;
