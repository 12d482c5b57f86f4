//! Recursive descent with one function per precedence level, building the [`Node`]
//! tree, followed by a static check that refuses what can never evaluate (`"a" > 3`,
//! `lower(5)`, `!"x"`), so the broker rejects it at placement.
//!
//! Two bounds keep the parser (and later the evaluator, which recurses over the tree)
//! within a small, fixed stack: nesting of parentheses, brackets, calls and unary
//! operators, and the height of the tree built from chains of binary operators, are
//! both limited to [`MAX_NESTING`]. Chains of `&&` and `||` are flattened into one
//! node, so a long list of alternatives does not count as nesting.

use super::ast::{ArithOp, Base, CmpOp, Func, Kind, NameRun, NameSpan, Node, Path, Seg, SegKind, Ty};
use super::error::{ParseError, quote};
use super::lexer::{Tok, Token, lex};
use crate::limits::action_bounds::MAX_EXPRESSION_LEN;
use crate::value::Value;

/// Deepest nesting (parentheses, calls, unary operators, tree height) accepted.
pub const MAX_NESTING: usize = 32;

/// Parses and statically checks `src`, returning the tree and its static type.
pub(crate) fn parse(src: &str) -> Result<(Node, Ty), ParseError> {
    if src.len() > MAX_EXPRESSION_LEN {
        return Err(too_long(src));
    }
    let toks = lex(src)?;
    let eof = Token { tok: Tok::Eof, start: src.len(), end: src.len() };
    let mut p = Parser { src, toks, pos: 0, nesting: 0, eof };
    if p.peek().tok == Tok::Eof {
        return Err(ParseError::expected(src, 0, "an expression", "end of input"));
    }
    let node = p.parse_expr()?;
    let next = p.peek().clone();
    if next.tok != Tok::Eof {
        let expected = match next.tok {
            Tok::RParen | Tok::RBracket => "an operator or end of input (this closing bracket has no opening one)",
            _ => "an operator or end of input",
        };
        return Err(ParseError::expected(src, next.start, expected, next.describe(src)));
    }
    let ty = check(src, &node)?;
    Ok((node, ty))
}

/// The error for a source over [`MAX_EXPRESSION_LEN`].
pub(crate) fn too_long(src: &str) -> ParseError {
    ParseError::with_message(
        src,
        MAX_EXPRESSION_LEN,
        format!("at most {MAX_EXPRESSION_LEN} bytes"),
        format!("{} bytes", src.len()),
        format!("source is {} bytes long; the limit is {MAX_EXPRESSION_LEN} bytes", src.len()),
    )
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

struct Parser<'s> {
    src: &'s str,
    toks: Vec<Token>,
    pos: usize,
    nesting: usize,
    eof: Token,
}

/// A postfix chain being built: a finished node, or a path still taking segments.
enum Acc {
    Node(Node),
    Path { base: Base, start: u32, base_end: u32, joined: String, names: Vec<NameSpan>, tail: Vec<Seg>, in_run: bool },
}

impl<'s> Parser<'s> {
    fn peek(&self) -> &Token {
        self.toks.get(self.pos).unwrap_or(&self.eof)
    }

    fn peek_next(&self) -> &Token {
        self.toks.get(self.pos + 1).unwrap_or(&self.eof)
    }

    fn previous(&self) -> Option<&Token> {
        self.pos.checked_sub(1).and_then(|i| self.toks.get(i))
    }

    fn advance(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn text(&self, t: &Token) -> &'s str {
        self.src.get(t.start..t.end).unwrap_or("")
    }

    fn is_word(&self, t: &Token, word: &str) -> bool {
        t.tok == Tok::Name && self.text(t) == word
    }

    fn enter(&mut self, at: usize) -> Result<(), ParseError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING { Err(too_deep(self.src, at)) } else { Ok(()) }
    }

    fn leave(&mut self) {
        self.nesting = self.nesting.saturating_sub(1);
    }

    fn mk(&self, kind: Kind, start: u32, end: u32) -> Result<Node, ParseError> {
        let child = match &kind {
            Kind::Lit(_) => 0,
            Kind::List(items) | Kind::And(items) | Kind::Or(items) | Kind::Call(_, items) => {
                items.iter().map(|n| n.height).max().unwrap_or(0)
            }
            Kind::Path(p) => {
                let base = match &p.base {
                    Base::Expr(n) => n.height,
                    _ => 0,
                };
                p.tail
                    .iter()
                    .filter_map(|s| match &s.kind {
                        SegKind::Dyn(n) => Some(n.height),
                        _ => None,
                    })
                    .fold(base, u8::max)
            }
            Kind::Not(x) | Kind::Neg(x) => x.height,
            Kind::Cmp(_, a, b) | Kind::Arith(_, a, b) => a.height.max(b.height),
            Kind::In { needle, hay, .. } => needle.height.max(hay.height),
        };
        if usize::from(child) >= MAX_NESTING {
            return Err(too_deep(self.src, start as usize));
        }
        Ok(Node { kind, start, end, height: child + 1 })
    }

    fn parse_expr(&mut self) -> Result<Node, ParseError> {
        let at = self.peek().start;
        self.enter(at)?;
        let r = self.parse_binary(Prec::Or);
        self.leave();
        r
    }

    /// The binary operator at the cursor, its precedence, and how many tokens it spans.
    fn binary_op(&self) -> Option<(BinOp, Prec, usize)> {
        let t = self.peek();
        let one = |op, prec| Some((op, prec, 1));
        match t.tok {
            Tok::OrOr => one(BinOp::Or, Prec::Or),
            Tok::AndAnd => one(BinOp::And, Prec::And),
            Tok::EqEq => one(BinOp::Cmp(CmpOp::Eq), Prec::Cmp),
            Tok::NotEq => one(BinOp::Cmp(CmpOp::Ne), Prec::Cmp),
            Tok::Lt => one(BinOp::Cmp(CmpOp::Lt), Prec::Cmp),
            Tok::Le => one(BinOp::Cmp(CmpOp::Le), Prec::Cmp),
            Tok::Gt => one(BinOp::Cmp(CmpOp::Gt), Prec::Cmp),
            Tok::Ge => one(BinOp::Cmp(CmpOp::Ge), Prec::Cmp),
            Tok::Plus => one(BinOp::Arith(ArithOp::Add), Prec::Add),
            Tok::Minus => one(BinOp::Arith(ArithOp::Sub), Prec::Add),
            Tok::Star => one(BinOp::Arith(ArithOp::Mul), Prec::Mul),
            Tok::Slash => one(BinOp::Arith(ArithOp::Div), Prec::Mul),
            Tok::Percent => one(BinOp::Arith(ArithOp::Rem), Prec::Mul),
            Tok::Name => match self.text(t) {
                "or" => one(BinOp::Or, Prec::Or),
                "and" => one(BinOp::And, Prec::And),
                "in" => one(BinOp::In { negated: false }, Prec::Cmp),
                "not" if self.is_word(self.peek_next(), "in") => Some((BinOp::In { negated: true }, Prec::Cmp, 2)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Precedence climbing over the binary operators, with the prefix `not` at its own
    /// level: `not` binds looser than comparisons (`not a == b` is `not (a == b)`), as
    /// in Python, while `!` binds tighter, as in C. `&&` and `||` chains are flattened;
    /// comparisons do not chain.
    fn parse_binary(&mut self, min: Prec) -> Result<Node, ParseError> {
        let t = self.peek().clone();
        let mut left = if min <= Prec::Not && self.is_word(&t, "not") {
            self.advance();
            self.enter(t.start)?;
            let inner = self.parse_binary(Prec::Not);
            self.leave();
            let inner = inner?;
            let end = inner.end;
            self.mk(Kind::Not(Box::new(inner)), u32_of(t.start), end)?
        } else {
            self.parse_unary()?
        };
        while let Some((op, prec, width)) = self.binary_op() {
            if prec < min {
                break;
            }
            for _ in 0..width {
                self.advance();
            }
            let start = left.start;
            left = match op {
                BinOp::Or | BinOp::And => {
                    let mut items = vec![left];
                    items.push(self.parse_binary(prec.next())?);
                    while self.binary_op().is_some_and(|(o, _, _)| o == op) {
                        self.advance();
                        items.push(self.parse_binary(prec.next())?);
                    }
                    let end = items.last().map_or(start, |n| n.end);
                    let kind = if op == BinOp::Or { Kind::Or(items) } else { Kind::And(items) };
                    self.mk(kind, start, end)?
                }
                BinOp::Cmp(cmp) => {
                    let right = self.parse_binary(prec.next())?;
                    let end = right.end;
                    let node = self.mk(Kind::Cmp(cmp, Box::new(left), Box::new(right)), start, end)?;
                    self.refuse_chained_comparison()?;
                    node
                }
                BinOp::In { negated } => {
                    let right = self.parse_binary(prec.next())?;
                    let end = right.end;
                    let node =
                        self.mk(Kind::In { negated, needle: Box::new(left), hay: Box::new(right) }, start, end)?;
                    self.refuse_chained_comparison()?;
                    node
                }
                BinOp::Arith(arith) => {
                    let right = self.parse_binary(prec.next())?;
                    let end = right.end;
                    self.mk(Kind::Arith(arith, Box::new(left), Box::new(right)), start, end)?
                }
            };
        }
        Ok(left)
    }

    #[cold]
    fn refuse_chained_comparison(&self) -> Result<(), ParseError> {
        match self.binary_op() {
            Some((_, Prec::Cmp, _)) => {
                let t = self.peek();
                Err(ParseError::with_message(
                    self.src,
                    t.start,
                    "\"&&\", \"||\" or end of input",
                    t.describe(self.src),
                    format!(
                        "comparisons cannot be chained: {} follows a comparison; join them with \"&&\", as in a < b && b < c",
                        t.describe(self.src)
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn parse_unary(&mut self) -> Result<Node, ParseError> {
        let t = self.peek().clone();
        let negate = match t.tok {
            Tok::Bang => false,
            Tok::Minus => true,
            _ => return self.parse_postfix(),
        };
        self.advance();
        self.enter(t.start)?;
        let operand = self.parse_unary();
        self.leave();
        let operand = operand?;
        let (start, end) = (u32_of(t.start), operand.end);
        if !negate {
            return self.mk(Kind::Not(Box::new(operand)), start, end);
        }
        // Negative literals are folded, so `items[-1]` is a constant index.
        let folded = match &operand.kind {
            Kind::Lit(v) => match **v {
                // -(-9223372036854775808) only fits unsigned.
                Value::Int(i) => Some(i.checked_neg().map_or(Value::UInt(i.unsigned_abs()), Value::Int)),
                Value::UInt(u) => match i64::try_from(-i128::from(u)) {
                    Ok(i) => Some(Value::Int(i)),
                    Err(_) => {
                        return Err(ParseError::with_message(
                            self.src,
                            t.start,
                            "an integer of at least -9223372036854775808",
                            quote(self.src.get(t.start..end as usize).unwrap_or("")),
                            "integer literal is too small; integers are 64-bit",
                        ));
                    }
                },
                Value::Float(f) => Some(Value::Float(-f)),
                _ => None,
            },
            _ => None,
        };
        match folded {
            Some(v) => self.mk(Kind::Lit(Box::new(v)), start, end),
            None => self.mk(Kind::Neg(Box::new(operand)), start, end),
        }
    }

    fn parse_postfix(&mut self) -> Result<Node, ParseError> {
        let mut acc = self.parse_primary()?;
        loop {
            match self.peek().tok {
                Tok::Dot => {
                    let dot = self.advance();
                    let name_tok = self.advance();
                    let name = match name_tok.tok {
                        Tok::Name | Tok::Int(_) => self.text(&name_tok),
                        _ => {
                            return Err(ParseError::expected(
                                self.src,
                                name_tok.start,
                                format!("a field name after \"{}\"", self.text(&dot)),
                                name_tok.describe(self.src),
                            ));
                        }
                    };
                    if self.peek().tok == Tok::LParen && name_tok.tok == Tok::Name {
                        let func = self.function(&name_tok, "method")?;
                        let receiver = self.finish(acc)?;
                        self.advance();
                        let (mut args, end) = self.parse_args()?;
                        self.check_arity(func, &name_tok, args.len(), true)?;
                        args.insert(0, receiver);
                        let start = args.first().map_or(0, |n| n.start);
                        acc = Acc::Node(self.mk(Kind::Call(func, args), start, end)?);
                    } else {
                        acc = self.push_seg(acc, SegKind::Name(name.into()), name_tok.end)?;
                    }
                }
                Tok::LBracket => {
                    let open = self.advance();
                    let index = self.parse_expr()?;
                    let close = self.advance();
                    if close.tok != Tok::RBracket {
                        return Err(ParseError::expected(
                            self.src,
                            close.start,
                            format!("\"]\" to close the \"[\" at column {}", self.column(open.start)),
                            close.describe(self.src),
                        ));
                    }
                    let seg = match index.kind {
                        Kind::Lit(lit) => match *lit {
                            Value::Str(t) => SegKind::Name(t.value.into()),
                            Value::Int(i) => SegKind::Index(i),
                            other @ Value::UInt(_) => SegKind::Dyn(Node { kind: Kind::Lit(Box::new(other)), ..index }),
                            other => {
                                return Err(ParseError::with_message(
                                    self.src,
                                    index.start as usize,
                                    "a number or a string as the index",
                                    other.kind(),
                                    format!("an index must be a number or a string, found {}", other.kind()),
                                ));
                            }
                        },
                        _ => SegKind::Dyn(index),
                    };
                    acc = self.push_seg(acc, seg, close.end)?;
                }
                _ => return self.finish(acc),
            }
        }
    }

    fn column(&self, at: usize) -> u32 {
        super::error::line_col(self.src, at).1
    }

    fn push_seg(&self, acc: Acc, seg: SegKind, src_end: usize) -> Result<Acc, ParseError> {
        let mut acc = match acc {
            Acc::Node(n) => Acc::Path {
                start: n.start,
                base_end: n.end,
                base: Base::Expr(Box::new(n)),
                joined: String::new(),
                names: Vec::new(),
                tail: Vec::new(),
                in_run: false,
            },
            path => path,
        };
        if let Acc::Path { base, joined, names, tail, in_run, base_end, .. } = &mut acc {
            match seg {
                SegKind::Name(name) if *in_run => {
                    if !joined.is_empty() || !names.is_empty() {
                        joined.push('.');
                    }
                    let start = u32_of(joined.len());
                    joined.push_str(&name);
                    names.push(NameSpan { start, end: u32_of(joined.len()), src_end: u32_of(src_end) });
                }
                seg => {
                    if matches!(base, Base::Span) && names.is_empty() {
                        return Err(ParseError::with_message(
                            self.src,
                            *base_end as usize,
                            "\".\" and a name after \"span\"",
                            "an index",
                            "a span path starts with names: span.<span name>.<field> or span.<field>",
                        ));
                    }
                    *in_run = false;
                    tail.push(Seg { kind: seg, src_end: u32_of(src_end) });
                }
            }
        }
        Ok(acc)
    }

    fn finish(&self, acc: Acc) -> Result<Node, ParseError> {
        match acc {
            Acc::Node(n) => Ok(n),
            Acc::Path { base, start, base_end, joined, names, tail, .. } => {
                if matches!(base, Base::Span) && names.is_empty() {
                    let next = self.peek();
                    return Err(ParseError::expected(
                        self.src,
                        next.start,
                        "\".\" and a field name after \"span\" (span.<field> or span.<span name>.<field>)",
                        next.describe(self.src),
                    ));
                }
                let end = tail.last().map(|s| s.src_end).or(names.last().map(|n| n.src_end)).unwrap_or(base_end);
                let path = Path { base, run: NameRun { joined: joined.into(), names }, tail };
                self.mk(Kind::Path(Box::new(path)), start, end)
            }
        }
    }

    fn function(&self, name_tok: &Token, what: &str) -> Result<Func, ParseError> {
        let name = self.text(name_tok);
        Func::by_name(name).ok_or_else(|| {
            let known = Func::ALL.map(Func::name).join(", ");
            ParseError::with_message(
                self.src,
                name_tok.start,
                format!("one of the functions {known}"),
                name_tok.describe(self.src),
                format!("unknown {what} {}; the functions are {known}", name_tok.describe(self.src)),
            )
        })
    }

    fn check_arity(&self, func: Func, name_tok: &Token, given: usize, method: bool) -> Result<(), ParseError> {
        let wanted = if method { func.arity() - 1 } else { func.arity() };
        if given == wanted {
            return Ok(());
        }
        let plural = |n: usize| if n == 1 { "argument" } else { "arguments" };
        let message = if method {
            format!(
                "method \"{}\" takes {wanted} {} besides the value it is called on, found {given}",
                func.name(),
                plural(wanted)
            )
        } else {
            format!("function \"{}\" takes {wanted} {}, found {given}", func.name(), plural(wanted))
        };
        Err(ParseError::with_message(
            self.src,
            name_tok.start,
            format!("{wanted} {}", plural(wanted)),
            format!("{given}"),
            message,
        ))
    }

    /// Arguments after `(` up to the matching `)`, and the end of the `)`.
    fn parse_args(&mut self) -> Result<(Vec<Node>, u32), ParseError> {
        let open = self.previous().map_or(0, |t| t.start);
        self.enter(open)?;
        let r = self.parse_list_items(Tok::RParen, "\")\"", open);
        self.leave();
        r
    }

    fn parse_list_items(&mut self, close: Tok, close_text: &str, open: usize) -> Result<(Vec<Node>, u32), ParseError> {
        let mut items = Vec::new();
        loop {
            if self.peek().tok == close {
                let t = self.advance();
                return Ok((items, u32_of(t.end)));
            }
            items.push(self.parse_binary(Prec::Or)?);
            let t = self.advance();
            match t.tok {
                Tok::Comma => {}
                ref tok if *tok == close => return Ok((items, u32_of(t.end))),
                _ => {
                    return Err(ParseError::expected(
                        self.src,
                        t.start,
                        format!("\",\" or {close_text} to close the list opened at column {}", self.column(open)),
                        t.describe(self.src),
                    ));
                }
            }
        }
    }

    fn parse_primary(&mut self) -> Result<Acc, ParseError> {
        let before = self.previous().cloned();
        let t = self.advance();
        let (start, end) = (u32_of(t.start), u32_of(t.end));
        let lit = |p: &Self, v: Value| p.mk(Kind::Lit(Box::new(v)), start, end).map(Acc::Node);
        match t.tok {
            Tok::Int(n) => lit(self, i64::try_from(n).map_or(Value::UInt(n), Value::Int)),
            Tok::Float(f) => lit(self, Value::Float(f)),
            Tok::Str(ref s) => lit(self, Value::str(s.as_str())),
            Tok::LParen => {
                self.enter(t.start)?;
                let inner = self.parse_binary(Prec::Or);
                self.leave();
                let inner = inner?;
                let close = self.advance();
                if close.tok != Tok::RParen {
                    return Err(ParseError::expected(
                        self.src,
                        close.start,
                        format!("\")\" to close the \"(\" at column {}", self.column(t.start)),
                        close.describe(self.src),
                    ));
                }
                // The node covers its parentheses, so errors quote `(a + b)` whole.
                Ok(Acc::Node(Node { start, end: u32_of(close.end), ..inner }))
            }
            Tok::LBracket => {
                self.enter(t.start)?;
                let items = self.parse_list_items(Tok::RBracket, "\"]\"", t.start);
                self.leave();
                let (items, end) = items?;
                if items.iter().all(|n| matches!(n.kind, Kind::Lit(_))) {
                    let values = items
                        .into_iter()
                        .filter_map(|n| match n.kind {
                            Kind::Lit(v) => Some(*v),
                            _ => None,
                        })
                        .collect();
                    let list = crate::value::List { type_name: None, items: values, omitted: 0 };
                    return self.mk(Kind::Lit(Box::new(Value::List(list))), start, end).map(Acc::Node);
                }
                self.mk(Kind::List(items), start, end).map(Acc::Node)
            }
            Tok::Name => {
                let word = self.text(&t);
                match word {
                    "true" => return lit(self, Value::Bool(true)),
                    "false" => return lit(self, Value::Bool(false)),
                    "null" => return lit(self, Value::Null),
                    "and" | "or" | "not" | "in" => return Err(self.no_operand(&t, before.as_ref())),
                    _ => {}
                }
                if self.peek().tok == Tok::LParen {
                    let func = self.function(&t, "function")?;
                    self.advance();
                    let (args, end) = self.parse_args()?;
                    self.check_arity(func, &t, args.len(), false)?;
                    return self.mk(Kind::Call(func, args), start, end).map(Acc::Node);
                }
                if word == "span" {
                    return Ok(Acc::Path {
                        base: Base::Span,
                        start,
                        base_end: end,
                        joined: String::new(),
                        names: Vec::new(),
                        tail: Vec::new(),
                        in_run: true,
                    });
                }
                Ok(Acc::Path {
                    base: Base::Field,
                    start,
                    base_end: end,
                    joined: word.to_owned(),
                    names: vec![NameSpan { start: 0, end: u32_of(word.len()), src_end: end }],
                    tail: Vec::new(),
                    in_run: true,
                })
            }
            _ => Err(self.no_operand(&t, before.as_ref())),
        }
    }

    fn no_operand(&self, found: &Token, before: Option<&Token>) -> ParseError {
        let expected = match before {
            Some(b) if is_operator(self, b) => format!("an operand after \"{}\"", self.text(b)),
            Some(b) if matches!(b.tok, Tok::LParen | Tok::LBracket | Tok::Comma) => {
                format!("an expression after \"{}\"", self.text(b))
            }
            _ => "an expression".to_owned(),
        };
        ParseError::expected(self.src, found.start, expected, found.describe(self.src))
    }
}

fn is_operator(p: &Parser<'_>, t: &Token) -> bool {
    match t.tok {
        Tok::EqEq
        | Tok::NotEq
        | Tok::Lt
        | Tok::Le
        | Tok::Gt
        | Tok::Ge
        | Tok::AndAnd
        | Tok::OrOr
        | Tok::Bang
        | Tok::Plus
        | Tok::Minus
        | Tok::Star
        | Tok::Slash
        | Tok::Percent => true,
        Tok::Name => matches!(p.text(t), "and" | "or" | "not" | "in"),
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Or,
    And,
    Cmp(CmpOp),
    In { negated: bool },
    Arith(ArithOp),
}

/// Binding power, loosest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Prec {
    Or,
    And,
    Not,
    Cmp,
    Add,
    Mul,
    Unary,
}

impl Prec {
    fn next(self) -> Prec {
        match self {
            Prec::Or => Prec::And,
            Prec::And => Prec::Not,
            Prec::Not => Prec::Cmp,
            Prec::Cmp => Prec::Add,
            Prec::Add => Prec::Mul,
            Prec::Mul | Prec::Unary => Prec::Unary,
        }
    }
}

fn too_deep(src: &str, at: usize) -> ParseError {
    ParseError::with_message(
        src,
        at,
        format!("at most {MAX_NESTING} levels of nesting"),
        "deeper nesting",
        format!("expression nests more than {MAX_NESTING} levels deep; simplify it or use `in [...]` for alternatives"),
    )
}

fn ty_of(v: &Value) -> Ty {
    match v {
        Value::Null => Ty::Null,
        Value::Bool(_) => Ty::Bool,
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => Ty::Num,
        Value::Str(_) => Ty::Str,
        Value::List(_) => Ty::List,
        _ => Ty::Any,
    }
}

/// Byte offset of `symbol` between two operands, for errors that point at the operator.
fn op_position(src: &str, left: &Node, right: &Node, symbol: &str) -> usize {
    let (a, b) = (left.end as usize, right.start as usize);
    src.get(a..b).and_then(|between| between.find(symbol)).map_or(a, |i| a + i)
}

fn type_error(src: &str, at: usize, expected: &str, found: String, message: String) -> ParseError {
    ParseError::with_message(src, at, expected, found, message)
}

/// Infers the static type of `n`, refusing operators applied to literal types they can
/// never accept. `Ty::Any` (a captured value) is accepted everywhere: its type is only
/// known at run time.
pub(crate) fn check(src: &str, n: &Node) -> Result<Ty, ParseError> {
    let bool_like = |t: Ty| matches!(t, Ty::Bool | Ty::Null | Ty::Any);
    match &n.kind {
        Kind::Lit(v) => Ok(ty_of(v)),
        Kind::List(items) => {
            for item in items {
                check(src, item)?;
            }
            Ok(Ty::List)
        }
        Kind::Path(p) => {
            if let Base::Expr(e) = &p.base {
                check(src, e)?;
            }
            for seg in &p.tail {
                if let SegKind::Dyn(index) = &seg.kind {
                    let t = check(src, index)?;
                    if matches!(t, Ty::Bool | Ty::List) {
                        return Err(type_error(
                            src,
                            index.start as usize,
                            "a number or a string as the index",
                            t.name().to_owned(),
                            format!("an index must be a number or a string, found {}", t.name()),
                        ));
                    }
                }
            }
            Ok(Ty::Any)
        }
        Kind::Not(x) => {
            let t = check(src, x)?;
            if !bool_like(t) {
                let text = src.get(n.start as usize..).unwrap_or("");
                let op = if text.trim_start_matches(|c: char| c == '(' || c.is_whitespace()).starts_with('!') {
                    "!"
                } else {
                    "not"
                };
                return Err(type_error(
                    src,
                    n.start as usize,
                    "true or false after the negation",
                    t.name().to_owned(),
                    format!("\"{op}\" needs true or false, but its operand is a {}", t.name()),
                ));
            }
            Ok(Ty::Bool)
        }
        Kind::Neg(x) => {
            let t = check(src, x)?;
            match t {
                Ty::Num | Ty::Any => Ok(Ty::Num),
                Ty::Null => Ok(Ty::Null),
                _ => Err(type_error(
                    src,
                    n.start as usize,
                    "a number after \"-\"",
                    t.name().to_owned(),
                    format!("\"-\" needs a number, but its operand is a {}", t.name()),
                )),
            }
        }
        Kind::And(items) | Kind::Or(items) => {
            let op = if matches!(n.kind, Kind::And(_)) { "&&" } else { "||" };
            for item in items {
                let t = check(src, item)?;
                if !bool_like(t) {
                    return Err(type_error(
                        src,
                        item.start as usize,
                        "true or false on each side",
                        t.name().to_owned(),
                        format!("\"{op}\" needs true or false on each side, but this operand is a {}", t.name()),
                    ));
                }
            }
            Ok(Ty::Bool)
        }
        Kind::Cmp(op, l, r) => {
            let (tl, tr) = (check(src, l)?, check(src, r)?);
            let known = |t: Ty| !matches!(t, Ty::Any | Ty::Null);
            let ok = match op {
                CmpOp::Eq | CmpOp::Ne => !known(tl) || !known(tr) || tl == tr,
                _ => {
                    let orderable = |t: Ty| matches!(t, Ty::Num | Ty::Str | Ty::Any | Ty::Null);
                    orderable(tl) && orderable(tr) && (!known(tl) || !known(tr) || tl == tr)
                }
            };
            if !ok {
                let sym = op.symbol();
                return Err(type_error(
                    src,
                    op_position(src, l, r, sym),
                    match op {
                        CmpOp::Eq | CmpOp::Ne => "two values of the same type",
                        _ => "two numbers or two strings",
                    },
                    format!("{} and {}", tl.name(), tr.name()),
                    format!("\"{sym}\" cannot compare a {} with a {}", tl.name(), tr.name()),
                ));
            }
            Ok(Ty::Bool)
        }
        Kind::In { needle, hay, negated } => {
            let (tn, th) = (check(src, needle)?, check(src, hay)?);
            let word = if *negated { "not" } else { "in" };
            let at = op_position(src, needle, hay, word);
            if matches!(th, Ty::Num | Ty::Bool) {
                return Err(type_error(
                    src,
                    at,
                    "a list, map, object or string after \"in\"",
                    th.name().to_owned(),
                    format!("\"in\" looks inside a list, map, object or string, but its right side is a {}", th.name()),
                ));
            }
            if th == Ty::Str && matches!(tn, Ty::Num | Ty::Bool | Ty::List) {
                return Err(type_error(
                    src,
                    at,
                    "a string before \"in\" a string",
                    tn.name().to_owned(),
                    format!("\"in\" on a string looks for a substring, but its left side is a {}", tn.name()),
                ));
            }
            Ok(Ty::Bool)
        }
        Kind::Arith(op, l, r) => {
            let (tl, tr) = (check(src, l)?, check(src, r)?);
            let sym = op.symbol();
            let result = match (op, tl, tr) {
                (_, Ty::Null, _) | (_, _, Ty::Null) => Some(Ty::Null),
                (_, Ty::Num, Ty::Num) | (_, Ty::Num, Ty::Any) | (_, Ty::Any, Ty::Num) => Some(Ty::Num),
                (ArithOp::Add, Ty::Str, Ty::Str)
                | (ArithOp::Add, Ty::Str, Ty::Any)
                | (ArithOp::Add, Ty::Any, Ty::Str) => Some(Ty::Str),
                (_, Ty::Any, Ty::Any) => Some(Ty::Any),
                _ => None,
            };
            result.ok_or_else(|| {
                type_error(
                    src,
                    op_position(src, l, r, sym),
                    if *op == ArithOp::Add { "two numbers or two strings" } else { "two numbers" },
                    format!("{} and {}", tl.name(), tr.name()),
                    format!("\"{sym}\" cannot be applied to a {} and a {}", tl.name(), tr.name()),
                )
            })
        }
        Kind::Call(func, args) => {
            let mut types = Vec::with_capacity(args.len());
            for a in args {
                types.push(check(src, a)?);
            }
            let arg = |i: usize| types.get(i).copied().unwrap_or(Ty::Any);
            let bad = |i: usize, expected: &str| {
                let at = args.get(i).map_or(n.start as usize, |a| a.start as usize);
                let t = arg(i);
                Err(type_error(
                    src,
                    at,
                    expected,
                    t.name().to_owned(),
                    format!("\"{}\" expects {expected}, but this argument is a {}", func.name(), t.name()),
                ))
            };
            let stringy = |t: Ty| matches!(t, Ty::Str | Ty::Any | Ty::Null);
            match func {
                Func::Contains => {
                    if matches!(arg(0), Ty::Num | Ty::Bool) {
                        return bad(0, "a string, list, map or object to search");
                    }
                    if arg(0) == Ty::Str && !stringy(arg(1)) {
                        return bad(1, "a string to look for in a string");
                    }
                    Ok(Ty::Bool)
                }
                Func::StartsWith | Func::EndsWith => {
                    for i in 0..2 {
                        if !stringy(arg(i)) {
                            return bad(i, "strings");
                        }
                    }
                    Ok(Ty::Bool)
                }
                Func::Len => {
                    if matches!(arg(0), Ty::Num | Ty::Bool) {
                        return bad(0, "a string, list, map or object");
                    }
                    Ok(Ty::Num)
                }
                Func::Lower => {
                    if !stringy(arg(0)) {
                        return bad(0, "a string");
                    }
                    Ok(Ty::Str)
                }
            }
        }
    }
}
