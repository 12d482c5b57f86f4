//! The compiled form of an expression: a tree of [`Node`]s, each remembering its span
//! in the source so evaluation errors can quote the part that failed.
//!
//! The tree is built once per action and shared between threads (`Send + Sync`);
//! evaluation only reads it. Paths keep their leading names joined in one string so that
//! a root the scope does not know can be retried as a dotted field name (`user.id`, as
//! `tracing` records `info!(user.id = 5)`) without allocating at evaluation time.

use crate::value::Value;

/// One node of the tree.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: Kind,
    /// Byte span in the expression's source.
    pub start: u32,
    pub end: u32,
    /// Height of the subtree (a leaf is 1), bounded by the parser.
    pub height: u8,
}

/// What a node computes.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A literal: a scalar, or a list whose items are all literals. Boxed to keep
    /// nodes small: the parser and evaluator recurse over them.
    Lit(Box<Value>),
    /// A list literal with computed items.
    List(Vec<Node>),
    /// A field path.
    Path(Box<Path>),
    /// `!x` and `not x`.
    Not(Box<Node>),
    /// `-x`.
    Neg(Box<Node>),
    /// `a && b && ...`, flattened.
    And(Vec<Node>),
    /// `a || b || ...`, flattened.
    Or(Vec<Node>),
    /// `==`, `!=`, `<`, `<=`, `>`, `>=`.
    Cmp(CmpOp, Box<Node>, Box<Node>),
    /// `needle in hay` and `needle not in hay`.
    In { negated: bool, needle: Box<Node>, hay: Box<Node> },
    /// `+`, `-`, `*`, `/`, `%`.
    Arith(ArithOp, Box<Node>, Box<Node>),
    /// A helper function or method call.
    Call(Func, Vec<Node>),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// Arithmetic operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl ArithOp {
    pub fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Rem => "%",
        }
    }
}

/// The helper functions. The set is closed: an unknown name is a parse error, so the
/// broker refuses it at placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Contains,
    StartsWith,
    EndsWith,
    Len,
    Lower,
}

impl Func {
    pub const ALL: [Func; 5] = [Func::Contains, Func::StartsWith, Func::EndsWith, Func::Len, Func::Lower];

    pub fn name(self) -> &'static str {
        match self {
            Func::Contains => "contains",
            Func::StartsWith => "starts_with",
            Func::EndsWith => "ends_with",
            Func::Len => "len",
            Func::Lower => "lower",
        }
    }

    pub fn arity(self) -> usize {
        match self {
            Func::Contains | Func::StartsWith | Func::EndsWith => 2,
            Func::Len | Func::Lower => 1,
        }
    }

    pub fn by_name(name: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// A path: a base, a run of leading names, then any other segments.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub base: Base,
    /// Leading names (for a field base the first is the root; for a span base the
    /// names after `span`). Empty for an expression base.
    pub run: NameRun,
    /// Segments after the run.
    pub tail: Vec<Seg>,
}

impl Path {
    /// The field name when the path is a bare event field (`status`), the shape most
    /// conditions compare.
    #[inline]
    pub fn single_field(&self) -> Option<&str> {
        match self.base {
            Base::Field if self.run.len() == 1 && self.tail.is_empty() => Some(self.run.name(0)),
            _ => None,
        }
    }
}

/// Where a path starts.
#[derive(Debug, Clone)]
pub(crate) enum Base {
    /// An event field or local variable, named by the first name of the run.
    Field,
    /// `span.`: resolved against the active spans.
    Span,
    /// Any other expression, e.g. `(a).b` or `[1, 2][0]`.
    Expr(Box<Node>),
}

/// Consecutive names, joined with `.` so that any sub-run is a slice.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameRun {
    pub joined: Box<str>,
    /// For each name: its byte range in `joined`, and the end of it in the source.
    pub names: Vec<NameSpan>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct NameSpan {
    pub start: u32,
    pub end: u32,
    pub src_end: u32,
}

impl NameRun {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Name `i`.
    pub fn name(&self, i: usize) -> &str {
        self.names.get(i).and_then(|n| self.joined.get(n.start as usize..n.end as usize)).unwrap_or("")
    }

    /// Names `from..=to` joined with dots.
    pub fn dotted(&self, from: usize, to: usize) -> &str {
        match (self.names.get(from), self.names.get(to)) {
            (Some(a), Some(b)) => self.joined.get(a.start as usize..b.end as usize).unwrap_or(""),
            _ => "",
        }
    }

    /// Source end of name `i`.
    pub fn src_end(&self, i: usize) -> u32 {
        self.names.get(i).map_or(0, |n| n.src_end)
    }
}

/// A path segment after the leading run.
#[derive(Debug, Clone)]
pub(crate) struct Seg {
    pub kind: SegKind,
    /// Where the segment ends in the source, to quote the path up to it.
    pub src_end: u32,
}

#[derive(Debug, Clone)]
pub(crate) enum SegKind {
    /// `.name` or `["name"]`.
    Name(Box<str>),
    /// `[3]`, `[-1]`.
    Index(i64),
    /// `[expr]`.
    Dyn(Node),
}

/// What the parser knows statically about a node's result, to refuse expressions that
/// can never work (`"abc" > 3`, `lower(5)`, a condition that is a number) at placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Bool,
    Num,
    Str,
    List,
    Null,
    /// Depends on captured values.
    Any,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Num => "number",
            Ty::Str => "string",
            Ty::List => "list",
            Ty::Null => "null",
            Ty::Any => "any value",
        }
    }
}
