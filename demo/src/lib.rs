//! The demo shop (being built under the core-loop issue).
