//! Turns expression source into tokens, each with its byte span, so the parser can
//! point at the exact spot of a mistake.
//!
//! The whole source is lexed up front: it is at most
//! [`MAX_EXPRESSION_LEN`](crate::limits::action_bounds::MAX_EXPRESSION_LEN) bytes, and
//! a token list makes lookahead (`not in`, method calls) trivial. Keywords are plain
//! names here; the parser gives them meaning, so `order.in` is still a field path.

use super::error::{ParseError, quote};

/// One lexical unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// An identifier or keyword; its text is the token's source span.
    Name,
    /// A decimal integer literal that fits in `u64`.
    Int(u64),
    /// A literal with a fraction or an exponent.
    Float(f64),
    /// A string literal with its escapes resolved.
    Str(String),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    /// `.` or `?.` (every access is null-safe, so both mean the same).
    Dot,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Bang,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Eof,
}

/// A token and where it sits in the source.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub tok: Tok,
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset one past the last byte.
    pub end: usize,
}

impl Token {
    /// How a message names this token: its source text in quotes, or a description.
    pub(crate) fn describe(&self, src: &str) -> String {
        match &self.tok {
            Tok::Eof => "end of input".to_owned(),
            Tok::Str(_) => "a string".to_owned(),
            _ => {
                let text = src.get(self.start..self.end).unwrap_or("?");
                let q = quote(text);
                // Messages quote tokens with double quotes: `expected ")", found "foo"`.
                format!("\"{}\"", q.trim_matches('`'))
            }
        }
    }
}

/// Whether `c` may start a name: letters (any script) and `_`.
fn name_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

/// Whether `c` may continue a name.
fn name_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Lexes `src` into tokens ending with [`Tok::Eof`].
pub(crate) fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let mut lexer = Lexer { src, pos: 0, out: Vec::new() };
    lexer.run()?;
    Ok(lexer.out)
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
    out: Vec<Token>,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.src.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn peek_at(&self, skip_bytes: usize) -> Option<char> {
        self.src.get(self.pos + skip_bytes..).and_then(|s| s.chars().next())
    }

    fn push(&mut self, tok: Tok, start: usize) {
        self.out.push(Token { tok, start, end: self.pos });
    }

    fn after_dot(&self) -> bool {
        matches!(self.out.last(), Some(Token { tok: Tok::Dot, .. }))
    }

    fn run(&mut self) -> Result<(), ParseError> {
        while let Some(c) = self.peek() {
            let start = self.pos;
            if c.is_whitespace() {
                self.pos += c.len_utf8();
                continue;
            }
            if c.is_ascii_digit() {
                self.number()?;
                continue;
            }
            if name_start(c) {
                self.pos += c.len_utf8();
                while let Some(c) = self.peek().filter(|c| name_continue(*c)) {
                    self.pos += c.len_utf8();
                }
                self.push(Tok::Name, start);
                continue;
            }
            if c == '"' || c == '\'' {
                self.string(c)?;
                continue;
            }
            let next = self.peek_at(1);
            let (tok, len) = match (c, next) {
                ('=', Some('=')) => (Tok::EqEq, 2),
                ('!', Some('=')) => (Tok::NotEq, 2),
                ('<', Some('=')) => (Tok::Le, 2),
                ('>', Some('=')) => (Tok::Ge, 2),
                ('&', Some('&')) => (Tok::AndAnd, 2),
                ('|', Some('|')) => (Tok::OrOr, 2),
                ('?', Some('.')) => (Tok::Dot, 2),
                ('<', _) => (Tok::Lt, 1),
                ('>', _) => (Tok::Gt, 1),
                ('!', _) => (Tok::Bang, 1),
                ('(', _) => (Tok::LParen, 1),
                (')', _) => (Tok::RParen, 1),
                ('[', _) => (Tok::LBracket, 1),
                (']', _) => (Tok::RBracket, 1),
                (',', _) => (Tok::Comma, 1),
                ('.', _) => (Tok::Dot, 1),
                ('+', _) => (Tok::Plus, 1),
                ('-', _) => (Tok::Minus, 1),
                ('*', _) => (Tok::Star, 1),
                ('/', _) => (Tok::Slash, 1),
                ('%', _) => (Tok::Percent, 1),
                ('=', _) => return Err(self.unexpected(c, "\"==\" to compare for equality")),
                ('&', _) => return Err(self.unexpected(c, "\"&&\" (logical and)")),
                ('|', _) => return Err(self.unexpected(c, "\"||\" (logical or)")),
                _ => return Err(self.unexpected(c, "an operand or an operator")),
            };
            self.pos += len;
            self.push(tok, start);
        }
        let end = self.src.len();
        self.out.push(Token { tok: Tok::Eof, start: end, end });
        Ok(())
    }

    fn unexpected(&self, c: char, expected: &str) -> ParseError {
        let found = if c.is_control() { format!("character U+{:04X}", c as u32) } else { format!("\"{c}\"") };
        ParseError::expected(self.src, self.pos, expected, found)
    }

    /// Decimal integers (`42`, `1_000`), and floats with a fraction and/or an exponent
    /// (`3.5`, `1e-3`). Right after a `.` only digits are taken, so `pair.0.1` is two
    /// tuple-field accesses rather than `pair` followed by the float `0.1`.
    fn number(&mut self) -> Result<(), ParseError> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let at = |i: usize| bytes.get(i).copied();
        let mut i = self.pos;
        let mut text = String::new();
        let digits = |i: &mut usize, text: &mut String| {
            while let Some(b) = at(*i) {
                if b.is_ascii_digit() {
                    text.push(b as char);
                } else if b != b'_' {
                    break;
                }
                *i += 1;
            }
        };
        digits(&mut i, &mut text);
        let mut is_float = false;
        if !self.after_dot() {
            if at(i) == Some(b'.') && at(i + 1).is_some_and(|b| b.is_ascii_digit()) {
                is_float = true;
                text.push('.');
                i += 1;
                digits(&mut i, &mut text);
            }
            if matches!(at(i), Some(b'e' | b'E')) {
                let sign = matches!(at(i + 1), Some(b'+' | b'-'));
                let first_digit = if sign { i + 2 } else { i + 1 };
                if at(first_digit).is_some_and(|b| b.is_ascii_digit()) {
                    is_float = true;
                    text.push('e');
                    if sign && at(i + 1) == Some(b'-') {
                        text.push('-');
                    }
                    i = first_digit;
                    digits(&mut i, &mut text);
                }
            }
        }
        self.pos = i;
        if let Some(c) = self.peek().filter(|c| name_continue(*c)) {
            let found = if c.is_control() { format!("U+{:04X}", c as u32) } else { format!("\"{c}\"") };
            return Err(ParseError::with_message(
                self.src,
                self.pos,
                "an operator or a separator after a number",
                found.clone(),
                format!("malformed number: expected an operator or a separator after it, found {found}"),
            ));
        }
        let tok = if is_float {
            match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Tok::Float(f),
                _ => {
                    return Err(ParseError::with_message(
                        self.src,
                        start,
                        "a finite number",
                        format!("\"{}\"", self.src.get(start..i).unwrap_or("?")),
                        "number literal is too large",
                    ));
                }
            }
        } else {
            match text.parse::<u64>() {
                Ok(n) => Tok::Int(n),
                Err(_) => {
                    return Err(ParseError::with_message(
                        self.src,
                        start,
                        "an integer of at most 20 digits (up to 18446744073709551615)",
                        quote(self.src.get(start..i).unwrap_or("?")),
                        "integer literal is too large; integers are 64-bit",
                    ));
                }
            }
        };
        self.push(tok, start);
        Ok(())
    }

    /// A string in `"` or `'`, with escapes `\\ \" \' \n \r \t \0 \u{...}`.
    fn string(&mut self, quote_char: char) -> Result<(), ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut value = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(ParseError::with_message(
                    self.src,
                    start,
                    format!("a closing {quote_char}"),
                    "end of input",
                    format!("unterminated string: expected a closing {quote_char} for the string that starts here"),
                ));
            };
            self.pos += c.len_utf8();
            if c == quote_char {
                break;
            }
            if c != '\\' {
                value.push(c);
                continue;
            }
            let escape_at = self.pos - 1;
            let Some(e) = self.peek() else { continue };
            self.pos += e.len_utf8();
            match e {
                '\\' => value.push('\\'),
                '"' => value.push('"'),
                '\'' => value.push('\''),
                'n' => value.push('\n'),
                'r' => value.push('\r'),
                't' => value.push('\t'),
                '0' => value.push('\0'),
                'u' => value.push(self.unicode_escape(escape_at)?),
                other => {
                    return Err(ParseError::with_message(
                        self.src,
                        escape_at,
                        "one of the escapes \\\\ \\\" \\' \\n \\r \\t \\0 \\u{...}",
                        format!("\"\\{other}\""),
                        format!("unknown escape \"\\{other}\" in string; write \\\\ for a backslash"),
                    ));
                }
            }
        }
        self.push(Tok::Str(value), start);
        Ok(())
    }

    fn unicode_escape(&mut self, escape_at: usize) -> Result<char, ParseError> {
        let bad =
            |src: &str| ParseError::expected(src, escape_at, "a unicode escape like \\u{e9}", "a malformed \\u escape");
        if self.peek() != Some('{') {
            return Err(bad(self.src));
        }
        self.pos += 1;
        let digits_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) && self.pos - digits_start < 6 {
            self.pos += 1;
        }
        let digits = self.src.get(digits_start..self.pos).unwrap_or("");
        if digits.is_empty() || self.peek() != Some('}') {
            return Err(bad(self.src));
        }
        self.pos += 1;
        u32::from_str_radix(digits, 16).ok().and_then(char::from_u32).ok_or_else(|| bad(self.src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Tok> {
        lex(src).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn numbers_after_a_dot_are_tuple_indexes_not_fractions() {
        assert_eq!(kinds("p.0.1"), vec![Tok::Name, Tok::Dot, Tok::Int(0), Tok::Dot, Tok::Int(1), Tok::Eof]);
        assert_eq!(kinds("0.5"), vec![Tok::Float(0.5), Tok::Eof]);
        assert_eq!(kinds("1_000 2e3 1.5E-1"), vec![Tok::Int(1000), Tok::Float(2000.0), Tok::Float(0.15), Tok::Eof]);
    }

    #[test]
    fn strings_resolve_escapes_and_keep_multibyte_text() {
        assert_eq!(kinds(r#"'é\n\u{1F600}\"'"#), vec![Tok::Str("é\n😀\"".into()), Tok::Eof]);
    }

    #[test]
    fn a_lone_equals_sign_suggests_the_comparison_operator() {
        let err = lex("a = 1").unwrap_err();
        assert_eq!(err.position, 2);
        assert_eq!(err.message, "expected \"==\" to compare for equality, found \"=\"");
    }

    #[test]
    fn an_unterminated_string_points_at_its_opening_quote() {
        let err = lex("x == \"abc").unwrap_err();
        assert_eq!(err.position, 5);
        assert!(err.message.starts_with("unterminated string"), "{}", err.message);
    }

    #[test]
    fn integers_beyond_64_bits_are_refused() {
        let err = lex("99999999999999999999999").unwrap_err();
        assert_eq!(err.position, 0);
        assert!(err.message.contains("too large"));
        assert_eq!(kinds("18446744073709551615"), vec![Tok::Int(u64::MAX), Tok::Eof]);
    }

    #[test]
    fn a_number_glued_to_letters_is_malformed() {
        let err = lex("12abc").unwrap_err();
        assert_eq!(err.position, 2);
        assert!(err.message.starts_with("malformed number"));
    }
}
