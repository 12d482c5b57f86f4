//! Integration tests for the demo shop: real sockets on 127.0.0.1, real HTTP.

// Helpers outside `#[test]` functions unwrap too: an error there should fail the test.
#![allow(clippy::unwrap_used)]

mod instrumentation;
mod load;
mod serving;
mod support;
