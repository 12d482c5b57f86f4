//! The built-in value detectors: one ASCII-mode pattern per shape, and the check that
//! confirms a match and says which bytes to replace.
//!
//! All patterns are compiled together into one multi-pattern automaton (see
//! [`crate::engine`]), in the order of [`BUILTINS`]: when two patterns match at the same
//! position, the earlier one wins, so specific shapes (a PEM header, a vendor token, a
//! JWT) come before general ones (an email, a number). A match is only a candidate: its
//! [`Check`] validates it (Luhn, mod-97, SSA rules, a decodable JWT header, a
//! checksum, the surrounding bytes) and returns the byte range to redact, which may be
//! narrower than the match (the password inside `scheme://user:password@host`) or
//! wider (a PEM body up to its `END` line).
//!
//! Patterns are ASCII-only and their matches start and end on ASCII bytes, so every
//! range handed out lies on UTF-8 character boundaries.

use std::ops::Range;

use crate::validate;

/// How a pattern's match is confirmed and narrowed or widened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// An existing `[REDACTED:KIND]` marker: skipped, never redacted twice.
    Marker,
    /// A user's pattern: the match is the finding.
    Custom,
    /// A token that must not run on into more token characters.
    Bounded,
    /// `-----BEGIN ... PRIVATE KEY-----`: redacted through the `END` line, or to the end
    /// of a value cut short by truncation.
    Pem,
    /// Header decodes to JSON with `alg`.
    Jwt,
    /// AWS access key id, except the documentation's `...EXAMPLE` keys.
    Aws,
    /// GitHub or npm token with a valid CRC32 checksum.
    GithubChecksum,
    /// `scheme://user:password@`: the password.
    UrlCredentials,
    /// `Bearer <token>`: the token.
    Bearer,
    /// `Basic <base64 user:pass>`: the credential.
    Basic,
    /// `key = value` with a sensitive key: checked by the engine, which knows the key rules.
    KeyValue,
    /// `SSN 123456789`: the digits.
    SsnKeyword,
    /// `phone: 4155550123`: the digits.
    PhoneKeyword,
    Email,
    Iban,
    Card,
    Ssn,
    Mac,
    Ipv6,
    Ipv4,
    Phone,
}

/// A built-in detector: rule id, marker kind, check and patterns.
pub(crate) struct Builtin {
    /// Stable rule id, as reported in findings and used in `disabled`.
    pub id: &'static str,
    /// What the marker says: `[REDACTED:<kind>]`.
    pub kind: &'static str,
    /// How matches are confirmed.
    pub check: Check,
    /// Allowed match length in bytes, checked before `check`.
    pub len: (usize, usize),
    /// Its patterns, ASCII mode.
    pub patterns: &'static [&'static str],
}

/// No length limit.
pub(crate) const ANY: (usize, usize) = (0, usize::MAX);

/// A fixed-prefix token: the match is the finding when its length is in `len` and it
/// does not run on into more token characters.
const fn token(
    id: &'static str,
    kind: &'static str,
    len: (usize, usize),
    patterns: &'static [&'static str],
) -> Builtin {
    Builtin { id, kind, check: Check::Bounded, len, patterns }
}

/// Marker pattern; always pattern 0 so existing markers are stepped over first.
pub(crate) const MARKER_PATTERN: &str = r"\[REDACTED:[A-Za-z0-9_]{1,48}\]";

/// Rule id of the `key = value` detector when the value is key material under a
/// weakly secret-ish name (`signing`, `cache_key=8f3a...`).
pub(crate) const GENERIC_SECRET: &str = "generic_secret";

/// Names that are not sensitive by themselves but whose *generated-looking* values are
/// (`hmac=`, `salt:`, `...key=` with a high-entropy value).
pub(crate) const WEAK_KEY_WORDS: &[&str] = &["key", "keys", "signature", "sig", "hmac", "salt"];

/// Built-in detectors, in priority order.
pub(crate) const BUILTINS: &[Builtin] = &[
    // Token patterns use unbounded runs and check their length afterwards: exact counts
    // like `{36}` multiply the automaton's states with every other pattern in progress.
    Builtin {
        id: "pem_private_key",
        kind: "PRIVATE_KEY",
        check: Check::Pem,
        len: ANY,
        patterns: &[r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"],
    },
    token("age_secret_key", "PRIVATE_KEY", (74, 74), &[r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]+"]),
    Builtin {
        id: "jwt",
        kind: "JWT",
        check: Check::Jwt,
        len: (24, usize::MAX),
        patterns: &[r"\bey[IJ][A-Za-z0-9_-]+\.ey[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"],
    },
    Builtin {
        id: "aws_access_key",
        kind: "AWS_ACCESS_KEY",
        check: Check::Aws,
        len: (20, 20),
        patterns: &[r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]+\b"],
    },
    Builtin {
        id: "github_token",
        kind: "GITHUB_TOKEN",
        check: Check::GithubChecksum,
        len: (40, 40),
        patterns: &[r"\bgh[pousr]_[A-Za-z0-9]+\b"],
    },
    token("github_fine_grained_token", "GITHUB_TOKEN", (93, 93), &[r"\bgithub_pat_[A-Za-z0-9_]+\b"]),
    token(
        "gitlab_token",
        "GITLAB_TOKEN",
        (24, 512),
        &[r"\bgl(?:pat|dt|ptt|rt|soat|ffct|cbt|imt|oas)-[A-Za-z0-9_-]+", r"\bGR1348941[A-Za-z0-9_-]+"],
    ),
    token("slack_token", "SLACK_TOKEN", (15, 512), &[r"\bxox[abposre]-[A-Za-z0-9-]+", r"\bxapp-[0-9]-[A-Za-z0-9-]+"]),
    token(
        "slack_webhook",
        "SLACK_WEBHOOK",
        (40, 512),
        &[r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_-]+"],
    ),
    token("stripe_key", "STRIPE_KEY", (18, 255), &[r"\b(?:sk|rk)_(?:test|live|prod)_[A-Za-z0-9]+\b"]),
    token("stripe_key", "STRIPE_KEY", (30, 255), &[r"\bwhsec_[A-Za-z0-9]+"]),
    token("google_api_key", "GOOGLE_API_KEY", (39, 39), &[r"\bAIza[A-Za-z0-9_-]+"]),
    token("google_oauth_token", "GOOGLE_OAUTH_TOKEN", (25, 2048), &[r"\bya29\.[A-Za-z0-9_-]+"]),
    token(
        "anthropic_api_key",
        "ANTHROPIC_API_KEY",
        (90, 256),
        &[r"\bsk-ant-(?:api|admin|oat|sid)[0-9]{2}-[A-Za-z0-9_-]+"],
    ),
    token(
        "openai_api_key",
        "OPENAI_API_KEY",
        (40, 512),
        &[
            r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]+T3BlbkFJ[A-Za-z0-9_-]+",
            r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]+",
        ],
    ),
    token("huggingface_token", "HUGGINGFACE_TOKEN", (37, 37), &[r"\bhf_[A-Za-z]+\b"]),
    Builtin {
        id: "npm_token",
        kind: "NPM_TOKEN",
        check: Check::GithubChecksum,
        len: (40, 40),
        patterns: &[r"\bnpm_[A-Za-z0-9]+\b"],
    },
    token("pypi_token", "PYPI_TOKEN", (70, 512), &[r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]+"]),
    token("sendgrid_key", "SENDGRID_KEY", (69, 69), &[r"\bSG\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"]),
    token("twilio_key", "TWILIO_KEY", (34, 34), &[r"\bSK[0-9a-fA-F]+\b"]),
    token("mailgun_key", "MAILGUN_KEY", (36, 36), &[r"\bkey-[0-9a-f]+\b"]),
    token("shopify_token", "SHOPIFY_TOKEN", (38, 38), &[r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]+\b"]),
    token("digitalocean_token", "DIGITALOCEAN_TOKEN", (71, 71), &[r"\bdo[opr]_v1_[a-f0-9]+\b"]),
    token("databricks_token", "DATABRICKS_TOKEN", (36, 38), &[r"\bdapi[a-h0-9]+(?:-[0-9])?\b"]),
    token("doppler_token", "DOPPLER_TOKEN", (44, 60), &[r"\bdp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]+\b"]),
    token("linear_api_key", "LINEAR_API_KEY", (48, 48), &[r"\blin_api_[A-Za-z0-9]+\b"]),
    token("postman_api_key", "POSTMAN_API_KEY", (64, 64), &[r"\bPMAK-[a-f0-9]+-[a-f0-9]+\b"]),
    token("grafana_token", "GRAFANA_TOKEN", (46, 46), &[r"\bglsa_[A-Za-z0-9]+_[A-Fa-f0-9]+\b"]),
    token("grafana_token", "GRAFANA_TOKEN", (36, 1024), &[r"\bglc_[A-Za-z0-9+/]+={0,2}"]),
    token("vault_token", "VAULT_TOKEN", (28, 512), &[r"\bhv[sbr]\.[A-Za-z0-9_-]+"]),
    token("square_token", "SQUARE_TOKEN", (29, 50), &[r"\bsq0(?:atp|csp)-[A-Za-z0-9_-]+"]),
    token("new_relic_key", "NEW_RELIC_KEY", (32, 32), &[r"\bNR(?:AK|II|AA)-[A-Za-z0-9]+\b"]),
    Builtin {
        id: "bearer_token",
        kind: "BEARER_TOKEN",
        check: Check::Bearer,
        len: ANY,
        patterns: &[r"\b(?i:bearer)[ ]{1,4}[A-Za-z0-9._~+/-]+=*"],
    },
    Builtin {
        id: "basic_auth",
        kind: "BASIC_AUTH",
        check: Check::Basic,
        len: ANY,
        patterns: &[r"\b(?i:basic)[ ]{1,4}[A-Za-z0-9+/]+={0,2}"],
    },
    // `key = value`: pattern built by the engine from the key rules; placeholder here so
    // the rule has a priority slot and an id.
    Builtin { id: "key_value", kind: "SECRET", check: Check::KeyValue, len: ANY, patterns: &[] },
    Builtin {
        id: "us_ssn",
        kind: "SSN",
        check: Check::SsnKeyword,
        len: ANY,
        patterns: &[r"(?i:\bssn|\bsocial security(?: number| no\.?)?|\bss#)[ \t]{0,3}[:#=-]?[ \t]{0,3}[0-9]{9}\b"],
    },
    Builtin {
        id: "phone",
        kind: "PHONE",
        check: Check::PhoneKeyword,
        len: ANY,
        patterns: &[
            r"(?:(?i:\bphone|\btel|\bmobile|\bcell|\bfax|\bsms|\bcall|\bwhatsapp|\bmsisdn)|Phone|Tel|Mobile|Cell|Fax)[A-Za-z_ ]{0,24}[ \t]{0,3}[:=#.]?[ \t]{0,3}\+?[0-9][0-9 .-]{6,}[0-9]\b",
        ],
    },
    Builtin {
        id: "iban",
        kind: "IBAN",
        check: Check::Iban,
        len: ANY,
        patterns: &[r"\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]+|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b"],
    },
    Builtin {
        id: "credit_card",
        kind: "CREDIT_CARD",
        check: Check::Card,
        len: ANY,
        patterns: &[
            r"\b(?:[0-9]{12,}|[0-9]{4}(?:[ -][0-9]{4}){3}[ -][0-9]{1,3}|[0-9]{4}(?:[ -][0-9]{4}){2}[ -][0-9]{1,7}|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})\b",
        ],
    },
    Builtin {
        id: "us_ssn",
        kind: "SSN",
        check: Check::Ssn,
        len: ANY,
        patterns: &[r"\b[0-9]{3}(?:-[0-9]{2}-|[ ][0-9]{2}[ ])[0-9]{4}\b"],
    },
    Builtin {
        id: "mac_address",
        kind: "MAC_ADDRESS",
        check: Check::Mac,
        len: ANY,
        patterns: &[
            r"\b[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}\b",
            r"\b[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}\b",
            r"\b[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\b",
        ],
    },
    Builtin {
        id: "ip_address",
        kind: "IP_ADDRESS",
        check: Check::Ipv6,
        len: ANY,
        patterns: &[
            // Candidates only, the parser decides. The compressed form is found from its
            // `::` and extended backwards by the check: a pattern starting with a hex run
            // would stay alive across every hex-looking word.
            r"::[0-9A-Fa-f:.]*",
            r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}",
            r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){6}:[0-9]{1,3}(?:\.[0-9]{1,3}){3}",
        ],
    },
    Builtin {
        id: "ip_address",
        kind: "IP_ADDRESS",
        check: Check::Ipv4,
        len: ANY,
        patterns: &[r"\b[0-9]{1,3}(?:\.[0-9]{1,3}){3}\b"],
    },
    Builtin {
        id: "phone",
        kind: "PHONE",
        check: Check::Phone,
        len: ANY,
        patterns: &[
            // International: +CC then groups, optional (0), optional extension.
            r"\+[1-9][0-9]*(?:[ .-]?\(0\))?(?:[ .-]?\(?[0-9]+\)?)+(?:[ ]?(?:x|ext\.?|#)[ ]?[0-9]+)?\b",
            // National with a parenthesised area code: (555)123-4567, 1 (786) 834-4978.
            r"(?:\b[0-9]{1,3}[ .-]?)?\([0-9]+\)[ .-]?(?:[0-9]+[ .-])*[0-9]+(?:[ ]?(?:x|ext\.?|#)[ ]?[0-9]+)?\b",
            // National with separators: 555-123-4567, 06 12 34 56 78, 0837 783533.
            r"\b[0-9]+[ .-](?:[0-9]+[ .-])*[0-9]+(?:[ ]?(?:x|ext\.?|#)[ ]?[0-9]+)?\b",
        ],
    },
    // Last: their runs (a scheme, an email's local part) can stay alive across long
    // stretches of text; at the lowest priority they never keep the automaton scanning
    // past a higher-priority candidate (which would make rejections quadratic).
    Builtin {
        id: "url_credentials",
        kind: "URL_CREDENTIALS",
        check: Check::UrlCredentials,
        len: ANY,
        patterns: &[r"://[^\s:/?#@\[\]]*:[^\s/?#]+@"],
    },
    Builtin {
        id: "email",
        kind: "EMAIL",
        check: Check::Email,
        len: ANY,
        patterns: &[r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"],
    },
];

/// Rule ids of every built-in detector (deduplicated), for validating `disabled`.
pub(crate) fn builtin_ids() -> impl Iterator<Item = &'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    BUILTINS.iter().filter_map(move |b| {
        if seen.contains(&b.id) {
            None
        } else {
            seen.push(b.id);
            Some(b.id)
        }
    })
}

fn byte(hay: &[u8], i: usize) -> Option<u8> {
    hay.get(i).copied()
}

fn prev(hay: &[u8], start: usize, back: usize) -> Option<u8> {
    start.checked_sub(back).and_then(|i| byte(hay, i))
}

fn is_word(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_digit(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_digit())
}

/// Whether the digits at `r` continue a longer number or identifier (`1234 5678` in
/// `1234 5678 9012 3456`, `2024-0001` in `ORD-2024-0001`): a word character right next
/// to them, a separator from `seps` then a digit, or `-`, `.`, `/` then a letter.
fn embedded(hay: &[u8], r: &Range<usize>, seps: &[u8]) -> bool {
    let before = prev(hay, r.start, 1);
    let before2 = prev(hay, r.start, 2);
    let after = byte(hay, r.end);
    let sep = |b: Option<u8>| b.is_some_and(|b| seps.contains(&b));
    let joiner = |b: Option<u8>| matches!(b, Some(b'-' | b'.' | b'/'));
    // The number before counts only when it stands alone (`12 ` but not `visa19 `).
    let number_before = sep(before) && is_digit(before2) && {
        let mut i = r.start.saturating_sub(2);
        while i > 0 && is_digit(byte(hay, i - 1)) {
            i -= 1;
        }
        !prev(hay, i, 1).is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
    };
    // The number after counts when it is a group of three digits or more.
    let number_after = sep(after)
        && hay.get(r.end + 1..).is_some_and(|rest| rest.iter().take_while(|b| b.is_ascii_digit()).count() >= 3);
    is_word(before) || is_word(after) || number_before || number_after || (joiner(before) && is_word(before2))
}

/// Confirms a candidate; returns the byte range to redact.
pub(crate) fn check(check: Check, text: &str, m: Range<usize>) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    let s = text.get(m.clone())?;
    match check {
        Check::Marker | Check::KeyValue => None,
        Check::Custom => Some(m),
        Check::Bounded => {
            let next = byte(hay, m.end);
            (!next.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')).then_some(m)
        }
        Check::Pem => {
            let rest = text.get(m.end..)?;
            let end = match rest.find("-----END") {
                Some(i) => {
                    let after_end = m.end + i + "-----END".len();
                    match text.get(after_end..).and_then(|t| t.find("-----")) {
                        Some(j) if j <= 64 => after_end + j + 5,
                        _ => text.len(),
                    }
                }
                None => text.len(),
            };
            Some(m.start..end)
        }
        Check::Jwt => {
            let header = s.split('.').next()?;
            if !validate::jwt_header(header) {
                return None;
            }
            // JWE has five segments: take any further `.segment`s too.
            let mut end = m.end;
            while end < hay.len() && (hay[end].is_ascii_alphanumeric() || matches!(hay[end], b'_' | b'-' | b'.')) {
                end += 1;
            }
            Some(m.start..end)
        }
        Check::Aws => (!s.ends_with("EXAMPLE")).then_some(m),
        Check::GithubChecksum => validate::github_checksum(s).then_some(m),
        Check::UrlCredentials => {
            // The match starts at `://` (a scheme run would stay alive across every
            // word); a scheme of 2 to 20 characters must precede it.
            let mut scheme = m.start;
            while scheme > 0
                && m.start - scheme < 20
                && (hay[scheme - 1].is_ascii_alphanumeric() || matches!(hay[scheme - 1], b'+' | b'.' | b'-'))
            {
                scheme -= 1;
            }
            // A scheme starts with a letter (RFC 3986): `--END://` has the scheme `END`,
            // whatever precedes it (and a second pass, which may see a marker there,
            // judges the same scheme).
            while scheme < m.start && !hay[scheme].is_ascii_alphabetic() {
                scheme += 1;
            }
            if m.start - scheme < 2 {
                return None;
            }
            let scheme_end = s.find("://")? + 3;
            let colon = scheme_end + s.get(scheme_end..)?.find(':')?;
            let at = s.rfind('@')?;
            let password = s.get(colon + 1..at)?;
            if password.is_empty() || password.starts_with("[REDACTED:") || password.bytes().all(|b| b == b'*') {
                return None;
            }
            Some(m.start + colon + 1..m.start + at)
        }
        Check::Bearer => {
            let token_at = s.find(' ')?;
            let token = s.get(token_at..)?.trim_start();
            let start = m.end - token.len();
            if token.len() < 8 {
                return None;
            }
            let has_digit = token.bytes().any(|b| b.is_ascii_digit());
            let has_special = token.bytes().any(|b| matches!(b, b'.' | b'_' | b'~' | b'+' | b'/' | b'-' | b'='));
            let upper = token.bytes().filter(u8::is_ascii_uppercase).count();
            let lower = token.bytes().filter(u8::is_ascii_lowercase).count();
            (has_digit || has_special || (upper >= 2 && lower >= 2)).then_some(start..m.end)
        }
        Check::Basic => {
            let token_at = s.find(' ')?;
            let token = s.get(token_at..)?.trim_start();
            validate::basic_credentials(token).then_some(m.end - token.len()..m.end)
        }
        Check::SsnKeyword => {
            let digits = s.get(s.len().checked_sub(9)?..)?.as_bytes();
            let n = |r: Range<usize>| digits.get(r).map(parse_u32).unwrap_or(0);
            (validate::ssn(n(0..3), n(3..5), n(5..9)) && !is_digit(prev(hay, m.end, 10))).then_some(m.end - 9..m.end)
        }
        Check::PhoneKeyword => {
            // The number is the tail of digits and separators; it must not start with
            // a separator or run on into more digits.
            let tail =
                s.bytes().rev().take_while(|b| b.is_ascii_digit() || matches!(b, b' ' | b'.' | b'-' | b'+')).count();
            let mut start = m.end - tail;
            while start < m.end && matches!(hay.get(start), Some(b' ' | b'.' | b'-')) {
                start += 1;
            }
            let digits = hay.get(start..m.end)?.iter().filter(|b| b.is_ascii_digit()).count();
            let after_sep_digit =
                matches!(byte(hay, m.end), Some(b' ' | b'.' | b'-')) && is_digit(byte(hay, m.end + 1));
            ((8..=15).contains(&digits) && !is_word(prev(hay, start, 1)) && !after_sep_digit).then_some(start..m.end)
        }
        Check::Email => email(text, m),
        Check::Iban => {
            let mut buf = [0u8; 34];
            let mut n = 0;
            for &b in s.as_bytes() {
                if b != b' ' {
                    *buf.get_mut(n)? = b;
                    n += 1;
                }
            }
            validate::iban(buf.get(..n)?).then_some(m)
        }
        Check::Card => card(hay, m),
        Check::Ssn => {
            let b = s.as_bytes();
            if b.len() != 11 || b[3] != b[6] || embedded(hay, &m, b" -.") {
                return None;
            }
            let area = parse_u32(b.get(0..3)?);
            let group = parse_u32(b.get(4..6)?);
            let serial = parse_u32(b.get(7..11)?);
            // Two numbers famously printed in advertising are not anyone's SSN.
            let famous = (area, group, serial) == (78, 5, 1120) || (area, group, serial) == (219, 9, 9999);
            (validate::ssn(area, group, serial) && !famous).then_some(m)
        }
        Check::Mac => {
            let b = s.as_bytes();
            let mut hex = b.iter().copied().filter(u8::is_ascii_hexdigit);
            let all_same = hex.clone().all(|h| h == b'0') || hex.all(|h| h == b'f' || h == b'F');
            let sep = if b.get(2) == Some(&b':') { b':' } else { b.get(2).copied().unwrap_or(b'.') };
            let before = prev(hay, m.start, 1);
            let after = byte(hay, m.end);
            let chained = before == Some(sep) || after == Some(sep) || before == Some(b'.') || after == Some(b'.');
            (!all_same && !chained).then_some(m)
        }
        Check::Ipv6 => ipv6(text, m),
        Check::Ipv4 => ipv4(text, m),
        Check::Phone => phone(text, m),
    }
}

/// A bare phone number as stored in a phone field: optional `+`, 7 to 15 digits, and
/// only spaces, dots, dashes and parentheses between them.
pub(crate) fn is_bare_phone(s: &str) -> bool {
    let t = s.trim();
    let body = t.strip_prefix('+').unwrap_or(t);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    (7..=15).contains(&digits)
        && body.bytes().all(|b| b.is_ascii_digit() || matches!(b, b' ' | b'.' | b'-' | b'(' | b')'))
}

fn parse_u32(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |acc, d| acc.saturating_mul(10).saturating_add(u32::from(d.wrapping_sub(b'0') % 10)))
}

/// File extensions that follow an `@` in asset names (`icon@2x.png`) and package
/// specs, never in email domains.
const NOT_TLDS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "css", "js", "mjs", "json", "yaml", "yml", "xml", "html", "htm",
    "txt", "log", "map", "lock", "toml", "java", "class", "jar", "kt", "swift", "tsx", "jsx", "vue",
];

/// The match is `@domain`; the local part is read backwards from the `@` (at most 64
/// characters, RFC 5321), so the automaton never carries a local-part run along every
/// word of the text.
fn email(text: &str, m: Range<usize>) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    let s = text.get(m.clone())?;
    let is_local = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let mut start = m.start;
    while start > 0 && m.start - start < 64 && is_local(hay[start - 1]) {
        start -= 1;
    }
    while start < m.start && matches!(hay[start], b'.' | b'-' | b'+') {
        start += 1;
    }
    if start == m.start {
        return None;
    }
    let tld = s.rsplit('.').next()?;
    if tld.len() > 24 || NOT_TLDS.iter().any(|t| t.eq_ignore_ascii_case(tld)) {
        return None;
    }
    Some(start..m.end)
}

fn card(hay: &[u8], m: Range<usize>) -> Option<Range<usize>> {
    let s = hay.get(m.clone())?;
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut sep: Option<u8> = None;
    for &b in s {
        if b.is_ascii_digit() {
            *digits.get_mut(n)? = b;
            n += 1;
        } else {
            match sep {
                None => sep = Some(b),
                Some(x) if x == b => {}
                Some(_) => return None,
            }
        }
    }
    let digits = digits.get(..n)?;
    if embedded(hay, &m, b" -.") {
        return None;
    }
    (validate::card_network(digits) && validate::luhn(digits)).then_some(m)
}

fn ipv4(text: &str, m: Range<usize>) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    let s = text.get(m.clone())?;
    let mut octets = [0u32; 4];
    for (i, part) in s.split('.').enumerate() {
        if part.len() > 1 && part.starts_with('0') {
            return None;
        }
        let v: u32 = part.parse().ok()?;
        if v > 255 {
            return None;
        }
        *octets.get_mut(i)? = v;
    }
    // Part of a longer dotted sequence: an OID or a long version string.
    if (prev(hay, m.start, 1) == Some(b'.') && is_digit(prev(hay, m.start, 2)))
        || (byte(hay, m.end) == Some(b'.') && is_digit(byte(hay, m.end + 1)))
    {
        return None;
    }
    // "version 1.0.0.0", "v=2.1.0.3": a four-part version.
    let ctx_start = m.start.saturating_sub(12);
    if let Some(ctx) = hay.get(ctx_start..m.start) {
        let mut t = ctx;
        while let Some((&last, rest)) = t.split_last() {
            if matches!(last, b' ' | b'=' | b':' | b'"' | b'\'') {
                t = rest;
            } else {
                break;
            }
        }
        // The whole word before the address, not just its ending (`server` is no `ver`).
        let ends_with = |w: &[u8]| {
            t.len() >= w.len()
                && t[t.len() - w.len()..].eq_ignore_ascii_case(w)
                && !t.len().checked_sub(w.len() + 1).and_then(|i| t.get(i)).is_some_and(u8::is_ascii_alphabetic)
        };
        if ends_with(b"version") || ends_with(b"ver") || ends_with(b"v") {
            return None;
        }
    }
    let [a, b, c, d] = octets;
    let not_identifying =
        a == 0 || a == 127 || (a == 255 && is_netmask(octets)) || (a, b, c, d) == (255, 255, 255, 255);
    (!not_identifying).then_some(m)
}

fn is_netmask(octets: [u32; 4]) -> bool {
    let v = octets.iter().fold(0u32, |acc, &o| (acc << 8) | o);
    v.leading_ones() + v.trailing_zeros() == 32
}

fn ipv6(text: &str, m: Range<usize>) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    // `::...` candidates: take the groups before the `::` too.
    let mut m = m;
    if hay.get(m.start..m.start + 2) == Some(b"::") {
        while m.start > 0 && m.end - m.start < 45 && (hay[m.start - 1].is_ascii_hexdigit() || hay[m.start - 1] == b':')
        {
            m.start -= 1;
        }
    }
    let before = prev(hay, m.start, 1);
    let after = byte(hay, m.end);
    if before.is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.'))
        || after.is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_'))
    {
        return None;
    }
    let s = text.get(m.clone())?;
    if !s.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let addr: std::net::Ipv6Addr = s.parse().ok()?;
    if addr.is_unspecified() || addr.is_loopback() {
        return None;
    }
    // A zone id (`fe80::1%eth0`) goes with the address.
    let mut end = m.end;
    if after == Some(b'%') {
        end += 1;
        while end < hay.len() && hay[end].is_ascii_alphanumeric() && end - m.end < 17 {
            end += 1;
        }
    }
    Some(m.start..end)
}

fn phone(text: &str, m: Range<usize>) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    let s = text.get(m.clone())?;
    // Split off an extension.
    let lower_x = s.bytes().position(|b| b == b'x' || b == b'#' || b == b'e');
    let main = match lower_x {
        Some(i) => s.get(..i)?,
        None => s,
    };
    let main_b = main.trim_end().as_bytes();
    let digits = main_b.iter().filter(|b| b.is_ascii_digit()).count();
    let international = main_b.first() == Some(&b'+');
    if !(7..=15).contains(&digits) || (international && digits < 8) {
        return None;
    }
    if embedded(hay, &m, b" .-/") || prev(hay, m.start, 1) == Some(b'+') {
        return None;
    }
    // Group lengths and separators.
    let mut groups = [0u8; 16];
    // The separator that ended each group.
    let mut seps = [0u8; 16];
    let mut ng = 0usize;
    let mut run = 0u8;
    let mut seps_dot_only = true;
    let mut has_dash = false;
    for &b in main_b {
        if b.is_ascii_digit() {
            run = run.saturating_add(1);
        } else {
            if run > 0 {
                *groups.get_mut(ng)? = run;
                *seps.get_mut(ng)? = b;
                ng += 1;
                run = 0;
            }
            if b != b'.' {
                seps_dot_only = false;
            }
            if b == b'-' {
                has_dash = true;
            }
        }
    }
    if run > 0 {
        *groups.get_mut(ng)? = run;
        ng += 1;
    }
    let groups = groups.get(..ng)?;
    let paren = main_b.contains(&b'(');
    if !international {
        // National groups have at most five digits, the last at most eight.
        let (last, rest) = groups.split_last()?;
        if *last > 8 || rest.iter().any(|&g| g > 5) {
            return None;
        }
    }
    if !international && !paren {
        // Dates: 2024-01-15, 15.01.2024 (possibly followed by a time's hour): the first
        // three groups joined by one date separator, with a plausible year.
        let same_date_sep = ng >= 3 && seps[0] == seps[1] && matches!(seps[0], b'-' | b'.' | b'/');
        let year_first = groups.first() == Some(&4) && matches!(main_b.get(..2), Some(b"19" | b"20"));
        let year_third = groups.get(2) == Some(&4)
            && groups.first().is_some_and(|&g| g <= 2)
            && groups.get(1).is_some_and(|&g| g <= 2);
        if same_date_sep && (year_first || year_third) {
            return None;
        }
        // SSN shape.
        if has_dash && groups == [3, 2, 4] {
            return None;
        }
        // Dotted numbers are versions, decimals and addresses unless every group has
        // two to four digits, there are at least three groups and eight digits, and it
        // is not a dotted quad of small groups.
        if seps_dot_only {
            let plausible = ng >= 3
                && digits >= 8
                && groups.iter().all(|&g| (2..=4).contains(&g))
                && !(ng == 4 && groups.iter().all(|&g| g <= 3));
            if !plausible {
                return None;
            }
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_has_a_unique_id_per_shape_and_ascii_patterns() {
        for b in BUILTINS {
            for p in b.patterns {
                assert!(p.is_ascii(), "{}", b.id);
            }
            assert!(b.kind.bytes().all(|c| c.is_ascii_uppercase() || c == b'_'), "{}", b.kind);
        }
        assert!(builtin_ids().count() > 30);
    }

    #[test]
    fn netmasks_are_recognised() {
        assert!(is_netmask([255, 255, 255, 0]));
        assert!(!is_netmask([255, 0, 255, 0]));
    }
}
