//! Property tests: whatever the source and whatever the captured values, parsing,
//! evaluating and rendering never panic, errors point inside the source, and
//! evaluation stays within its budget.

use proptest::prelude::*;

use super::*;
use crate::value::{Cut, CutReason, Field, List, Map, Object, Text};

/// Pieces that make sources likely to parse, and to hit every operator and rule.
const TOKENS: &[&str] = &[
    "a",
    "b",
    "order",
    "items",
    "user",
    "id",
    "status",
    "span",
    "request",
    "x",
    "größe",
    "0",
    "1",
    "-1",
    "42",
    "3.5",
    "1e3",
    "18446744073709551615",
    "9223372036854775808",
    "\"s\"",
    "'é'",
    "\"\\u{1F600}\"",
    "\"",
    "'",
    "true",
    "false",
    "null",
    "and",
    "or",
    "not",
    "in",
    ".",
    "?.",
    ",",
    "(",
    ")",
    "[",
    "]",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    "!",
    "+",
    "-",
    "*",
    "/",
    "%",
    "contains",
    "starts_with",
    "ends_with",
    "len",
    "lower",
    "=",
    "&",
    "|",
    "{",
    "}",
    "{{",
    "}}",
    "#",
    "\\",
    "\n",
    "日本",
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(TOKENS), prop::bool::ANY), 0..40).prop_map(|parts| {
        let mut s = String::new();
        for (tok, space) in parts {
            s.push_str(tok);
            if space {
                s.push(' ');
            }
        }
        s
    })
}

/// Counts of left-out children, including the absurd ones a hostile agent could send.
fn omitted() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(0u64), 2 => 1u64..3, 1 => Just(u64::MAX)]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        any::<f64>().prop_map(Value::Float),
        ("[a-zé]{0,8}", prop::option::of(prop_oneof![0u64..20, Just(u64::MAX)]))
            .prop_map(|(value, original_len)| Value::Str(Text { value, original_len })),
        (prop::option::of("[A-Z][a-z]{0,5}"), prop::option::of(any::<u64>()))
            .prop_map(|(type_name, size)| { Value::Cut(Cut { reason: CutReason::Depth, type_name, size }) }),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..6), omitted()).prop_map(|(items, omitted)| Value::List(List {
                type_name: None,
                items,
                omitted
            })),
            (prop::collection::vec((inner.clone(), inner.clone()), 0..4), omitted())
                .prop_map(|(entries, omitted)| Value::Map(Map { type_name: None, entries, omitted })),
            (
                prop::collection::vec((prop::sample::select(&["a", "b", "id", "items", "0", "x"][..]), inner), 0..5),
                0u64..2
            )
                .prop_map(|(fields, omitted)| Value::Object(Object {
                    type_name: "T".into(),
                    fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
                    omitted,
                })),
        ]
    })
}

fn scope() -> impl Strategy<Value = SimpleScope> {
    let names = prop::sample::select(&["a", "b", "order", "user", "user.id", "status", "x", "items", "größe"][..]);
    (
        prop::collection::vec((names.clone(), value()), 0..6),
        prop::collection::vec(
            (prop::sample::select(&["request", "handler"][..]), prop::collection::vec((names, value()), 0..3)),
            0..3,
        ),
    )
        .prop_map(|(fields, spans)| SimpleScope {
            fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
            spans: spans
                .into_iter()
                .map(|(n, fs)| (n.to_owned(), fs.into_iter().map(|(f, v)| Field::new(f, v)).collect()))
                .collect(),
        })
}

fn check_error_position(src: &str, err: &ParseError) {
    assert!(err.position <= src.len(), "{src:?}: {err:?}");
    assert!(src.is_char_boundary(err.position), "{src:?}: {err:?}");
    assert!(err.line >= 1 && err.column >= 1);
    let shown = err.render(src);
    assert!(shown.lines().count() >= 3, "{shown}");
    assert!(shown.len() < 2_000);
}

fn exercise(src: &str, scope: &SimpleScope) {
    match Expr::parse(src) {
        Ok(e) => {
            let _ = e.roots();
            let _ = e.field_name();
            for limit in [0, 7, Budget::DEFAULT_STEPS] {
                let mut b = Budget::new(limit);
                let _ = e.eval(scope, &mut b);
                assert!(b.used() <= limit.saturating_add(2_000), "{src:?}: used {} of {limit}", b.used());
                let _ = e.eval_condition(scope, &mut Budget::new(limit));
                let _ = e.eval_number(scope, &mut Budget::new(limit));
            }
        }
        Err(err) => check_error_position(src, &err),
    }
    let _ = parse_condition(src);
    let _ = parse_numeric(src);
    match Template::parse(src) {
        Ok(t) => {
            let out = t.render(scope, &mut Budget::default(), |_, _, v| *v = Value::Null);
            if let Ok(r) = out {
                assert!(r.text.len() <= Template::MAX_LINE_BYTES + 3);
            }
        }
        Err(err) => check_error_position(src, &err),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_parser_or_the_evaluator(src in any::<String>(), scope in scope()) {
        exercise(&src, &scope);
    }

    #[test]
    fn token_soup_never_panics_and_errors_point_inside_the_source(src in soup(), scope in scope()) {
        exercise(&src, &scope);
        exercise(&format!("{{{src}}} and {{{src}}}"), &scope);
    }

    #[test]
    fn every_path_shape_evaluates_without_panicking_on_any_value(scope in scope(), index in -8i64..8) {
        let sources = [
            "a", "a.b", "a[0]", &format!("a[{index}]"), "a.items[0].id", "a[b]", "user.id", "order.items.len()",
            "span.request.a", "span.a.b", "span.x", "a == b", "a != b", "a < b", "a >= b", "a in b", "a not in b",
            "a + b", "a - b", "a * b", "a / b", "a % b", "-a", "!a", "a && b", "a || b", "contains(a, b)",
            "starts_with(a, b)", "ends_with(a, b)", "len(a)", "lower(a)", "a == [1, \"x\", null]", "[a, b][1]",
            "(a).b[0]", "a[\"id\"]", "status.lower().contains(\"é\")",
        ];
        for src in sources {
            let e = Expr::parse(src).unwrap_or_else(|err| panic!("{src}: {err}"));
            let _ = e.eval(&scope, &mut Budget::default());
            let _ = e.eval_condition(&scope, &mut Budget::default());
            let _ = e.eval_number(&scope, &mut Budget::default());
        }
        let t = Template::parse("{a} {b} {order} {user.id} {span.x}").unwrap_or_else(|e| panic!("{e}"));
        let _ = t.render(&scope, &mut Budget::default(), |_, _, _| {});
    }

    #[test]
    fn a_value_always_equals_itself_unless_cut_or_nan(v in value()) {
        let scope = SimpleScope::new().with_field("v", v);
        let e = parse_condition("v == v").unwrap_or_else(|e| panic!("{e}"));
        // Equal, or undecidable because of a cut or NaN: never a crash, never "not equal"
        // for a fully captured value without NaN.
        if let Ok(false) = e.eval_condition(&scope, &mut Budget::new(1_000_000)) {
            prop_assert!(contains_nan(&scope.fields[0].value), "{:?}", scope.fields[0].value);
        }
    }
}

fn contains_nan(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_nan(),
        Value::List(l) => l.items.iter().any(contains_nan),
        Value::Map(m) => m.entries.iter().any(|(k, v)| contains_nan(k) || contains_nan(v)),
        Value::Object(o) => o.fields.iter().any(|f| contains_nan(&f.value)),
        _ => false,
    }
}
