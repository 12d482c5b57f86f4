//! Compiles every expression an [`ActionSpec`] carries in one call: the broker uses it
//! to refuse a bad action at placement, naming the argument at fault; the agent uses
//! it to compile an action once when it is installed.

use std::fmt;

use super::{Expr, ParseError, Roots, Template, parse_condition, parse_numeric, parse_watch};
use crate::action::{ActionKind, ActionSpec, MetricKind};

/// The compiled expressions of one action.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ActionExprs {
    /// The snapshot, log or metric condition.
    pub condition: Option<Expr>,
    /// A snapshot's watch expressions, in order.
    pub watches: Vec<Expr>,
    /// A dynamic log's template.
    pub template: Option<Template>,
    /// A `value` metric's expression.
    pub value: Option<Expr>,
    /// Everything the above read, merged.
    pub roots: Roots,
}

/// An action argument whose expression does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExprFieldError {
    /// The argument as a client names it: `condition`, `watch[1]`, `template`,
    /// `expression`.
    pub field: String,
    /// What is wrong with it.
    pub error: ParseError,
}

impl fmt::Display for ExprFieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.error)
    }
}

impl std::error::Error for ExprFieldError {}

impl ActionExprs {
    /// Parses and checks the condition, watches, template and metric expression of
    /// `spec`. A `value` metric without an expression is refused too.
    pub fn compile(spec: &ActionSpec) -> Result<ActionExprs, ExprFieldError> {
        let at = |field: &str| {
            let field = field.to_owned();
            move |error| ExprFieldError { field, error }
        };
        let condition = spec.condition.as_deref().map(parse_condition).transpose().map_err(at("condition"))?;
        let mut exprs =
            ActionExprs { condition, watches: Vec::new(), template: None, value: None, roots: Roots::default() };
        match &spec.kind {
            ActionKind::Snapshot(s) => {
                for (i, w) in s.watch.iter().enumerate() {
                    exprs.watches.push(parse_watch(w).map_err(at(&format!("watch[{i}]")))?);
                }
            }
            ActionKind::Log(l) => exprs.template = Some(Template::parse(&l.template).map_err(at("template"))?),
            ActionKind::Metric(m) => match (&m.expression, m.metric) {
                (Some(src), MetricKind::Value) => exprs.value = Some(parse_numeric(src).map_err(at("expression"))?),
                (None, MetricKind::Value) => {
                    return Err(ExprFieldError {
                        field: "expression".into(),
                        error: ParseError::expected("", 0, "a numeric expression for a value metric", "none"),
                    });
                }
                // Counters and durations ignore an expression; it is still checked so a
                // typo is not silently carried along.
                (Some(src), _) => exprs.value = Some(parse_numeric(src).map_err(at("expression"))?),
                (None, _) => {}
            },
            ActionKind::CaptureErrors(_) | ActionKind::Unsupported => {}
        }
        let mut roots = Roots::default();
        let all = exprs.condition.iter().chain(&exprs.watches).chain(&exprs.value);
        for e in all {
            roots.merge(e.roots());
        }
        if let Some(t) = &exprs.template {
            roots.merge(t.roots());
        }
        exprs.roots = roots;
        Ok(exprs)
    }
}
