//! End-to-end tests: a real broker on `127.0.0.1:0`, real agents over WebSockets, real
//! HTTP clients. One test binary; one module per capability; test names read as
//! sentences.

// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

mod support;

mod access;
mod attack_agents;
mod attack_expressions;
mod attack_network;
mod attack_tenancy;
mod backpressure;
mod cluster;
mod conditions;
mod conformance;
mod core_loop;
mod errors;
mod faults;
mod function_probes;
mod gateway_errors;
mod keys;
mod mcp;
mod oauth;
mod oauth_browser;
mod oidc;
mod openapi;
mod quotas;
mod redaction;
mod registry;
mod safety;
mod telemetry;
mod tls;
