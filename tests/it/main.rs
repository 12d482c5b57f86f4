//! End-to-end tests: a real broker on `127.0.0.1:0`, real agents over WebSockets, real
//! HTTP clients. One test binary; one module per capability; test names read as
//! sentences.

// Helpers outside #[test] fns fail loudly on purpose: a test that cannot go on stops there.
#![allow(clippy::unwrap_used)]

mod support;

mod core_loop;
mod gateway_errors;
mod mcp;
