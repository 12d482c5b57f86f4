//! Key-name rules: deciding from a field, variable, header or map-key name alone that
//! its value is sensitive, whatever the value looks like.
//!
//! A name is split into lowercase *segments* ([`segments`]) and matched segment by
//! segment against rules that are themselves short segment sequences (`password`,
//! `api key`, `connect sid`). A rule fires only when every segment after it is a
//! *continuation* (`hash`, `id`, `value`, `b64`, a number, ...): the last word of an
//! identifier is the thing it names, so `dbPassword` and `passwordHash` hold secrets
//! while `passwordPolicy`, `tokenizer` and `TokenService` do not. The full rule, with
//! its deliberate decisions, is documented at the crate root.

use std::collections::HashMap;

/// Most segments considered per name; longer names keep their last segments, which is
/// where the noun that decides sensitivity sits.
const MAX_SEGMENTS: usize = 24;

/// Splits an identifier into its words: on `_ - . space $ @ / : [ ] ' "` and other ASCII
/// punctuation, between a lowercase letter and an uppercase one (`dbPassword`), before
/// the last capital of an acronym followed by lowercase (`HTTPServer` -> `HTTP`,
/// `Server`), and between letters and digits (`cvv2` -> `cvv`, `2`). Non-ASCII
/// characters are kept inside words.
pub fn segments(name: &str) -> Segments<'_> {
    Segments { name, pos: 0 }
}

/// Iterator returned by [`segments`].
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    name: &'a str,
    pos: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Upper,
    Lower,
    Digit,
    Sep,
}

fn class(b: u8) -> Class {
    match b {
        b'A'..=b'Z' => Class::Upper,
        b'a'..=b'z' => Class::Lower,
        b'0'..=b'9' => Class::Digit,
        // Bytes of multibyte characters count as lowercase letters: they join words.
        0x80..=0xFF => Class::Lower,
        _ => Class::Sep,
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.name.as_bytes();
        let mut start = self.pos;
        while start < bytes.len() && class(bytes[start]) == Class::Sep {
            start += 1;
        }
        if start >= bytes.len() {
            self.pos = bytes.len();
            return None;
        }
        let mut end = start + 1;
        while end < bytes.len() {
            let prev = class(bytes[end - 1]);
            let cur = class(bytes[end]);
            let split = match (prev, cur) {
                (_, Class::Sep) => true,
                (Class::Lower, Class::Upper) => true,
                (Class::Digit, Class::Upper | Class::Lower) => true,
                (Class::Upper | Class::Lower, Class::Digit) => true,
                (Class::Upper, Class::Upper) => {
                    // "HTTPServer": split before the `S` that starts a lowercase word.
                    bytes.get(end + 1).is_some_and(|&b| b.is_ascii_lowercase())
                }
                _ => false,
            };
            if split {
                break;
            }
            end += 1;
        }
        self.pos = end;
        // `start` and `end` sit on ASCII bytes or the ends of the string, so they are
        // character boundaries; `get` keeps this panic-free regardless.
        self.name.get(start..end)
    }
}

/// Words that may follow a sensitive word without changing what the name holds: a
/// `passwordHash`, `session_id`, `api_key_value` or `secret2` is still the secret (or
/// enough to use it). Any other trailing word means the name is *about* the secret
/// (`passwordPolicy`, `tokenExpiry`, `secretName`) and is left alone.
const CONTINUATIONS: &[&str] = &[
    "again",
    "argon",
    "b",
    "b64",
    "base",
    "base64",
    "bcrypt",
    "bin",
    "binary",
    "bytes",
    "cipher",
    "ciphertext",
    "confirm",
    "confirmation",
    "current",
    "data",
    "der",
    "digest",
    "enc",
    "encoded",
    "encrypted",
    "hash",
    "hashed",
    "hex",
    "id",
    "ids",
    "input",
    "key",
    "keys",
    "md5",
    "new",
    "old",
    "pem",
    "plain",
    "plaintext",
    "prev",
    "previous",
    "raw",
    "repeat",
    "scrypt",
    "sha",
    "sha1",
    "sha256",
    "sha512",
    "str",
    "string",
    "temp",
    "text",
    "tmp",
    "val",
    "value",
    "values",
    "verify",
];

/// Built-in sensitive names, after the public lists of Datadog's Dynamic
/// Instrumentation and Sentry's data scrubber, as `(rule id, marker kind, names)`.
/// Each name is split like an identifier, so `"api key"` also matches `apiKey`,
/// `X-Api-Key` and `API_KEY`; multi-word names also match glued (`apikey`).
pub(crate) const BUILTIN_KEY_RULES: &[(&str, &str, &[&str])] = &[
    (
        "key:password",
        "PASSWORD",
        &["password", "passwords", "passwd", "pwd", "mysqlpwd", "passphrase", "passcode", "pass phrase"],
    ),
    ("key:secret", "SECRET", &["secret", "secrets", "security answer", "secret answer"]),
    ("key:token", "TOKEN", &["token", "jwt", "bearer", "csrf", "xsrf"]),
    (
        "key:api_key",
        "API_KEY",
        &[
            "api key",
            "app key",
            "application key",
            "license key",
            "access key",
            "client key",
            "consumer secret",
            "account key",
            "shared key",
            "auth key",
            "master key",
        ],
    ),
    (
        "key:private_key",
        "PRIVATE_KEY",
        &[
            "private key",
            "secret key",
            "encryption key",
            "signing key",
            "session key",
            "ssh key",
            "gpg key",
            "pgp key",
            "pkcs8",
        ],
    ),
    ("key:authorization", "AUTHORIZATION", &["authorization", "auth", "oauth"]),
    ("key:cookie", "COOKIE", &["cookie", "cookies"]),
    (
        "key:session",
        "SESSION",
        &["session", "sessions", "sessionid", "phpsessid", "jsessionid", "usersession", "connect sid"],
    ),
    ("key:credentials", "CREDENTIALS", &["credential", "credentials", "creds"]),
    (
        "key:connection_string",
        "CONNECTION_STRING",
        &["connection string", "connstr", "conn str", "database url", "db url", "dsn"],
    ),
    ("key:ssn", "SSN", &["ssn", "social security number"]),
    ("key:card_number", "CARD_NUMBER", &["card number", "cc number", "credit card", "card num", "pan number"]),
    ("key:cvv", "CVV", &["cvv", "cvc", "cvv2", "cvc2", "security code", "card verification"]),
    ("key:pin", "PIN", &["pin", "pin code"]),
    ("key:otp", "OTP", &["otp", "totp", "hotp", "mfa code", "one time code"]),
];

/// Long words that also count when glued to the end of a single segment
/// (`csrftoken`, `userpassword`, `xapikey`): distinctive enough that a word ending with
/// them is about them. `session` is not here (`possession`); `auth` is not here
/// (`oauth` is listed instead).
const GLUED_SUFFIXES: &[(&str, &str)] = &[
    ("password", "key:password"),
    ("passwd", "key:password"),
    ("passphrase", "key:password"),
    ("secret", "key:secret"),
    ("token", "key:token"),
    ("apikey", "key:api_key"),
    ("accesskey", "key:api_key"),
    ("privatekey", "key:private_key"),
    ("secretkey", "key:private_key"),
    ("cookie", "key:cookie"),
    ("credentials", "key:credentials"),
    ("authorization", "key:authorization"),
];

/// Names of fields that conventionally hold phone numbers: a bare run of digits under
/// such a name is a phone number, elsewhere it is just a number.
pub(crate) const PHONE_WORDS: &[&str] =
    &["phone", "tel", "telephone", "mobile", "cell", "fax", "msisdn", "sms", "whatsapp"];

/// Index of a rule in the redactor's rule table.
pub(crate) type RuleIx = u32;

#[derive(Debug)]
struct SeqRule {
    words: Vec<Box<str>>,
    rule: RuleIx,
}

/// Everything known about one lowercase word, found with a single lookup.
#[derive(Debug, Default)]
struct WordInfo {
    /// Rules whose first word this is, longest first.
    starts: Vec<SeqRule>,
    /// A multi-word rule glued into this one word (`apikey`).
    glued: Option<RuleIx>,
    /// May follow a sensitive word (`hash`, `id`, `value`, ...).
    continuation: bool,
    /// Names a phone field (`phone`, `mobile`, ...).
    phone: bool,
}

/// FNV-1a: names are short and trusted to be ours, so a fast non-keyed hash is right.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

/// What a name says about its value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NameInfo {
    /// The key-name rule that makes the value sensitive.
    pub rule: Option<RuleIx>,
    /// The name is a phone field's.
    pub phone: bool,
}

/// The compiled key-name rules: built-in and custom, minus disabled ones.
#[derive(Debug)]
pub(crate) struct KeyRules {
    words_table: HashMap<Box<str>, WordInfo, FnvBuild>,
    /// Long words matched at the end of a single glued segment.
    suffixes: Vec<(Box<str>, RuleIx)>,
    /// The last word of every rule, for building the text scanner's keyword list.
    words: Vec<Box<str>>,
    /// Whether any rule was added.
    any_rule: bool,
}

impl Default for KeyRules {
    fn default() -> Self {
        let mut words_table: HashMap<Box<str>, WordInfo, FnvBuild> = HashMap::default();
        for w in CONTINUATIONS {
            words_table.entry((*w).into()).or_default().continuation = true;
        }
        for w in PHONE_WORDS {
            words_table.entry((*w).into()).or_default().phone = true;
        }
        KeyRules { words_table, suffixes: Vec::new(), words: Vec::new(), any_rule: false }
    }
}

impl KeyRules {
    /// Adds a rule matching `name` (split into segments) under `rule`.
    pub(crate) fn add(&mut self, name: &str, rule: RuleIx) {
        let words: Vec<Box<str>> = segments(name).map(|s| s.to_ascii_lowercase().into_boxed_str()).collect();
        let Some(first) = words.first().cloned() else {
            return;
        };
        self.any_rule = true;
        // The last word is in every name the rule matches (only continuations may
        // follow it), so it is the one keyword the text scanner needs.
        if let Some(head) = words.iter().rev().find(|w| !w.bytes().all(|b| b.is_ascii_digit()))
            && !self.words.contains(head)
        {
            self.words.push(head.clone());
        }
        if words.len() > 1 {
            let glued: String = words.concat();
            let info = self.words_table.entry(glued.into_boxed_str()).or_default();
            info.glued.get_or_insert(rule);
        }
        let starts = &mut self.words_table.entry(first).or_default().starts;
        starts.push(SeqRule { words, rule });
        // Longest first, so `secret key` wins over `secret` for `secretKey`.
        starts.sort_by_key(|r| std::cmp::Reverse(r.words.len()));
    }

    /// Adds a glued suffix word.
    pub(crate) fn add_suffix(&mut self, word: &str, rule: RuleIx) {
        self.any_rule = true;
        self.suffixes.push((word.into(), rule));
        if !self.words.iter().any(|w| &**w == word) {
            self.words.push(word.into());
        }
    }

    /// Whether no rule was added.
    pub(crate) fn is_empty(&self) -> bool {
        !self.any_rule
    }

    /// Lowercase words the text scanner looks for before a `key=value` separator.
    pub(crate) fn words(&self) -> &[Box<str>] {
        &self.words
    }

    /// The rule a name falls under and whether it names a phone field, in one pass.
    pub(crate) fn describe(&self, name: &str) -> NameInfo {
        let mut segs: [&str; MAX_SEGMENTS] = [""; MAX_SEGMENTS];
        let mut n = 0usize;
        for s in segments(name) {
            if n == MAX_SEGMENTS {
                segs.copy_within(1.., 0);
                n -= 1;
            }
            segs[n] = s;
            n += 1;
        }
        let segs = &segs[..n];
        let mut info = NameInfo::default();
        let mut buf = [0u8; 48];
        // Walk from the end: the match closest to the head noun decides.
        let mut tail_ok = n; // segs[tail_ok..] are all continuations
        for i in (0..n).rev() {
            let seg = segs[i];
            let word = lowercase(seg, &mut buf).and_then(|l| self.words_table.get(l));
            if let Some(word) = word {
                info.phone |= word.phone;
                if info.rule.is_none() {
                    for r in &word.starts {
                        let end = i + r.words.len();
                        if end <= n
                            && end >= tail_ok
                            && r.words[1..].iter().zip(&segs[i + 1..end]).all(|(w, s)| s.eq_ignore_ascii_case(w))
                        {
                            info.rule = Some(r.rule);
                            break;
                        }
                    }
                    if info.rule.is_none() && i + 1 >= tail_ok {
                        info.rule = word.glued;
                    }
                }
            }
            if info.rule.is_none() && i + 1 >= tail_ok {
                for (suffix, rule) in &self.suffixes {
                    if seg.len() > suffix.len() && ends_with_ignore_case(seg, suffix) {
                        info.rule = Some(*rule);
                        break;
                    }
                }
            }
            let numeric = seg.bytes().all(|b| b.is_ascii_digit());
            if i + 1 == tail_ok && (numeric || word.is_some_and(|w| w.continuation)) {
                tail_ok = i;
            }
        }
        info
    }
}

fn lowercase<'b>(seg: &str, buf: &'b mut [u8; 48]) -> Option<&'b str> {
    let bytes = seg.as_bytes();
    let out = buf.get_mut(..bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes().get(s.len() - suffix.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
}

/// The glued suffix table, for the redactor to register.
pub(crate) fn glued_suffixes() -> &'static [(&'static str, &'static str)] {
    GLUED_SUFFIXES
}

/// A name in the canonical form exclusions are compared in: lowercase segments joined
/// by `_` (`csrfToken`, `CSRF-Token` and `csrf_token` are all `csrf_token`).
pub fn normalize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for s in segments(name) {
        if !out.is_empty() {
            out.push('_');
        }
        out.extend(s.chars().map(|c| c.to_ascii_lowercase()));
    }
    out
}

/// The identifier a watch expression reads last (`user.password` -> `password`,
/// `headers["Authorization"]` -> `Authorization`, `tokens[0]` -> `tokens`), used as
/// the watch value's name so key-name rules apply to watches too.
pub fn last_identifier(expression: &str) -> Option<&str> {
    let bytes = expression.as_bytes();
    let mut end = bytes.len();
    while end > 0 {
        // Skip to the end of the last identifier-like run.
        while end > 0 && !is_ident_byte(bytes[end - 1]) {
            end -= 1;
        }
        let mut start = end;
        while start > 0 && is_ident_byte(bytes[start - 1]) {
            start -= 1;
        }
        if start < end && !bytes[start].is_ascii_digit() {
            return expression.get(start..end);
        }
        end = start;
    }
    None
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        segments(s).collect()
    }

    #[test]
    fn names_split_on_case_separators_acronyms_and_digits() {
        assert_eq!(split("dbPassword"), ["db", "Password"]);
        assert_eq!(split("X-Api-Key"), ["X", "Api", "Key"]);
        assert_eq!(split("HTTPServerURL"), ["HTTP", "Server", "URL"]);
        assert_eq!(split("cvv2"), ["cvv", "2"]);
        assert_eq!(split("__private.key__"), ["private", "key"]);
        assert_eq!(split("connect.sid"), ["connect", "sid"]);
        assert_eq!(split("ünïcodeName"), ["ünïcode", "Name"]);
        assert!(split("").is_empty());
        assert!(split("--").is_empty());
    }

    #[test]
    fn watch_expressions_are_named_by_their_last_identifier() {
        assert_eq!(last_identifier("user.password"), Some("password"));
        assert_eq!(last_identifier("req.headers[\"Authorization\"]"), Some("Authorization"));
        assert_eq!(last_identifier("tokens[0]"), Some("tokens"));
        assert_eq!(last_identifier("42"), None);
        assert_eq!(last_identifier(""), None);
    }

    #[test]
    fn names_normalize_for_exclusions() {
        assert_eq!(normalize_name("csrfToken"), "csrf_token");
        assert_eq!(normalize_name("CSRF-Token"), "csrf_token");
    }
}
