//! Who may see and do what, as plain data: [`Role`]s and [`Scope`]s of keys, the
//! [`Reach`] of a key (one organization, optionally one group, optionally some pools),
//! and the [`Tenancy`] that says which group owns each pool. The names organizations,
//! groups, pools and keys may take are checked here too.
//!
//! This module depends on no other part of the broker: the configuration, the quotas,
//! the key directory and the authentication middleware all build on it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The organization of a self-hosted broker, and of keys that name none.
pub const DEFAULT_ORG: &str = "default";
/// The group every organization has, owning every pool not assigned elsewhere.
pub const DEFAULT_GROUP: &str = "default";
/// Longest key name.
pub const MAX_KEY_NAME: usize = 100;
/// Longest organization or group name.
pub const MAX_ORG_NAME: usize = 64;
/// Whether `s` could be a key at all: 16 to 256 printable ASCII characters without
/// spaces (what the configuration file accepts; generated keys are 36). Anything else is
/// refused before it is hashed or looked up.
pub fn plausible_secret(s: &str) -> bool {
    (16..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `s` is a valid organization, group or pool name.
pub fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// What a key may do. Each MCP tool and REST endpoint needs exactly one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// `system_health`, `/metrics`.
    SystemRead,
    /// Listing agents, pools and their inspectable locations.
    AgentsRead,
    /// Placing and removing actions.
    ActionsWrite,
    /// Reading actions and their hits.
    HitsRead,
    /// Administration: keys, groups and pools, redaction rules, the audit trail (what
    /// of it a key may do also depends on its role).
    Admin,
}

impl Scope {
    /// Every scope a key can name.
    pub const KNOWN: [Scope; 5] =
        [Scope::SystemRead, Scope::AgentsRead, Scope::ActionsWrite, Scope::HitsRead, Scope::Admin];
    /// What a developer key holds: every tool, no administration.
    pub const DEFAULT: [Scope; 4] = [Scope::SystemRead, Scope::AgentsRead, Scope::ActionsWrite, Scope::HitsRead];

    /// The scope's name in configuration, OAuth metadata and errors.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::SystemRead => "mcp:system:read",
            Scope::AgentsRead => "mcp:agents:read",
            Scope::ActionsWrite => "mcp:actions:write",
            Scope::HitsRead => "mcp:hits:read",
            Scope::Admin => "mcp:admin",
        }
    }

    /// Parses a scope name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::KNOWN.into_iter().find(|k| k.as_str() == s.trim())
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Scope::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown scope `{s}`; known scopes: {}",
                Scope::KNOWN.map(|k| k.as_str()).join(", ")
            ))
        })
    }
}

/// What a key is for. Roles are ordered: each can do what the one before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads agents and sources, places and reads actions in the pools it may access.
    Developer,
    /// Also manages its group: which pools belong to it, and the developer and
    /// group-admin keys (and agent keys) of the group.
    GroupAdmin,
    /// Everything in its organization: keys, groups, pools, redaction rules, the audit
    /// trail.
    CompanyAdmin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Developer, Role::GroupAdmin, Role::CompanyAdmin];

    /// The stable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Developer => "developer",
            Role::GroupAdmin => "group_admin",
            Role::CompanyAdmin => "company_admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s.trim())
    }

    /// The scopes the role grants; a key may be narrowed to fewer.
    pub fn scopes(&self) -> &'static [Scope] {
        match self {
            Role::Developer => &Scope::DEFAULT,
            Role::GroupAdmin | Role::CompanyAdmin => &Scope::KNOWN,
        }
    }
}

/// Which agents (and so which pools, actions and hits) a key may see: one organization,
/// optionally one group of it, optionally an explicit set of pools. Actions keep the
/// reach of the key that placed them, so a pool-restricted key can never reach an
/// agent outside its pools, even one that joins later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// The organization.
    pub org: String,
    /// Only pools assigned to this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only these pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<BTreeSet<String>>,
}

impl Reach {
    /// Everything in `org`.
    pub fn org(org: impl Into<String>) -> Reach {
        Reach { org: org.into(), group: None, pools: None }
    }

    /// Whether a pool of an organization is within reach (with the pool-to-group
    /// assignments of `tenancy`).
    pub fn allows(&self, org: &str, pool: &str, tenancy: &Tenancy) -> bool {
        org == self.org
            && self.pools.as_ref().is_none_or(|p| p.contains(pool))
            && self.group.as_deref().is_none_or(|g| tenancy.group_of(org, pool) == g)
    }
}

/// Organizations, their groups, and which group each assigned pool belongs to.
#[derive(Debug, Clone, Default)]
pub struct Tenancy {
    orgs: BTreeMap<String, OrgTenancy>,
}

#[derive(Debug, Clone, Default)]
struct OrgTenancy {
    groups: BTreeSet<String>,
    pools: BTreeMap<String, String>,
}

impl Tenancy {
    /// Notes an organization (with its `default` group).
    pub fn add_org(&mut self, org: &str) {
        self.orgs.entry(org.to_owned()).or_default();
    }

    /// Notes a group of an organization.
    pub fn add_group(&mut self, org: &str, group: &str) {
        self.orgs.entry(org.to_owned()).or_default().groups.insert(group.to_owned());
    }

    /// Notes that `pool` of `org` belongs to `group`.
    pub fn assign(&mut self, org: &str, pool: &str, group: &str) {
        self.orgs.entry(org.to_owned()).or_default().pools.insert(pool.to_owned(), group.to_owned());
    }

    /// The group `pool` of `org` belongs to (`default` when unassigned).
    pub fn group_of<'a>(&'a self, org: &str, pool: &str) -> &'a str {
        self.orgs.get(org).and_then(|o| o.pools.get(pool)).map_or(DEFAULT_GROUP, String::as_str)
    }

    /// Whether the organization exists.
    pub fn has_org(&self, org: &str) -> bool {
        self.orgs.contains_key(org)
    }

    /// Whether the group exists in the organization.
    pub fn has_group(&self, org: &str, group: &str) -> bool {
        group == DEFAULT_GROUP || self.orgs.get(org).is_some_and(|o| o.groups.contains(group))
    }

    /// The organization's groups.
    pub fn groups(&self, org: &str) -> Vec<String> {
        let mut g: BTreeSet<String> = self.orgs.get(org).map(|o| o.groups.clone()).unwrap_or_default();
        g.insert(DEFAULT_GROUP.into());
        g.into_iter().collect()
    }

    /// The organization's explicit pool assignments.
    pub fn assigned_pools(&self, org: &str) -> BTreeMap<String, String> {
        self.orgs.get(org).map(|o| o.pools.clone()).unwrap_or_default()
    }

    /// Every organization.
    pub fn orgs(&self) -> Vec<String> {
        self.orgs.keys().cloned().collect()
    }
}
