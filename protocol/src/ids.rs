//! Typed identifiers.
//!
//! Every identifier carries its kind as a prefix (`agt_…`, `act_…`, `hit_…`,
//! `key_…`) so that a model or a person reading a log never mistakes one for
//! another, and so that a malformed or misplaced id is rejected at the edge
//! with [`IdError`] instead of travelling further as an opaque string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string does not start with the kind's prefix (`act_` for actions, ...).
    #[error("expected an id starting with `{expected}`, got `{got}`")]
    WrongPrefix {
        /// The prefix this kind of id must carry.
        expected: &'static str,
        /// The offending input, shortened to keep error messages bounded.
        got: String,
    },
    /// The part after the prefix is empty, too long, or has characters outside `[A-Za-z0-9_-]`.
    #[error("`{got}` is not a well-formed {kind} id (prefix, then 1 to {max} characters from A-Z a-z 0-9 _ -)")]
    Malformed {
        /// Which kind of id was being parsed ("agent", "action", ...).
        kind: &'static str,
        /// The offending input, shortened to keep error messages bounded.
        got: String,
        /// The longest body accepted.
        max: usize,
    },
}

/// Longest accepted body after the prefix; bounds memory for ids coming from outside.
pub const MAX_ID_BODY: usize = 64;

/// Length of the random body of generated ids: 20 base32 characters, 100 bits.
const GENERATED_BODY: usize = 20;

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Lower-case Crockford-style alphabet (no i, l, o, u) so ids read unambiguously.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

fn random_body() -> String {
    let mut bytes = [0u8; 16];
    // The OS RNG failing is not something a caller can recover from in a useful way;
    // fall back to a time- and counter-derived value so id generation never panics.
    if getrandom::fill(&mut bytes).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let mixed = nanos ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64);
        bytes = mixed.to_le_bytes();
    }
    let mut n = u128::from_le_bytes(bytes);
    let mut out = String::with_capacity(GENERATED_BODY);
    for _ in 0..GENERATED_BODY {
        out.push(ALPHABET[(n & 31) as usize] as char);
        n >>= 5;
    }
    out
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id (100 bits of randomness).
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, random_body()))
            }

            /// Parses and validates an id received from outside the process.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let Some(body) = s.strip_prefix($prefix) else {
                    return Err(IdError::WrongPrefix { expected: $prefix, got: shorten(s) });
                };
                let ok = !body.is_empty()
                    && body.len() <= MAX_ID_BODY
                    && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if ok {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError::Malformed { kind: $kind, got: shorten(s), max: MAX_ID_BODY })
                }
            }

            /// The id as it appears on the wire and to users.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// One agent, i.e. one instrumented process. Chosen by the agent at start and kept
    /// across reconnects, so the broker can tell a reconnect from a new process.
    AgentId, "agt_", "agent"
);
typed_id!(
    /// One placed action (snapshot, log or metric); also the handle a client polls with.
    ActionId, "act_", "action"
);
typed_id!(
    /// One stored hit, assigned by the broker when it accepts the hit.
    HitId, "hit_", "hit"
);
typed_id!(
    /// One API or agent key; the public half that can be shown and logged.
    KeyId, "key_", "key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_carry_their_prefix() {
        let id = ActionId::generate();
        assert!(id.as_str().starts_with("act_"));
        assert_eq!(ActionId::parse(id.as_str()), Ok(id.clone()));
        assert_ne!(ActionId::generate(), id);
    }

    #[test]
    fn an_id_of_another_kind_is_refused_by_prefix() {
        let agent = AgentId::generate();
        let err = ActionId::parse(agent.as_str()).unwrap_err();
        assert!(matches!(err, IdError::WrongPrefix { expected: "act_", .. }));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for bad in ["act_", "act_a b", "act_é", &format!("act_{}", "x".repeat(65))] {
            assert!(matches!(ActionId::parse(bad), Err(IdError::Malformed { .. })), "{bad}");
        }
    }

    #[test]
    fn ids_round_trip_through_json() {
        let id = HitId::generate();
        let json = serde_json::to_string(&id).unwrap();
        let back: HitId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<HitId>("\"act_abc\"").is_err());
    }
}
