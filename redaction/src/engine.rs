//! The compiled engine: every value detector, the `key = value` scanner and the user's
//! patterns in one multi-pattern automaton, run once over each string.
//!
//! One [`meta::Regex`] holds all patterns in ASCII mode (no Unicode word boundaries or
//! classes, which would cost an order of magnitude in speed for nothing: every shape we
//! look for is ASCII). A search from the current position returns the leftmost
//! candidate of any kind; its [`Check`] confirms it and says which bytes to replace;
//! the search resumes after it. So the input is scanned once for all detectors, and
//! the validators only run on the rare candidates. Existing `[REDACTED:KIND]` markers
//! are pattern 0 and are stepped over, which is what makes redaction idempotent.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;

use regex_automata::meta::{self, Regex};
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind};

use crate::config::{ConfigError, RedactionConfig};
use crate::detectors::{self, BUILTINS, Check, GENERIC_SECRET, MARKER_PATTERN, WEAK_KEY_WORDS};
use crate::keys::{self, BUILTIN_KEY_RULES, KeyRules, RuleIx};
use crate::report::Report;

/// Longest value `validate::looks_generated` accepts.
const MAX_GENERATED_LEN: usize = 512;

/// Prefix of every marker this crate writes (the protocol's, which expressions and
/// readers recognise).
pub(crate) const MARKER_PREFIX: &str = periscope_protocol::value::REDACTION_MARKER_PREFIX;

/// Longest marker kind; longer custom kinds are refused by validation.
pub(crate) const MAX_KIND_LEN: usize = 40;

/// A rule as reported and as written into the text.
#[derive(Debug)]
pub(crate) struct RuleInfo {
    /// Stable id (`email`, `key:password`, `custom:employee_id`).
    pub id: Box<str>,
    /// The full replacement text, `[REDACTED:KIND]`.
    pub marker: Box<str>,
}

#[derive(Debug, Clone, Copy)]
struct Pat {
    check: Check,
    rule: RuleIx,
    /// Allowed match length.
    len: (usize, usize),
}

/// A byte range to replace and the rule that asked for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    start: usize,
    end: usize,
    rule: RuleIx,
}

/// Everything compiled from a config.
#[derive(Debug)]
pub(crate) struct Engine {
    pub rules: Vec<RuleInfo>,
    regex: Option<Regex>,
    pats: Vec<Pat>,
    keys: KeyRules,
    key_exclusions: HashSet<String>,
    value_exclusions: Option<Regex>,
    generic_rule: Option<RuleIx>,
    pub strict: bool,
    pub card_rule: Option<RuleIx>,
    pub phone_rule: Option<RuleIx>,
}

/// Rule index of strict mode's `[REDACTED:STRICT]`; always present.
pub(crate) const STRICT_RULE: RuleIx = 0;

/// The regex syntax all patterns are compiled with: ASCII mode, and matches need not
/// be valid UTF-8 on their own (we widen them to character boundaries ourselves).
pub(crate) fn syntax_config() -> syntax::Config {
    syntax::Config::new().unicode(false).utf8(false)
}

fn meta_config() -> meta::Config {
    meta::Config::new()
        .match_kind(MatchKind::LeftmostFirst)
        .utf8_empty(false)
        .which_captures(regex_automata::nfa::thompson::WhichCaptures::Implicit)
        .nfa_size_limit(Some(32 * 1024 * 1024))
        .hybrid_cache_capacity(8 * 1024 * 1024)
}

/// Compiles one user pattern alone, to report its problem by name.
pub(crate) fn check_user_pattern(pattern: &str) -> Result<(), String> {
    let hir = syntax::parse_with(pattern, &syntax_config()).map_err(|e| e.to_string())?;
    if hir.properties().minimum_len() == Some(0) {
        return Err("it matches the empty string, so it would match everywhere".into());
    }
    meta::Builder::new().configure(meta_config()).syntax(syntax_config()).build(pattern).map_err(|e| e.to_string())?;
    Ok(())
}

/// Marker kind for a custom rule: given, or the name in capitals.
pub(crate) fn kind_for(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .take(MAX_KIND_LEN)
        .collect()
}

fn escape_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for b in word.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

impl Engine {
    /// Compiles a (validated) config.
    pub(crate) fn build(config: &RedactionConfig) -> Result<Engine, ConfigError> {
        let disabled: HashSet<&str> = config.builtins.disabled.iter().map(String::as_str).collect();
        let mut rules: Vec<RuleInfo> = Vec::new();
        let add_rule = |rules: &mut Vec<RuleInfo>, id: &str, kind: &str| -> RuleIx {
            if let Some(i) = rules.iter().position(|r| &*r.id == id) {
                return i as RuleIx;
            }
            rules.push(RuleInfo { id: id.into(), marker: format!("{MARKER_PREFIX}{kind}]").into() });
            (rules.len() - 1) as RuleIx
        };
        add_rule(&mut rules, "strict", "STRICT");

        // Key-name rules first: the text scanner's `key = value` pattern is built from them.
        let mut keys = KeyRules::default();
        if config.builtins.key_names {
            for (id, kind, names) in BUILTIN_KEY_RULES {
                if disabled.contains(id) {
                    continue;
                }
                let rule = add_rule(&mut rules, id, kind);
                for name in *names {
                    keys.add(name, rule);
                }
            }
            for (word, id) in keys::glued_suffixes() {
                if let Some(i) = rules.iter().position(|r| &*r.id == *id) {
                    keys.add_suffix(word, i as RuleIx);
                }
            }
        }
        for name in &config.key_names {
            let normalized = keys::normalize_name(name);
            let rule = add_rule(&mut rules, &format!("key:{normalized}"), &kind_for(&normalized));
            keys.add(name, rule);
        }

        let generic_rule = (config.builtins.detectors && !disabled.contains(GENERIC_SECRET))
            .then(|| add_rule(&mut rules, GENERIC_SECRET, "SECRET"));

        let mut patterns: Vec<String> = vec![MARKER_PATTERN.to_owned()];
        let mut pats = vec![Pat { check: Check::Marker, rule: STRICT_RULE, len: detectors::ANY }];
        for p in &config.patterns {
            let kind = p.kind.clone().unwrap_or_else(|| kind_for(&p.name));
            let rule = add_rule(&mut rules, &format!("custom:{}", p.name), &kind);
            patterns.push(p.regex.clone());
            pats.push(Pat { check: Check::Custom, rule, len: detectors::ANY });
        }
        // A phone field's value is a phone number in text too (`phone = '4155550123'`),
        // whatever shape holds it: the `key = value` scanner looks for phone names.
        let phone_names = config.builtins.detectors && !disabled.contains("phone");
        let key_value_on = (!keys.is_empty() || phone_names) && !disabled.contains("key_value");
        let mut key_value_added = false;
        let add_key_value = |patterns: &mut Vec<String>, pats: &mut Vec<Pat>| {
            let mut words: Vec<String> = keys.words().iter().map(|w| escape_word(w)).collect();
            if generic_rule.is_some() {
                words.extend(WEAK_KEY_WORDS.iter().map(|w| escape_word(w)));
            }
            if phone_names {
                words.extend(keys::PHONE_WORDS.iter().map(|w| escape_word(w)));
            }
            words.sort();
            words.dedup();
            // Longest first so the alternation prefers `passwords` to `password`.
            words.sort_by_key(|w| std::cmp::Reverse(w.len()));
            // The key, its closing quote or bracket (also escaped, for JSON inside a JSON
            // string: `\"password\":`), the separator (`=`, `:`, `=>`, `:=`, or the `>` of
            // an XML element), spaces.
            patterns.push(format!(
                r#"(?i:{})[A-Za-z0-9_.$-]*(?:\\?["'`]|\]){{0,2}}[ \t]{{0,3}}(?:=>|:=|[:=>])[ \t]{{0,3}}"#,
                words.join("|")
            ));
            pats.push(Pat { check: Check::KeyValue, rule: STRICT_RULE, len: detectors::ANY });
        };
        let mut card_rule = None;
        let mut phone_rule = None;
        if config.builtins.detectors {
            for b in BUILTINS {
                if b.check == Check::KeyValue {
                    if key_value_on {
                        add_key_value(&mut patterns, &mut pats);
                        key_value_added = true;
                    }
                    continue;
                }
                if disabled.contains(b.id) {
                    continue;
                }
                let rule = add_rule(&mut rules, b.id, b.kind);
                match b.check {
                    Check::Card => card_rule = Some(rule),
                    Check::Phone => phone_rule = Some(rule),
                    _ => {}
                }
                for p in b.patterns {
                    patterns.push((*p).to_owned());
                    pats.push(Pat { check: b.check, rule, len: b.len });
                }
            }
        }
        if key_value_on && !key_value_added {
            add_key_value(&mut patterns, &mut pats);
        }

        let regex = if patterns.len() > 1 {
            Some(
                meta::Builder::new()
                    .configure(meta_config())
                    .syntax(syntax_config())
                    .build_many(&patterns)
                    .map_err(|e| ConfigError::TooLarge { message: e.to_string() })?,
            )
        } else {
            None
        };

        let value_exclusions = if config.exclusions.values.is_empty() {
            None
        } else {
            let anchored: Vec<String> = config.exclusions.values.iter().map(|v| format!("(?:{v})$")).collect();
            Some(
                meta::Builder::new()
                    .configure(meta_config())
                    .syntax(syntax_config())
                    .build_many(&anchored)
                    .map_err(|e| ConfigError::TooLarge { message: e.to_string() })?,
            )
        };

        Ok(Engine {
            rules,
            regex,
            pats,
            keys,
            key_exclusions: config.exclusions.key_names.iter().map(|n| keys::normalize_name(n)).collect(),
            value_exclusions,
            generic_rule,
            strict: config.strict,
            card_rule,
            phone_rule,
        })
    }

    /// What a name says about its value: its key-name rule (after exclusions) and
    /// whether it is a phone field.
    pub(crate) fn describe_name(&self, name: &str) -> keys::NameInfo {
        let mut info = self.keys.describe(name);
        if info.rule.is_some()
            && !self.key_exclusions.is_empty()
            && self.key_exclusions.contains(&keys::normalize_name(name))
        {
            info.rule = None;
        }
        info
    }

    /// The marker text of a rule.
    pub(crate) fn marker(&self, rule: RuleIx) -> &str {
        self.rules.get(rule as usize).map_or("[REDACTED:SECRET]", |r| &r.marker)
    }

    /// The id of a rule.
    pub(crate) fn rule_id(&self, rule: RuleIx) -> &str {
        self.rules.get(rule as usize).map_or("unknown", |r| &r.id)
    }

    /// Whether a value the user excluded matches `text` exactly.
    fn excluded_value(&self, text: &str) -> bool {
        match &self.value_exclusions {
            None => false,
            Some(re) => re.is_match(Input::new(text).anchored(Anchored::Yes)),
        }
    }

    /// Finds every region to redact in `text`, in one pass.
    pub(crate) fn scan(&self, text: &str, out: &mut Vec<Region>) {
        let Some(re) = &self.regex else {
            return;
        };
        let mut at = 0usize;
        while at < text.len() {
            let Some(m) = re.search(&Input::new(text).span(at..text.len())) else {
                break;
            };
            let range = char_aligned(text, m.range());
            let Some(&pat) = self.pats.get(m.pattern().as_usize()) else {
                break;
            };
            let fits = (pat.len.0..=pat.len.1).contains(&range.len());
            let verdict = match pat.check {
                Check::Marker => {
                    at = range.end.max(at + 1);
                    continue;
                }
                _ if !fits => None,
                // A key never reaches back into a region already found: that region
                // becomes a marker, and a second pass reads the key as starting after it.
                Check::KeyValue => {
                    let floor = out.last().map_or(0, |r| r.end).min(range.start);
                    self.key_value(text, range.clone(), floor)
                }
                check => detectors::check(check, text, range.clone()).map(|r| (r, pat.rule)),
            };
            let accepted = verdict
                .map(|(r, rule)| (char_aligned(text, r), rule))
                .and_then(|(r, rule)| stop_at_marker(text, r).map(|r| (r, rule)))
                .filter(|(r, _)| !r.is_empty() && !text.get(r.clone()).is_some_and(|v| self.excluded_value(v)));
            let next = match accepted {
                Some((r, rule)) => {
                    let next = range.end.max(r.end);
                    out.push(Region { start: r.start, end: r.end, rule });
                    next
                }
                // A rejected `key =`, email or IPv6 candidate holds no other finding;
                // resuming after it keeps long runs from being rescanned.
                // So does a rejected phone candidate: any number starting inside it
                // would continue the digits before it, which the phone check refuses.
                None if matches!(pat.check, Check::KeyValue | Check::Email | Check::Ipv6 | Check::Phone) => range.end,
                None => range.start + 1,
            };
            at = ceil_char_boundary(text, next.max(at + 1));
        }
    }

    /// Replaces the regions found by [`Engine::scan`] with their markers and records
    /// every rule that fired under `path`.
    pub(crate) fn apply<'a>(
        &self,
        text: &'a str,
        regions: &mut [Region],
        path: &str,
        report: &mut Report,
    ) -> Cow<'a, str> {
        if regions.is_empty() {
            return Cow::Borrowed(text);
        }
        regions.sort_by_key(|r| r.start);
        let mut out = String::with_capacity(text.len() + 16);
        let mut last = 0usize;
        let mut i = 0usize;
        while let Some(first) = regions.get(i).copied() {
            let mut end = first.end;
            report.record(path, self.rule_id(first.rule));
            let mut j = i + 1;
            while let Some(next) = regions.get(j) {
                if next.start >= end {
                    break;
                }
                end = end.max(next.end);
                report.record(path, self.rule_id(next.rule));
                j += 1;
            }
            let start = first.start.max(last);
            out.push_str(text.get(last..start).unwrap_or(""));
            out.push_str(self.marker(first.rule));
            last = end.max(start);
            i = j;
        }
        out.push_str(text.get(last..).unwrap_or(""));
        Cow::Owned(out)
    }

    /// `key = value` in text: the whole key around the keyword decides, through the same
    /// name rules as structured fields: a sensitive name hides its value whatever it is,
    /// a phone field's name hides a bare phone number, a weakly secret-ish name hides a
    /// generated-looking value. The value is read in every common shape (see
    /// [`value_range`]), and in an XML element (`<password>...</password>`).
    fn key_value(&self, text: &str, m: Range<usize>, floor: usize) -> Option<(Range<usize>, RuleIx)> {
        let hay = text.as_bytes();
        let mut ks = m.start;
        while ks > floor && is_key_byte(hay[ks - 1]) && m.start - ks < 64 {
            ks -= 1;
        }
        let mut ke = m.start;
        while ke < hay.len() && is_key_byte(hay[ke]) {
            ke += 1;
        }
        let key = text.get(ks..ke)?;
        let info = self.keys.describe(key);
        let (rule, kind) = match info.rule {
            Some(rule) => {
                if !self.key_exclusions.is_empty() && self.key_exclusions.contains(&keys::normalize_name(key)) {
                    return None;
                }
                (rule, ValueKind::Any)
            }
            // Exclusions exempt names from name rules; a phone field stays one, as in
            // structured values.
            None if info.phone && self.phone_rule.is_some() => (self.phone_rule?, ValueKind::Phone),
            None => {
                let generic = self.generic_rule?;
                let last = keys::segments(key).filter(|s| !s.bytes().all(|b| b.is_ascii_digit())).last()?;
                if !WEAK_KEY_WORDS.iter().any(|w| last.eq_ignore_ascii_case(w)) {
                    return None;
                }
                (generic, ValueKind::Generated)
            }
        };
        // `auth::session` is a path and `token == x` a comparison, not assignments.
        let sep_at = hay.get(..m.end)?.iter().rposition(|&b| b != b' ' && b != b'\t')?;
        if matches!((hay.get(sep_at), hay.get(sep_at + 1)), (Some(b':'), Some(b':')) | (Some(b'='), Some(b'=')))
            || (hay.get(sep_at) == Some(&b':') && sep_at > 0 && hay.get(sep_at - 1) == Some(&b':'))
        {
            return None;
        }
        let value = if hay.get(sep_at) == Some(&b'>') && sep_at > 0 && hay.get(sep_at - 1) != Some(&b'=') {
            // `<password>value</password>`: an element, not `a > b` or `Vec<Token>`.
            if ks == 0 || hay.get(ks - 1) != Some(&b'<') {
                return None;
            }
            xml_value(text, sep_at + 1, key)?
        } else {
            let to_eol =
                keys::segments(key).filter(|s| !s.bytes().all(|b| b.is_ascii_digit())).last().is_some_and(|last| {
                    ["authorization", "cookie", "cookies"].iter().any(|w| last.eq_ignore_ascii_case(w))
                });
            // A weak name's value must look generated, and a phone number is short, which
            // caps their length: stop looking there, so a run of rejected `key=`
            // candidates cannot rescan the whole text.
            let max_len = match kind {
                ValueKind::Any => usize::MAX,
                ValueKind::Generated => MAX_GENERATED_LEN + 1,
                ValueKind::Phone => MAX_PHONE_LEN + 1,
            };
            match kind {
                // An unquoted number runs on across its separators: `+49(0)2626 034982`.
                ValueKind::Phone if hay.get(m.end).is_some_and(|&b| b.is_ascii_digit() || b == b'+' || b == b'(') => {
                    phone_run(hay, m.end)
                }
                _ => value_range(text, m.end, to_eol, max_len)?,
            }
        };
        let v = text.get(value.clone())?;
        let accepted = match kind {
            ValueKind::Any => !is_placeholder(v),
            ValueKind::Generated => {
                value.len() <= MAX_GENERATED_LEN && !is_placeholder(v) && crate::validate::looks_generated(v)
            }
            ValueKind::Phone => value.len() <= MAX_PHONE_LEN + 10 && detectors::is_bare_phone(without_extension(v)),
        };
        accepted.then_some((value, rule))
    }
}

/// What a name says its value must look like to be hidden.
#[derive(Debug, Clone, Copy)]
enum ValueKind {
    /// Anything but a placeholder: the name says it is a secret.
    Any,
    /// Generated-looking (long, mixed, high entropy): a weakly secret-ish name.
    Generated,
    /// A bare phone number: a phone field's name.
    Phone,
}

/// Longest phone number value read after a phone field's name.
const MAX_PHONE_LEN: usize = 32;

/// Digits and phone separators from `start`, ending on a digit (ASCII, so the range
/// lies on character boundaries).
fn phone_run(hay: &[u8], start: usize) -> Range<usize> {
    let limit = hay.len().min(start + MAX_PHONE_LEN + 1);
    let mut end = start;
    let mut last_digit = start;
    while end < limit && (hay[end].is_ascii_digit() || matches!(hay[end], b'+' | b' ' | b'.' | b'(' | b')' | b'-')) {
        if hay[end].is_ascii_digit() {
            last_digit = end + 1;
        }
        end += 1;
    }
    // An extension goes with the number: `x82406`, ` ext. 12`, `#7`.
    let rest = hay.get(last_digit..).unwrap_or_default();
    let mut p = usize::from(rest.first() == Some(&b' '));
    let word = [&b"ext."[..], b"ext", b"x", b"#"].into_iter().find(|w| rest.get(p..p + w.len()) == Some(*w));
    if let Some(w) = word {
        p += w.len();
        p += usize::from(rest.get(p) == Some(&b' '));
        let digits = rest.get(p..).unwrap_or_default().iter().take_while(|b| b.is_ascii_digit()).count();
        if (1..=6).contains(&digits) {
            return start..last_digit + p + digits;
        }
    }
    start..last_digit
}

/// A phone number without its extension (`x82406`, ` ext. 12`, `#7`).
fn without_extension(v: &str) -> &str {
    let digits = v.bytes().rev().take_while(u8::is_ascii_digit).count();
    let head = v[..v.len() - digits].trim_end_matches(' ');
    for w in ["ext.", "ext", "x", "#"] {
        if digits > 0 && head.len() < v.len() && head.ends_with(w) {
            return head[..head.len() - w.len()].trim_end_matches(' ');
        }
    }
    v
}

/// The content of an XML element whose opening tag ends at `start`: up to its closing
/// tag `</key>` (within 4 KiB), trimmed.
fn xml_value(text: &str, start: usize, key: &str) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    let limit = hay.len().min(start.saturating_add(4096));
    let mut p = start;
    while p < limit {
        let lt = p + hay.get(p..limit)?.iter().position(|&b| b == b'<')?;
        let name_at = lt + 2;
        if hay.get(lt + 1) == Some(&b'/')
            && hay.get(name_at..name_at + key.len()).is_some_and(|n| n.eq_ignore_ascii_case(key.as_bytes()))
            && hay.get(name_at + key.len()) == Some(&b'>')
        {
            let mut s = start;
            let mut e = lt;
            while s < e && hay[s].is_ascii_whitespace() {
                s += 1;
            }
            while e > s && hay[e - 1].is_ascii_whitespace() {
                e -= 1;
            }
            return Some(char_aligned(text, s..e));
        }
        p = lt + 1;
    }
    None
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$')
}

/// Values that hide nothing: empty, null-likes, booleans, masks, existing markers.
fn is_placeholder(v: &str) -> bool {
    let t = v.trim();
    t.is_empty()
        || t.starts_with(MARKER_PREFIX)
        || ["null", "none", "nil", "undefined", "true", "false"].iter().any(|p| t.eq_ignore_ascii_case(p))
        || t.bytes().all(|b| b == b'*')
}

/// Where the value after a `key =` starts and ends: inside quotes (also escaped quotes,
/// `\"...\"`, of JSON inside a JSON string), a balanced `{...}` or `[...]`, to the end
/// of the line for header-like keys, else up to a delimiter. Wrappers such as
/// `Some("...")`, `Secret('...')` or `Some(4155550123)`, and Python's string prefixes
/// (`b'...'`, `rb"..."`) are looked through.
fn value_range(text: &str, mut v: usize, to_eol: bool, max_len: usize) -> Option<Range<usize>> {
    let hay = text.as_bytes();
    for _ in 0..2 {
        let mut p = v;
        while p < hay.len() && (hay[p].is_ascii_alphanumeric() || matches!(hay[p], b'_' | b':')) && p - v < 32 {
            p += 1;
        }
        if p > v && hay.get(p) == Some(&b'(') && (opens_quoted(hay, p + 1) || wraps_number(hay, v, p)) {
            v = p + 1;
        } else {
            break;
        }
    }
    // Python's `b'...'`, `u"..."`, `rb'...'`.
    let prefix = hay.get(v..).map_or(0, |rest| {
        rest.iter().take(2).take_while(|b| matches!(b, b'b' | b'B' | b'r' | b'R' | b'u' | b'U' | b'f' | b'F')).count()
    });
    if prefix > 0 && matches!(hay.get(v + prefix), Some(b'"' | b'\'')) {
        v += prefix;
    }
    let first = *hay.get(v)?;
    if first == b'\\'
        && let Some(&quote) = hay.get(v + 1).filter(|q| matches!(q, b'"' | b'\''))
    {
        // `\"value\"`: up to the next escaped quote of the same kind.
        let mut p = v + 2;
        while p + 1 < hay.len() && !(hay[p] == b'\\' && hay[p + 1] == quote) {
            p += if hay[p] == b'\\' { 2 } else { 1 };
        }
        return Some(char_aligned(text, v + 2..p.min(hay.len())));
    }
    let range = match first {
        b'"' | b'\'' | b'`' => {
            let mut p = v + 1;
            while p < hay.len() && hay[p] != first {
                p += if hay[p] == b'\\' { 2 } else { 1 };
            }
            v + 1..p.min(hay.len())
        }
        b'{' | b'[' => {
            let close = if first == b'{' { b'}' } else { b']' };
            let mut depth = 0usize;
            let mut p = v;
            let mut quote: Option<u8> = None;
            while p < hay.len() {
                let b = hay[p];
                match quote {
                    Some(q) => {
                        if b == b'\\' {
                            p += 1;
                        } else if b == q {
                            quote = None;
                        }
                    }
                    None => {
                        if b == b'"' || b == b'\'' {
                            quote = Some(b);
                        } else if b == first {
                            depth += 1;
                        } else if b == close {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                break;
                            }
                        }
                    }
                }
                p += 1;
            }
            v..(p + 1).min(hay.len())
        }
        _ if to_eol => {
            let end = hay[v..].iter().position(|&b| b == b'\n' || b == b'\r').map_or(hay.len(), |i| v + i);
            let mut e = end;
            while e > v && hay[e - 1].is_ascii_whitespace() {
                e -= 1;
            }
            v..e
        }
        _ => {
            let limit = hay.len().min(v.saturating_add(max_len));
            let mut end = v;
            while end < limit && !ends_unquoted_value(hay, end) {
                end += 1;
            }
            v..end
        }
    };
    Some(char_aligned(text, range))
}

/// Whether a quoted, braced or bracketed value starts at `i` (inside a wrapper's `(`).
fn opens_quoted(hay: &[u8], i: usize) -> bool {
    matches!(hay.get(i), Some(b'"' | b'\'' | b'{' | b'['))
}

/// Whether `hay[name..open]` followed by `(` wraps a bare number: `Some(4155550123)`.
/// The wrapper must read like a type (a capital, then letters) and the parentheses hold
/// only digits and phone separators, so a password such as `Ab1(+x(` is not taken for
/// one and cut in two.
fn wraps_number(hay: &[u8], name: usize, open: usize) -> bool {
    let word = hay.get(name..open).unwrap_or_default();
    let inside = hay.get(open + 1..).unwrap_or_default();
    let body = inside.iter().take_while(|b| b.is_ascii_digit() || matches!(b, b'+' | b' ' | b'.' | b'-')).count();
    word.first().is_some_and(u8::is_ascii_uppercase)
        && word.iter().all(u8::is_ascii_alphabetic)
        && body > 0
        && inside.get(body) == Some(&b')')
}

/// Whether the byte at `i` ends an unquoted value. Passwords contain `&`, `)` and `]`
/// often enough that those only end a value when what follows looks like structure: the
/// next `name=` of a query string, or the end of the text, a space or another closer.
fn ends_unquoted_value(hay: &[u8], i: usize) -> bool {
    match hay[i] {
        b if b.is_ascii_whitespace() => true,
        b'"' | b'\'' | b',' | b';' | b'<' => true,
        b'&' => {
            let rest = &hay[i + 1..];
            let name = rest.iter().take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')).count();
            name > 0 && rest.get(name) == Some(&b'=')
        }
        b')' | b'}' | b']' | b'>' => match hay.get(i + 1) {
            None => true,
            Some(n) => {
                n.is_ascii_whitespace() || matches!(n, b',' | b';' | b')' | b'}' | b']' | b'>' | b'&' | b'"' | b'\'')
            }
        },
        _ => false,
    }
}

/// Drops a region that overlaps an existing marker: a marker only exists in text this
/// crate already redacted, where its neighbourhood was judged in the first pass, so
/// leaving it alone is what keeps a second pass from changing anything.
fn stop_at_marker(text: &str, r: Range<usize>) -> Option<Range<usize>> {
    text.get(r.clone())?;
    // Right after or right before a marker: what sits next to a marker was judged next
    // to the original value, and must not be judged again now that its neighbour reads
    // differently. (A candidate cannot start inside a marker: markers are pattern 0.)
    let mut from = r.start.saturating_sub(MARKER_PREFIX.len() + MAX_KIND_LEN + 1);
    while from > 0 && !text.is_char_boundary(from) {
        from -= 1;
    }
    // Validators look up to two bytes around a candidate, so "next to" means within
    // three bytes.
    let back = text.get(from..r.start).unwrap_or("");
    if let Some(i) = back.rfind(MARKER_PREFIX)
        && let Some(close) = back.get(i..).and_then(|t| t.find(']'))
        && back.get(i..i + close + 1).is_some_and(crate::redactor::is_marker)
        && back.len() - (i + close + 1) <= NEIGHBOURHOOD
    {
        return None;
    }
    // A marker that starts anywhere from the candidate's first byte to three bytes past
    // its end: inside it (whole, or only its first bytes: a user pattern such as
    // `[^a-z]{3}` can run from the text before a marker into it), or just after it.
    // Only a whole marker counts, as behind: text that merely starts like one is
    // redacted like any other text, and must not shelter its neighbours in the first
    // pass only.
    // Bounded: markers starting before `r.end + NEIGHBOURHOOD`, each at most
    // `MAX_MARKER_LEN` long, so a candidate costs its own length plus a constant.
    let bytes = text.as_bytes();
    let starts = bytes.get(r.start..(r.end + NEIGHBOURHOOD + MARKER_PREFIX.len()).min(bytes.len())).unwrap_or_default();
    for (i, w) in starts.windows(MARKER_PREFIX.len()).enumerate() {
        if w != MARKER_PREFIX.as_bytes() {
            continue;
        }
        let p = r.start + i;
        let tail = bytes.get(p..(p + crate::MAX_MARKER_LEN).min(bytes.len())).unwrap_or_default();
        if let Some(close) = tail.iter().position(|&b| b == b']')
            && text.get(p..p + close + 1).is_some_and(crate::redactor::is_marker)
        {
            return None;
        }
    }
    Some(r)
}

/// Bytes around a candidate in which a marker makes it ineligible (see `stop_at_marker`).
const NEIGHBOURHOOD: usize = 3;

/// Widens a byte range outwards to UTF-8 character boundaries (a no-op for the ASCII
/// matches of built-in patterns; user patterns may stop inside a character).
pub(crate) fn char_aligned(text: &str, r: Range<usize>) -> Range<usize> {
    let mut start = r.start.min(text.len());
    while start > 0 && !text.is_char_boundary(start) {
        start -= 1;
    }
    let end = ceil_char_boundary(text, r.end.max(start));
    start..end
}

fn ceil_char_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}
