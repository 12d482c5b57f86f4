//! The broker's log filter, shared by every command that logs.
//!
//! `PERISCOPE_LOG` (`EnvFilter` directives, e.g. `debug` or `info,periscope_broker=debug`)
//! or the command's default, with one rule added unless the directives name `rmcp`
//! themselves: the MCP library is held to warnings. It logs each new session's id at
//! info level and carries it in the span of everything that session does, and session
//! ids are bearer secrets (see [`crate::mcp::sessions`]).

use tracing_subscriber::EnvFilter;

/// What the MCP library may log when the directives do not say.
const RMCP_CAP: &str = "rmcp=warn";

/// The filter for `PERISCOPE_LOG`, or `default` without it.
pub fn filter(default: &str) -> EnvFilter {
    filter_from(std::env::var("PERISCOPE_LOG").ok().as_deref(), default)
}

/// The filter for `directives` (invalid or empty ones: `default`), with the MCP library
/// held to warnings unless the directives name it.
pub fn filter_from(directives: Option<&str>, default: &str) -> EnvFilter {
    let chosen = directives.map(str::trim).filter(|d| !d.is_empty() && EnvFilter::try_new(d).is_ok());
    let base = chosen.unwrap_or(default);
    let names_rmcp = base.split(',').any(|d| d.trim().trim_start_matches('[').starts_with("rmcp"));
    let text = if names_rmcp { base.to_owned() } else { format!("{base},{RMCP_CAP}") };
    EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new(format!("{default},{RMCP_CAP}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mcp_library_is_held_to_warnings_unless_named() {
        assert_eq!(filter_from(None, "info").to_string(), "rmcp=warn,info");
        assert_eq!(filter_from(Some("debug"), "info").to_string(), "rmcp=warn,debug");
        assert_eq!(filter_from(Some("info,rmcp=off"), "warn").to_string(), "rmcp=off,info");
        assert_eq!(filter_from(Some("  "), "warn").to_string(), "rmcp=warn,warn");
        assert_eq!(filter_from(Some("=bad=="), "warn").to_string(), "rmcp=warn,warn");
    }
}
