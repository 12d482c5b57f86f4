//! Redaction of PII and secrets from everything Periscope captures.
//!
//! Agents redact every hit before it leaves the process and the broker redacts it again
//! before storing or returning it (an agent is never trusted), so this crate is on the
//! hot path twice: it is one compiled automaton run once over each string, it
//! allocates only when something fires, and it never panics on any input. A redacted
//! span reads `[REDACTED:KIND]` so a reader knows what was there; the [`Report`] says
//! where and by which rule, never the value.
//!
//! ```
//! use periscope_redaction::{Redactor, Report};
//!
//! let redactor = Redactor::default_rules();
//! let mut report = Report::new();
//! let out = redactor.redact_text("card 4111 1111 1111 1111, password=hunter2", "log", &mut report);
//! assert_eq!(out, "card [REDACTED:CREDIT_CARD], password=[REDACTED:PASSWORD]");
//! assert_eq!(report.findings()[0].rule, "credit_card");
//! ```
//!
//! # What is detected
//!
//! *Value detectors* find secrets by shape and confirm them with a validator:
//! payment cards (Luhn and network prefix/length, with or without separators, also as
//! integers), IBANs (per-country length and mod-97), US SSNs (SSA rules; a bare nine-digit
//! number only after `SSN`), emails, phone numbers (international, and national formats
//! with separators or an area code in parentheses; a bare run of digits only after a word
//! such as `phone`/`tel`/`call` or under a phone-named field), IPv4 and IPv6 (not
//! loopback, unspecified, broadcast or netmasks), MAC addresses, JWTs (header must
//! decode to JSON with `alg`), PEM private keys (through their `END` line, or to the end
//! of a value truncation cut), `Bearer`/`Basic` credentials, passwords in URLs
//! (`scheme://user:password@host`, only the password goes), and cloud and SaaS keys after
//! the public gitleaks catalog (AWS access key ids except `...EXAMPLE`, GitHub and npm
//! tokens with their CRC32 checksum, GitLab, Slack, Stripe, Google, OpenAI, Anthropic,
//! Hugging Face, SendGrid, Twilio, Shopify, DigitalOcean, Vault and more; see
//! [`builtin_rule_ids`]). In text, a value under a name is read in every common shape:
//! `key = value`, `key: value`, `key='value'`, `"key": "value"` (JSON inside a log line,
//! and `\"key\":\"value\"` inside a JSON string), Rust `Debug` (`Key { key: Some("v") }`),
//! Python and Java dumps (`User(key='v')`, `key=b'v'`, `User{key='v'}`), Go's `%+v`
//! (`{Key:v}`), `key => 'v'` and `[key] => v`, and XML elements (`<key>v</key>`). The key
//! goes through the same name rules as a structured field's name: a sensitive name hides
//! the value whatever it is, a phone field's name (`phone`, `mobile`, `contactPhone`)
//! hides a bare phone number, and values that look generated (long, mixed, high
//! entropy) under weakly secret-ish names (`...key`, `signature`, `hmac`, `salt`) are
//! reported as `generic_secret`.
//!
//! # The key-name rule
//!
//! A name (field, variable, header, map key, JSON member, a watch expression's last
//! identifier) is sensitive when it *names* a secret, whatever its value looks like:
//!
//! 1. The name is split into words on `_ - . $ @ /` and other punctuation, between a
//!    lowercase and an uppercase letter (`dbPassword` → `db`, `Password`), before the
//!    last capital of an acronym (`HTTPServer` → `HTTP`, `Server`) and between letters
//!    and digits (`cvv2` → `cvv`, `2`).
//! 2. The words are compared, case-insensitively and *whole*, with the rules: single
//!    words (`password`, `passwd`, `pwd`, `secret`, `token`, `authorization`, `auth`,
//!    `cookie`, `session`, `credentials`, `ssn`, `cvv`, `pin`, `otp`, `jwt`, `dsn`, ...) and
//!    short phrases matched as consecutive words or glued (`api key` matches `apiKey`,
//!    `X-Api-Key`, `API_KEY` and `apikey`; also `private key`, `access key`,
//!    `card number`, `connection string`, `connect sid`, ...). A few distinctive words
//!    also match glued onto the end of a word (`csrftoken`, `userpassword`, `xapikey`).
//!    The lists start from Datadog's and Sentry's public ones; operators add their own
//!    with `key_names` and exempt names with `exclusions.key_names`.
//! 3. The rule fires only if every word after the match is a *continuation* that
//!    still denotes the secret: `hash`, `digest`, `id`, `value`, `data`, `str`, `bytes`,
//!    `b64`, `hex`, `enc`, `encrypted`, `raw`, `plain`, `confirm`, `new`, `old`, `key`,
//!    a number, ... The last word of an identifier is what it names, so a name that ends
//!    in anything else is *about* the secret, not the secret.
//!
//! Deliberate decisions that follow:
//!
//! | name | redacted | why |
//! |---|---|---|
//! | `dbPassword`, `X-Api-Key`, `accessToken`, `client_secret` | yes | ends in the secret |
//! | `passwordHash`, `password_digest`, `sessionId`, `apiKeyValue`, `token2` | yes | continuations: a hash can be cracked, a session id is the session |
//! | `passwordPolicy`, `password_min_length`, `tokenExpiry`, `secretName`, `sessionTimeout` | no | the last word names something else |
//! | `TokenService`, `tokenStore`, `credentialsProvider` | no | a class or a component, not a value |
//! | `author`, `authority`, `authenticated` | no | `auth` matches only as a whole word |
//! | `tokenizer`, `tokens`, `max_tokens` | no | whole-word match; `tokens` (plural) is usually a count or a lexer's output |
//! | `secretary`, `possession`, `pinned` | no | whole-word match; `session` is not a glued suffix |
//! | `private_key_path`, `password_file` | no | a path to a secret is not the secret |
//! | `pwd` | yes | Datadog lists it as MySQL's password variable, even though the shell uses it for the working directory |
//! | `key`, `cache_key` | only with a generated-looking value | too common a word to redact on its own |
//!
//! A value under a sensitive name is replaced whole, containers included; `null`,
//! booleans, empty strings and truncation markers are left (they hide nothing). Under a
//! phone field's name, a bare run of 7 to 15 digits is a phone number, whether it is
//! text or an integer.
//!
//! # Deliberately not detected
//!
//! A bare nine-digit integer is not an SSN (88% of all nine-digit numbers pass the SSA
//! rules; order ids would vanish), a bare run of digits is not a phone number without a
//! phone-ish word or field name, epoch timestamps, UUIDs, hashes, git SHAs, versions
//! (a four-part version is only spared after `version`/`v`), ports and class names are
//! left alone, and a 16-digit number is a card only when Luhn and the network agree.
//!
//! # Cost
//!
//! One lazy DFA over all patterns (ASCII mode), a search per candidate, validators only
//! on candidates. Token patterns use unbounded runs with a length check afterwards:
//! exact counts such as `{36}` multiply the automaton's states with every other pattern
//! in progress and made the DFA cache thrash on varied input. Each thread that redacts
//! holds a DFA cache of at most 8 MiB (filled lazily). `BENCHMARKS.md` has the numbers.
//!
//! # Modes and guarantees
//!
//! * **Strict mode** keeps numbers and booleans only: every other non-empty string
//!   becomes `[REDACTED:STRICT]` (after key-name rules, which say more); numeric strings
//!   are still scanned, so a card number in one is still caught.
//! * **Idempotent**: markers are stepped over, and a candidate that overlaps a marker
//!   or sits within three bytes of one is left alone (its surroundings were judged in
//!   the first pass, next to the original value), so a second pass (the broker's)
//!   changes nothing and reports nothing new. Property tests check this on arbitrary
//!   text, value trees and JSON.
//! * **Bounded output**: each redacted span (at least one byte) becomes one marker of at
//!   most [`MAX_MARKER_LEN`] bytes, so output is at most `MAX_MARKER_LEN` times the
//!   input, and it never grows on later passes.
//!
//! # Layout
//!
//! - [`config`]: [`RedactionConfig`] (TOML and JSON) and its validation.
//! - [`keys`]: splitting names into words and the key-name rules.
//! - `detectors`: the built-in patterns and the checks that confirm them.
//! - [`validate`]: Luhn, mod-97, SSA, JWT header, CRC32, entropy.
//! - `engine`: the compiled automaton and the single scanning pass.
//! - `redactor`: [`Redactor`], walking text, values, hits and JSON.
//! - [`report`]: [`Report`] and [`Finding`].

pub mod config;
mod detectors;
mod engine;
pub mod keys;
mod redactor;
pub mod report;
pub mod validate;

pub use config::{Builtins, ConfigError, CustomPattern, Exclusions, RedactionConfig, builtin_rule_ids};
pub use redactor::{FINDINGS_TRUNCATED_RULE, NameRule, Redactor};
pub use report::{Finding, Report};

/// Longest marker this crate writes: `[REDACTED:` + a kind of at most 40 characters + `]`.
pub const MAX_MARKER_LEN: usize = 11 + engine::MAX_KIND_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redactor_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Redactor>();
    }

    #[test]
    fn the_default_rules_compile() {
        let r = Redactor::default_rules();
        assert_eq!(r.version(), 0);
    }
}
