//! The broker's configuration file (TOML), parsed and validated.
//!
//! Input: the file's text. Checks: parsing and validation never panic and errors
//! name their source; a file that validates builds everything the broker builds from
//! it before serving (redaction rules, caller and agent limits, the registry's bounds,
//! the MCP host list, the public URL) without panicking, and writing it back out as
//! TOML reads back to the same configuration, which validates again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use periscope_broker::agent_limits::AgentLimits;
use periscope_broker::auth::Role;
use periscope_broker::config::{BrokerConfig, ConfigError};
use periscope_broker::identity::Identities;
use periscope_broker::quota::CallerLimits;
use periscope_broker::registry::Registry;
use periscope_broker::rules::Rules;

/// What `periscope_broker::run` builds from a configuration before it serves.
fn build(config: &BrokerConfig) {
    if let Err(e) = Rules::new(config.redaction.clone()) {
        panic!("validated redaction rules do not compile: {e}");
    }
    let a = &config.agents;
    let _registry = Registry::new(a.max_catalog_entries)
        .with_max_per_org(a.max_agents_per_org)
        .with_max_catalog_bytes(a.max_catalog_bytes)
        .with_identities(Identities::new(
            a.identity_retention_secs.saturating_mul(1_000),
            usize::try_from(a.max_identities_per_org).unwrap_or(usize::MAX),
        ));
    let _callers = CallerLimits::new(config.org_quotas.resolve(&config.callers));
    let _agents =
        AgentLimits::new(config.ingest.clone(), usize::try_from(a.max_sessions_per_key).unwrap_or(usize::MAX));
    for rate in [
        config.ingest.agent_hits(),
        config.ingest.agent_bytes(),
        config.ingest.action_hits(),
        config.ingest.action_lines(),
        config.ingest.action_log_bytes(),
    ] {
        assert!(rate.burst() >= 1);
    }
    for role in [Role::Developer, Role::GroupAdmin, Role::CompanyAdmin] {
        let _ = config.callers.resolve(role, None);
    }
    let _ = config.mcp_allowed_hosts();
    let _ = config.ping_interval();
    let _ = config.public_url(std::net::SocketAddr::from(([127, 0, 0, 1], 7070)));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match BrokerConfig::from_toml(text, "fuzz.toml") {
        Ok(c) => c,
        Err(e) => {
            assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
            assert!(e.to_string().contains("fuzz.toml"), "{e}");
            return;
        }
    };
    if let Err(e) = config.validate() {
        assert!(!e.to_string().is_empty());
        return;
    }
    build(&config);
    let written = toml::to_string(&config).unwrap_or_else(|e| panic!("a valid config does not serialize: {e}"));
    let back = BrokerConfig::from_toml(&written, "written.toml")
        .unwrap_or_else(|e| panic!("a written config does not parse: {e}\n{written}"));
    assert!(back == config, "a written config reads back different:\n{written}");
    back.validate().unwrap_or_else(|e| panic!("a written config does not validate: {e}\n{written}"));
});
