//! The two ways an expression fails: it does not parse ([`ParseError`], found by the
//! broker when the action is placed, before any agent sees it), or it cannot be
//! evaluated against the values at one hit ([`EvalError`], found by the agent and
//! reported once per action as an action status).
//!
//! Neither error ever quotes a captured value: messages name operators, types, type
//! names and the expression's own source text, so they can be stored and shown without
//! passing through redaction.

use std::fmt;

use crate::value::truncate_chars;

/// Longest piece of source quoted in an error message, in characters.
const MAX_QUOTED_CHARS: usize = 60;

/// Why an expression or template source was refused, and where.
///
/// `position` is a byte offset into the source that was parsed (for a template, into
/// the whole template), so tools can underline it; `line` and `column` are 1-based and
/// count characters, so a person can find it. [`ParseError::render`] draws a caret
/// under the spot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseError {
    /// Byte offset of the offending spot in the source.
    pub position: usize,
    /// 1-based line of `position`.
    pub line: u32,
    /// 1-based column of `position`, in characters.
    pub column: u32,
    /// What the parser was looking for, e.g. `an operand after "&&"`.
    pub expected: String,
    /// What it found instead, e.g. `end of input`.
    pub found: String,
    /// The whole sentence, e.g. `expected an operand after "&&", found end of input`.
    pub message: String,
}

impl ParseError {
    /// An error at `position` in `source` saying what was expected and what was found.
    pub(crate) fn expected(
        source: &str,
        position: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        let expected = expected.into();
        let found = found.into();
        let message = format!("expected {expected}, found {found}");
        Self::with_message(source, position, expected, found, message)
    }

    /// An error whose sentence is not of the "expected X, found Y" shape (an unknown
    /// function, a literal out of range), still carrying both parts for tools.
    pub(crate) fn with_message(
        source: &str,
        position: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let position = floor_char_boundary(source, position.min(source.len()));
        let (line, column) = line_col(source, position);
        ParseError { position, line, column, expected: expected.into(), found: found.into(), message: message.into() }
    }

    /// The same error for a source that was embedded in a larger one at byte `offset`
    /// (a template placeholder inside its template).
    pub(crate) fn relocate(mut self, outer: &str, offset: usize) -> Self {
        let position = floor_char_boundary(outer, (self.position + offset).min(outer.len()));
        let (line, column) = line_col(outer, position);
        self.position = position;
        self.line = line;
        self.column = column;
        self
    }

    /// The line of `source` holding the error, with a `^` under the position and the
    /// message below; long lines are shown as a window around the position, so the
    /// result stays short whatever the source.
    ///
    /// ```
    /// let src = "status == \"failed\" &&";
    /// let err = periscope_protocol::expr::parse_condition(src).unwrap_err();
    /// assert_eq!(
    ///     err.render(src),
    ///     "status == \"failed\" &&\n                     ^\nat column 22: expected an operand after \"&&\", found end of input"
    /// );
    /// ```
    pub fn render(&self, source: &str) -> String {
        const WINDOW: usize = 40;
        let pos = floor_char_boundary(source, self.position.min(source.len()));
        let line_start = source.get(..pos).and_then(|s| s.rfind('\n')).map_or(0, |i| i + 1);
        let line_end = source.get(pos..).and_then(|s| s.find('\n')).map_or(source.len(), |i| pos + i);
        let before = source.get(line_start..pos).unwrap_or("");
        let after = source.get(pos..line_end).unwrap_or("");
        let before_chars: Vec<char> = before.chars().collect();
        let skip = before_chars.len().saturating_sub(WINDOW);
        let mut shown = String::new();
        if skip > 0 {
            shown.push('…');
        }
        shown.extend(before_chars.iter().skip(skip).map(|c| printable(*c)));
        let caret_at = shown.chars().count();
        let mut tail = after.chars();
        shown.extend(tail.by_ref().take(WINDOW).map(printable));
        if tail.next().is_some() {
            shown.push('…');
        }
        let mut out = shown.trim_end().to_owned();
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', caret_at));
        out.push('^');
        out.push('\n');
        out.push_str(&self.to_string());
        out
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 1 {
            write!(f, "at line {}, column {}: {}", self.line, self.column, self.message)
        } else {
            write!(f, "at column {}: {}", self.column, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

fn printable(c: char) -> char {
    if c.is_control() { ' ' } else { c }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub(crate) fn line_col(source: &str, position: usize) -> (u32, u32) {
    let before = source.get(..position).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (u32::try_from(line).unwrap_or(u32::MAX), u32::try_from(column).unwrap_or(u32::MAX))
}

/// Quotes a piece of source for a message, shortened so messages stay bounded.
pub(crate) fn quote(text: &str) -> String {
    let short = truncate_chars(text, MAX_QUOTED_CHARS);
    let ell = if short.len() < text.len() { "…" } else { "" };
    // One allocation: an error may be built at every hit (and dropped once reported).
    let mut out = String::with_capacity(short.len() + ell.len() + 2);
    out.push('`');
    if short.bytes().all(|b| b.is_ascii() && !b.is_ascii_control()) {
        out.push_str(short);
    } else {
        out.extend(short.chars().map(printable));
    }
    out.push_str(ell);
    out.push('`');
    out
}

/// Why evaluating an expression at one hit failed.
///
/// The agent reports the first such error of an action once, as the action's status,
/// and keeps counting later ones instead of sending each; a failed condition counts as
/// false. Messages carry the expression's source and the types involved, never the
/// captured values themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A binary operator met operand types it has no meaning for (`"abc" > 3`).
    #[error("`{op}` cannot be applied to {left} and {right} (in {expr})")]
    TypeMismatch {
        /// The operator as written (`>`, `+`, `==`, `in`).
        op: &'static str,
        /// Kind of the left operand (`string`, `int`, ...).
        left: &'static str,
        /// Kind of the right operand.
        right: &'static str,
        /// The sub-expression that failed, quoted.
        expr: String,
    },
    /// A unary operator or a boolean connective met a type it has no meaning for (`!5`).
    #[error("`{op}` cannot be applied to {operand} (in {expr})")]
    BadOperand {
        /// The operator as written (`!`, `-`, `&&`, `[]`).
        op: &'static str,
        /// Kind of the operand.
        operand: &'static str,
        /// The sub-expression that failed, quoted.
        expr: String,
    },
    /// A helper function got an argument of the wrong type (`lower(5)`).
    #[error("`{function}` expects {expected}, got {found} (in {expr})")]
    BadArgument {
        /// The function's name.
        function: &'static str,
        /// What it accepts, in words.
        expected: &'static str,
        /// Kind of what it got.
        found: &'static str,
        /// The call that failed, quoted.
        expr: String,
    },
    /// The expression needed a part of a value that capture limits removed, so its
    /// answer is unknown; reported instead of a silent `null` so the user learns why.
    #[error("value was truncated{}; {path} {detail}", depth.map(|d| format!(" at depth {d}")).unwrap_or_default())]
    Truncated {
        /// The path (or sub-expression) that reached the cut, quoted.
        path: String,
        /// Nesting level of the cut value (the root variable is level 1), when known.
        depth: Option<u32>,
        /// What was cut and what could not be done, in words.
        detail: String,
    },
    /// The step budget ran out; the hit is skipped and the cost counted.
    #[error("evaluation stopped after {limit} steps, the limit for one evaluation")]
    BudgetExceeded {
        /// The budget's limit, in steps.
        limit: u64,
    },
    /// `/` or `%` by zero.
    #[error("division by zero (in {expr})")]
    DivisionByZero {
        /// The division, quoted.
        expr: String,
    },
    /// Integer arithmetic outside the range of 64-bit integers.
    #[error("`{op}` overflowed the integer range (in {expr})")]
    Overflow {
        /// The operator.
        op: &'static str,
        /// The arithmetic, quoted.
        expr: String,
    },
    /// Values nested too deeply to compare within the evaluator's recursion limit.
    #[error("values are nested too deeply to compare (in {expr})")]
    TooDeep {
        /// The comparison, quoted.
        expr: String,
    },
    /// The expression used a value that redaction hid (a whole `[REDACTED:KIND]`
    /// marker) for something other than showing it or comparing it with `null`: an
    /// expression sees what a client sees, and may learn nothing more about it.
    #[error(
        "{expr} reads a value that redaction hides ({marker}); an expression may show a redacted value or compare it with null, nothing else"
    )]
    Redacted {
        /// The sub-expression that used the redacted value, quoted.
        expr: String,
        /// The marker standing for the value (`[REDACTED:PASSWORD]`): the kind of what
        /// was hidden, never the value.
        marker: String,
    },
    /// A condition produced something other than true, false or null.
    #[error("condition must be true or false, got {found}")]
    NotBoolean {
        /// Kind of what it produced.
        found: &'static str,
    },
    /// A metric value expression produced something other than a number or null.
    #[error("a metric value must be a number, got {found}")]
    NotNumber {
        /// Kind of what it produced.
        found: &'static str,
    },
}

impl EvalError {
    /// Every [`EvalError::code`], for agents that keep one flag per kind.
    pub const CODES: [&'static str; 11] = [
        "type_mismatch",
        "bad_operand",
        "bad_argument",
        "truncated",
        "budget_exceeded",
        "division_by_zero",
        "overflow",
        "too_deep",
        "not_boolean",
        "not_number",
        "redacted",
    ];

    /// A stable, short code for the kind of failure, so an agent can report each kind
    /// once per action and count repeats.
    pub fn code(&self) -> &'static str {
        match self {
            EvalError::TypeMismatch { .. } => "type_mismatch",
            EvalError::BadOperand { .. } => "bad_operand",
            EvalError::BadArgument { .. } => "bad_argument",
            EvalError::Truncated { .. } => "truncated",
            EvalError::BudgetExceeded { .. } => "budget_exceeded",
            EvalError::DivisionByZero { .. } => "division_by_zero",
            EvalError::Overflow { .. } => "overflow",
            EvalError::TooDeep { .. } => "too_deep",
            EvalError::NotBoolean { .. } => "not_boolean",
            EvalError::NotNumber { .. } => "not_number",
            EvalError::Redacted { .. } => "redacted",
        }
    }
}
