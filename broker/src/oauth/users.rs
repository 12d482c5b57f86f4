//! People who sign in: their records checked like keys' (organization, role, group,
//! pools, quotas), who may create and change them ([`check_manage`], the same rules as
//! for keys), and their passwords (argon2id).
//!
//! # Password hashes
//!
//! Argon2id with `oauth.password_memory_kib` (default 19 MiB) and
//! `oauth.password_iterations` (default 2), one lane: OWASP's first recommended
//! setting. Measured on the 2-core build machine at about 30 ms per hash in release
//! builds (BENCHMARKS.md), so a sign-in stays far under 100 ms while each guess costs
//! an attacker 19 MiB of memory. The parameters are in each PHC string: changing them
//! applies to new passwords, and old ones keep verifying.

use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier as _, Version};

use super::store::UserRecord;
use crate::auth::{Principal, Role};
use crate::keys::{self, KeyError, KeyKind, NewKey};
use crate::quota::CallerQuotaOverrides;

/// Longest sign-in name.
pub const MAX_USER_NAME: usize = 100;
/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;
/// Longest password accepted (hashing cost is linear in it).
pub const MAX_PASSWORD: usize = 1_024;

/// A user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// The sign-in name: letters, digits and `. _ @ + -`.
    pub name: String,
    /// Its organization.
    pub org: String,
    /// Its role (default developer).
    pub role: Role,
    /// Its group.
    pub group: Option<String>,
    /// Only these pools.
    pub pools: Option<Vec<String>>,
    /// Quota overrides.
    pub quotas: Option<CallerQuotaOverrides>,
    /// The password (absent: the user signs in through the OpenID provider only).
    pub password: Option<String>,
}

impl NewUser {
    /// The same request as a key request, so that keys' validation and permission rules
    /// apply to users unchanged.
    pub fn as_key(&self) -> NewKey {
        NewKey {
            kind: KeyKind::Api,
            name: self.name.clone(),
            org: self.org.clone(),
            role: Some(self.role),
            group: self.group.clone(),
            scopes: None,
            pools: self.pools.clone(),
            quotas: self.quotas,
            expires_at_ms: None,
        }
    }
}

/// Whether `name` can be a sign-in name.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-'))
}

/// Checks a new user on its own: the name, the password, and the key rules for the
/// rest (organization, role and group, pools, quotas).
pub fn validate(new: &NewUser) -> Result<(), KeyError> {
    if !valid_user_name(&new.name) {
        return Err(KeyError::Invalid {
            field: "name".into(),
            message: format!("must be 1 to {MAX_USER_NAME} characters from A-Z a-z 0-9 . _ @ + -"),
        });
    }
    if let Some(p) = &new.password {
        check_password(p)?;
    }
    keys::validate_new(&new.as_key())
}

/// Checks a password's length.
pub fn check_password(p: &str) -> Result<(), KeyError> {
    let n = p.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        return Err(KeyError::Invalid {
            field: "password".into(),
            message: format!("must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
        });
    }
    Ok(())
}

/// Whether `by` may create or change `user`: exactly the rules for creating an API
/// key with the same organization, role, group and pools ([`keys::check_create`]).
pub fn check_manage(by: &Principal, user: &NewUser) -> Result<(), KeyError> {
    keys::check_create(by, &user.as_key())
}

/// Whether `by` may see `user` (company admins: their organization; group admins:
/// their group).
pub fn visible(by: &Principal, user: &UserRecord) -> bool {
    user.org == by.org()
        && match by.role {
            Role::CompanyAdmin => true,
            Role::GroupAdmin => by.reach.group.is_some() && user.group == by.reach.group,
            Role::Developer => false,
        }
}

/// The argon2id hasher with the configured cost.
#[derive(Debug, Clone)]
pub struct Passwords {
    params: Params,
    /// A hash of a random password, verified against when the name is unknown.
    decoy: String,
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

impl HashError {
    /// The hashing task failed to run.
    pub fn from_join(e: &tokio::task::JoinError) -> HashError {
        HashError(e.to_string())
    }
}

impl Passwords {
    /// Argon2id with `memory_kib` and `iterations`, one lane.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Passwords, HashError> {
        let params = Params::new(memory_kib, iterations, 1, None).map_err(|e| HashError(e.to_string()))?;
        let mut p = Passwords { params, decoy: String::new() };
        p.decoy = p.hash(&keys::new_secret("decoy_").map_err(|e| HashError(e.to_string()))?)?;
        Ok(p)
    }

    fn hasher(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// The PHC string of `password` with a fresh salt.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|_| HashError("no secure randomness".into()))?;
        let hash =
            self.hasher().hash_password_with_salt(password.as_bytes(), &salt).map_err(|e| HashError(e.to_string()))?;
        Ok(hash.to_string())
    }

    /// Whether `password` matches `phc` (with the parameters stored in it).
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        self.hasher().verify_password(password.as_bytes(), phc).is_ok()
    }

    /// A hash to verify against when the user does not exist, so that an unknown name
    /// costs the same time as a wrong password (names cannot be probed by timing).
    pub fn decoy(&self) -> &str {
        &self.decoy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_and_nothing_else() {
        let p = Passwords::new(8_192, 1).unwrap();
        let h = p.hash("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"), "{h}");
        assert!(p.verify("correct horse battery", &h));
        assert!(!p.verify("correct horse batterx", &h));
        assert!(!p.verify("correct horse battery", "not a hash"));
        assert_ne!(h, p.hash("correct horse battery").unwrap(), "salted");
        // Hashes made with other parameters keep verifying.
        let other = Passwords::new(19_456, 2).unwrap();
        assert!(other.verify("correct horse battery", &h));
        assert!(!other.verify("x", other.decoy()));
    }

    #[test]
    fn user_names_and_passwords_are_bounded() {
        assert!(valid_user_name("ada.lovelace@example.com"));
        assert!(!valid_user_name("ada lovelace"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name(&"a".repeat(101)));
        assert!(check_password("short").is_err());
        assert!(check_password("long enough password").is_ok());
        assert!(check_password(&"x".repeat(1_025)).is_err());
    }

    /// Prints the time of one hash with the default parameters (run with
    /// `cargo test --release -p periscope-broker password_hash_time -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn password_hash_time() {
        for (m, t) in [(19_456, 2), (12_288, 3), (47_104, 1), (65_536, 3)] {
            let p = Passwords::new(m, t).unwrap();
            let h = p.hash("correct horse battery staple").unwrap();
            let start = std::time::Instant::now();
            for _ in 0..10 {
                assert!(p.verify("correct horse battery staple", &h));
            }
            println!("m={m} KiB t={t}: {:.1} ms per verification", start.elapsed().as_secs_f64() * 100.0);
        }
    }
}
