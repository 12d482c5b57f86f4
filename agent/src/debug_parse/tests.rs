use std::collections::{BTreeMap, BTreeSet, HashMap};

use periscope_protocol::value::truncate;
use proptest::prelude::*;

use super::*;

/// Limits loose enough that nothing in these tests is cut unless the test says so.
fn roomy() -> CaptureLimits {
    CaptureLimits { max_depth: 8, max_items: 1_000, max_string_len: 8_192, max_fields: 200, ..Default::default() }
}

fn parse(text: &str) -> Value {
    parse_debug(text, &roomy())
}

fn obj(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.to_owned(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

fn tuple_obj(name: &str, values: Vec<Value>) -> Value {
    Value::Object(Object {
        type_name: name.to_owned(),
        fields: values.into_iter().enumerate().map(|(i, v)| Field::new(i.to_string(), v)).collect(),
        omitted: 0,
    })
}

/// An object without fields, which the parser builds only from braces (`Foo { .. }`):
/// a bare name is a string.
fn fieldless(name: &str) -> Value {
    obj(name, vec![])
}

fn list_of(type_name: Option<&str>, items: Vec<Value>) -> Value {
    Value::List(List { type_name: type_name.map(str::to_owned), items, omitted: 0 })
}

fn list(items: Vec<Value>) -> Value {
    list_of(None, items)
}

fn map(entries: Vec<(Value, Value)>) -> Value {
    Value::Map(Map { type_name: None, entries, omitted: 0 })
}

fn s(text: &str) -> Value {
    Value::str(text)
}

fn truncated(mut value: Value, limits: &CaptureLimits) -> Value {
    truncate(&mut value, limits, &mut TruncationSummary::default());
    value
}

/// The parser's output must already obey `limits`: truncating it again changes nothing.
fn assert_within_limits(value: &Value, limits: &CaptureLimits) {
    let mut again = value.clone();
    let mut summary = TruncationSummary::default();
    truncate(&mut again, limits, &mut summary);
    assert!(summary.is_empty(), "truncate still cut {summary:?}");
    // Compared as JSON, where NaN equals itself.
    let json = |v: &Value| serde_json::to_string(v).expect("values serialize");
    assert!(json(&again) == json(value), "truncate changed the parsed value");
}

// -- shapes -------------------------------------------------------------------------

#[test]
fn a_struct_becomes_an_object_with_named_fields() {
    assert_eq!(parse(r#"Name { a: 1, b: "x" }"#), obj("Name", vec![("a", Value::Int(1)), ("b", s("x"))]));
    assert_eq!(parse("Raw { r#type: 1 }"), obj("Raw", vec![("type", Value::Int(1))]));
}

#[test]
fn tuple_structs_and_variants_get_positional_fields() {
    assert_eq!(parse("Point(1, -2)"), tuple_obj("Point", vec![Value::Int(1), Value::Int(-2)]));
    assert_eq!(parse("Some(5)"), tuple_obj("Some", vec![Value::Int(5)]));
    assert_eq!(parse("Ok(())"), tuple_obj("Ok", vec![list_of(Some("tuple"), vec![])]));
}

#[test]
fn unit_variants_and_unit_structs_become_their_names_as_strings() {
    // So that a condition compares them with a string: `status == "Pending"`.
    assert_eq!(parse("None"), s("None"));
    assert_eq!(parse("Empty"), s("Empty"));
    assert_eq!(parse("Status::Pending"), s("Status::Pending"));
    assert_eq!(parse("PhantomData<alloc::vec::Vec<u8>>"), s("PhantomData<alloc::vec::Vec<u8>>"));
    assert_eq!(
        parse("Order { status: Paid, refund: None, kind: Kind::Gift }"),
        obj("Order", vec![("status", s("Paid")), ("refund", s("None")), ("kind", s("Kind::Gift"))])
    );
}

#[test]
fn a_bare_name_is_shortened_and_counted_like_any_string() {
    let limits = CaptureLimits { max_string_len: 4, ..roomy() };
    let mut summary = TruncationSummary::default();
    let value = parse_debug_with_summary("[Pending, Paid]", &limits, &mut summary);
    assert_eq!(value, list(vec![Value::Str(Text { value: "Pend".into(), original_len: Some(7) }), s("Paid")]));
    assert_eq!(summary.strings_shortened, 1);
}

#[test]
fn display_text_is_not_mistaken_for_unit_or_tuple_structs() {
    // `%value` fields arrive as Display text through the same Debug channel.
    assert_eq!(parse("expired_card"), s("expired_card"));
    assert_eq!(parse("Ada"), s("Ada"));
    assert_eq!(parse("std::io::stdout"), s("std::io::stdout"));
    assert_eq!(parse("Failed (code 5)"), s("Failed (code 5)"));
    assert_eq!(parse("[pending, Pending]"), list(vec![s("pending"), s("Pending")]));
    assert_eq!(parse("GET"), s("GET"));
}

#[test]
fn paths_name_structs_and_variants() {
    assert_eq!(parse("alloc::vec::Vec { len: 0 }"), obj("alloc::vec::Vec", vec![("len", Value::Int(0))]));
    assert_eq!(parse("io::ErrorKind::NotFound(2)"), tuple_obj("io::ErrorKind::NotFound", vec![Value::Int(2)]));
}

#[test]
fn lists_tuples_maps_and_sets_keep_their_kind() {
    assert_eq!(parse("[1, 2]"), list(vec![Value::Int(1), Value::Int(2)]));
    assert_eq!(parse("[]"), list(vec![]));
    assert_eq!(parse(r#"(1, "a")"#), list_of(Some("tuple"), vec![Value::Int(1), s("a")]));
    assert_eq!(parse("(7,)"), list_of(Some("tuple"), vec![Value::Int(7)]));
    assert_eq!(parse("()"), list_of(Some("tuple"), vec![]));
    assert_eq!(parse(r#"{"k": 1, "j": [2]}"#), map(vec![(s("k"), Value::Int(1)), (s("j"), list(vec![Value::Int(2)]))]));
    assert_eq!(parse("{}"), map(vec![]));
    assert_eq!(parse("{1, 2}"), list_of(Some("set"), vec![Value::Int(1), Value::Int(2)]));
    assert_eq!(parse("{Foo::A, Foo::B}"), list_of(Some("set"), vec![s("Foo::A"), s("Foo::B")]));
    assert_eq!(
        parse(r#"Headers {"host": "a"}"#),
        Value::Map(Map { type_name: Some("Headers".into()), entries: vec![(s("host"), s("a"))], omitted: 0 })
    );
}

#[test]
fn string_escapes_are_decoded() {
    let text = r#""q\"b\\n\nt\tz\0'\'\u{1f600}\u{301}\x41""#;
    assert_eq!(parse(text), s("q\"b\\n\nt\tz\0''\u{1f600}\u{301}A"));
    assert_eq!(parse(r#""unknown \q escape""#), s("unknown \\q escape"));
}

#[test]
fn byte_strings_and_named_lists_from_common_crates_parse() {
    assert_eq!(parse(r#"b"GET\x00\xff""#), s("GET\0\u{ff}"));
    // serde_json::Value's Debug output.
    let json = r#"Object {"id": Number(7), "tags": Array [String("a")], "none": Null}"#;
    assert_eq!(
        parse(json),
        Value::Map(Map {
            type_name: Some("Object".into()),
            entries: vec![
                (s("id"), tuple_obj("Number", vec![Value::Int(7)])),
                (s("tags"), list_of(Some("Array"), vec![tuple_obj("String", vec![s("a")])])),
                (s("none"), s("Null")),
            ],
            omitted: 0,
        })
    );
    let cut = parse_debug("[[Array [1, 2]]]", &CaptureLimits { max_depth: 2, ..roomy() });
    assert_eq!(
        cut,
        list(vec![list(vec![Value::Cut(Cut {
            reason: CutReason::Depth,
            type_name: Some("Array".into()),
            size: Some(2)
        })])])
    );
}

#[test]
fn chars_become_one_character_strings() {
    assert_eq!(parse("'a'"), s("a"));
    assert_eq!(parse(r"'\''"), s("'"));
    assert_eq!(parse(r"'\u{1f600}'"), s("\u{1f600}"));
    assert_eq!(parse("['é', '\"']"), list(vec![s("é"), s("\"")]));
}

#[test]
fn integers_keep_sign_and_widen_past_i64() {
    assert_eq!(parse("-42"), Value::Int(-42));
    assert_eq!(parse("-9223372036854775808"), Value::Int(i64::MIN));
    assert_eq!(parse("9223372036854775808"), Value::UInt(9_223_372_036_854_775_808));
    assert_eq!(parse("18446744073709551615"), Value::UInt(u64::MAX));
    assert_eq!(parse("18446744073709551616"), s("18446744073709551616"));
    assert_eq!(parse("-9223372036854775809"), s("-9223372036854775809"));
    assert_eq!(parse("0x1f"), Value::Int(31));
}

#[test]
fn floats_include_exponents_and_non_finite_values() {
    assert_eq!(parse("1.5"), Value::Float(1.5));
    assert_eq!(parse("1e-7"), Value::Float(1e-7));
    assert_eq!(parse("-2.5e300"), Value::Float(-2.5e300));
    assert_eq!(parse("inf"), Value::Float(f64::INFINITY));
    assert_eq!(parse("-inf"), Value::Float(f64::NEG_INFINITY));
    assert!(matches!(parse("NaN"), Value::Float(f) if f.is_nan()));
    assert_eq!(parse("[true, false]"), list(vec![Value::Bool(true), Value::Bool(false)]));
}

#[test]
fn pretty_output_with_newlines_and_trailing_commas_parses() {
    let text = "Foo {\n    a: [\n        1,\n        2,\n    ],\n    b: Some(\n        \"x\",\n    ),\n    c: {\n        \"k\": (\n            1,\n        ),\n    },\n}";
    assert_eq!(
        parse(text),
        obj(
            "Foo",
            vec![
                ("a", list(vec![Value::Int(1), Value::Int(2)])),
                ("b", tuple_obj("Some", vec![s("x")])),
                ("c", map(vec![(s("k"), list_of(Some("tuple"), vec![Value::Int(1)]))])),
            ]
        )
    );
}

#[test]
fn non_exhaustive_dots_are_ignored() {
    assert_eq!(parse("Foo { a: 1, .. }"), obj("Foo", vec![("a", Value::Int(1))]));
    // A struct whose fields are all hidden is still a struct, not a bare name.
    assert_eq!(parse("Foo { .. }"), fieldless("Foo"));
    assert_eq!(parse("Foo {\n    a: 1,\n    ..\n}"), obj("Foo", vec![("a", Value::Int(1))]));
    assert_eq!(parse("[1, ..]"), list(vec![Value::Int(1)]));
}

#[test]
fn bare_tokens_become_strings_while_their_siblings_keep_structure() {
    assert_eq!(parse("1.5s"), s("1.5s"));
    assert_eq!(parse("127.0.0.1"), s("127.0.0.1"));
    let text = "Conn { took: 1.5ms, peer: 127.0.0.1:8080, v6: [::1]:443, id: 67e55044-10b1-426f-9247-bb680e5fe0c8, at: 2026-11-23T10:00:00Z, n: 3 }";
    assert_eq!(
        parse(text),
        obj(
            "Conn",
            vec![
                ("took", s("1.5ms")),
                ("peer", s("127.0.0.1:8080")),
                ("v6", s("[::1]:443")),
                ("id", s("67e55044-10b1-426f-9247-bb680e5fe0c8")),
                ("at", s("2026-11-23T10:00:00Z")),
                ("n", Value::Int(3)),
            ]
        )
    );
}

#[test]
fn a_malformed_sub_value_degrades_to_its_raw_text_locally() {
    assert_eq!(
        parse(r#"[1, Foo { a: 1 } junk, "ok", (oops]]"#),
        // `(oops]` closes the tuple with the wrong bracket, which is tolerated.
        list(vec![Value::Int(1), s("Foo { a: 1 } junk"), s("ok"), list_of(Some("tuple"), vec![s("oops")])])
    );
    assert_eq!(parse("Foo { a: hello world, b: 2 }"), obj("Foo", vec![("a", s("hello world")), ("b", Value::Int(2))]));
}

#[test]
fn an_unparseable_input_is_kept_as_its_raw_text() {
    for text in ["payment declined: card expired", "Foo { a: 1", "[1, 2", "\"open", "", "}"] {
        assert_eq!(parse(text), s(text), "{text:?}");
    }
    let limits = CaptureLimits { max_string_len: 4, ..roomy() };
    let long = "é€😀 not debug at all";
    assert_eq!(
        parse_debug(long, &limits),
        Value::Str(Text { value: "é€😀 ".into(), original_len: Some(long.chars().count() as u64) })
    );
}

// -- limits -------------------------------------------------------------------------

#[test]
fn containers_below_max_depth_become_depth_cuts_with_type_and_size() {
    let text = "A { b: B { c: C { n: 1, d: D { e: 1 }, l: [1, 2, 3], t: (1, 2), m: {1: 2}, s: {3}, z: [] } } }";
    let limits = CaptureLimits::default();
    let value = parse_debug(text, &limits);
    assert_eq!(value, truncated(parse(text), &limits));
    let c = value.field("b").and_then(|b| b.field("c")).expect("C is kept at level 3");
    assert_eq!(c.field("n"), Some(&Value::Int(1)));
    let cut = |type_name: Option<&str>, size| {
        Value::Cut(Cut { reason: CutReason::Depth, type_name: type_name.map(str::to_owned), size: Some(size) })
    };
    assert_eq!(c.field("d"), Some(&cut(Some("D"), 1)));
    assert_eq!(c.field("l"), Some(&cut(None, 3)));
    assert_eq!(c.field("t"), Some(&cut(Some("tuple"), 2)));
    assert_eq!(c.field("m"), Some(&cut(None, 1)));
    assert_eq!(c.field("s"), Some(&cut(Some("set"), 1)));
    // Empty containers are leaves and survive.
    assert_eq!(c.field("z"), Some(&list(vec![])));
    assert_within_limits(&value, &limits);
}

#[test]
fn items_and_fields_beyond_the_limits_are_counted_without_being_built() {
    let limits = CaptureLimits { max_items: 2, max_fields: 1, ..roomy() };
    let text = r#"W { a: [1, "x, ]y", '\'', [4, 5], "\"}"], b: 2, c: Z { q: ")" } }"#;
    let value = parse_debug(text, &limits);
    let Value::Object(w) = &value else { panic!("expected an object") };
    assert_eq!(w.omitted, 2);
    assert_eq!(w.fields.len(), 1);
    let Some(Value::List(a)) = value.field("a") else { panic!("expected a list") };
    assert_eq!(a.items, vec![Value::Int(1), s("x, ]y")]);
    assert_eq!(a.omitted, 3);
    assert_within_limits(&value, &limits);
}

#[test]
fn long_strings_are_shortened_on_character_boundaries() {
    let limits = CaptureLimits { max_string_len: 3, ..roomy() };
    let mut summary = TruncationSummary::default();
    let value = parse_debug_with_summary(r#"["😀é\"xyz", "ab"]"#, &limits, &mut summary);
    assert_eq!(value, list(vec![Value::Str(Text { value: "😀é\"".into(), original_len: Some(6) }), s("ab")]));
    assert_eq!(summary.strings_shortened, 1);
}

#[test]
fn a_gigantic_list_costs_only_what_the_limits_keep() {
    let text = format!("{:?}", (0..1_000_000u32).collect::<Vec<_>>());
    let mut summary = TruncationSummary::default();
    let value = parse_debug_with_summary(&text, &CaptureLimits::default(), &mut summary);
    let Value::List(l) = value else { panic!("expected a list") };
    assert_eq!(l.items.len(), 100);
    assert_eq!(l.items.last(), Some(&Value::Int(99)));
    assert_eq!(l.omitted, 999_900);
    assert_eq!(summary.items_omitted, 999_900);
}

#[test]
fn extreme_nesting_is_cut_without_deep_recursion() {
    let depth = 200_000;
    let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let value = parse_debug(&text, &CaptureLimits::default());
    let first = |v: &Value| match v {
        Value::List(l) => l.items.first().cloned(),
        _ => None,
    };
    // Levels 1 to 3 are lists; level 4 is a cut.
    let inner = first(&value).and_then(|l2| first(&l2)).and_then(|l3| first(&l3));
    assert_eq!(inner, Some(Value::Cut(Cut { reason: CutReason::Depth, type_name: None, size: Some(1) })));
    // Limits above the hard maximum still stop at MAX_NESTING.
    let unbounded = CaptureLimits { max_depth: u32::MAX, ..roomy() };
    assert!(matches!(parse_debug(&text, &unbounded), Value::List(_)));
    let unbalanced = "[".repeat(depth);
    assert!(matches!(parse_debug(&unbalanced, &unbounded), Value::Str(_)));
}

#[test]
fn the_summary_counts_what_the_limits_removed() {
    let limits = CaptureLimits { max_depth: 1, max_items: 1, max_string_len: 2, ..roomy() };
    let mut summary = TruncationSummary::default();
    parse_debug_with_summary(r#"["abc", [1], 3]"#, &limits, &mut summary);
    assert_eq!(summary, TruncationSummary { depth_cuts: 0, items_omitted: 2, strings_shortened: 1, size_cuts: 0 });
    let mut summary = TruncationSummary::default();
    parse_debug_with_summary(r#"[[1], "abc"]"#, &limits, &mut summary);
    assert_eq!(summary.depth_cuts, 1);
    // Work on a sub-value that then fails to parse is not counted.
    let mut summary = TruncationSummary::default();
    parse_debug_with_summary(r#"Foo { a: ["abcdef", [[1]]] junk }"#, &limits, &mut summary);
    assert_eq!(summary.depth_cuts, 0);
    assert_eq!(summary.strings_shortened, 1);
}

// -- real derive(Debug) output --------------------------------------------------------

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct GeoPoint {
    lat: f64,
    lon: f64,
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct Address {
    street: String,
    city: String,
    postcode: Option<String>,
    geo: GeoPoint,
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct Customer {
    id: u64,
    name: String,
    address: Address,
    tags: Vec<&'static str>,
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
enum Status {
    Pending,
    Shipped { carrier: String, eta_days: u8 },
    Failed(String, i32),
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct Line {
    sku: &'static str,
    qty: u32,
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct Order {
    id: u64,
    customer: Customer,
    lines: Vec<Line>,
    dims: (u8, f32, char),
    status: Status,
    history: Vec<Status>,
    meta: HashMap<String, Vec<i32>>,
    flags: BTreeMap<u8, bool>,
    coupons: BTreeSet<&'static str>,
    note: String,
    refund: Option<i64>,
    total: i128,
}

fn sample_order() -> Order {
    Order {
        id: 42,
        customer: Customer {
            id: 7,
            name: "Zoë O'Brien".into(),
            address: Address {
                street: "1 \"Quoted\" Lane, Flat {2}".into(),
                city: "Zürich".into(),
                postcode: None,
                geo: GeoPoint { lat: 47.3769, lon: -8.5417 },
            },
            tags: vec!["vip", "a, b: c"],
        },
        lines: vec![Line { sku: "SKU-1", qty: 2 }, Line { sku: "SKU-[2]", qty: 1 }],
        dims: (3, 2.5, '\''),
        status: Status::Shipped { carrier: "DHL".into(), eta_days: 2 },
        history: vec![Status::Pending, Status::Failed("card\ndeclined".into(), -51)],
        meta: HashMap::from([("k\"ey".to_owned(), vec![1, -2])]),
        flags: BTreeMap::from([(1, true), (2, false)]),
        coupons: BTreeSet::from(["SAVE10"]),
        note: "Happy birthday! 🎂\tLove,\\ Ann".into(),
        refund: Some(-5),
        total: 170_141_183_460_469_231_731_687_303_715_884_105_727,
    }
}

fn expected_order() -> Value {
    obj(
        "Order",
        vec![
            ("id", Value::Int(42)),
            (
                "customer",
                obj(
                    "Customer",
                    vec![
                        ("id", Value::Int(7)),
                        ("name", s("Zoë O'Brien")),
                        (
                            "address",
                            obj(
                                "Address",
                                vec![
                                    ("street", s("1 \"Quoted\" Lane, Flat {2}")),
                                    ("city", s("Zürich")),
                                    ("postcode", s("None")),
                                    (
                                        "geo",
                                        obj(
                                            "GeoPoint",
                                            vec![("lat", Value::Float(47.3769)), ("lon", Value::Float(-8.5417))],
                                        ),
                                    ),
                                ],
                            ),
                        ),
                        ("tags", list(vec![s("vip"), s("a, b: c")])),
                    ],
                ),
            ),
            (
                "lines",
                list(vec![
                    obj("Line", vec![("sku", s("SKU-1")), ("qty", Value::Int(2))]),
                    obj("Line", vec![("sku", s("SKU-[2]")), ("qty", Value::Int(1))]),
                ]),
            ),
            ("dims", list_of(Some("tuple"), vec![Value::Int(3), Value::Float(2.5), s("'")])),
            ("status", obj("Shipped", vec![("carrier", s("DHL")), ("eta_days", Value::Int(2))])),
            ("history", list(vec![s("Pending"), tuple_obj("Failed", vec![s("card\ndeclined"), Value::Int(-51)])])),
            ("meta", map(vec![(s("k\"ey"), list(vec![Value::Int(1), Value::Int(-2)]))])),
            ("flags", map(vec![(Value::Int(1), Value::Bool(true)), (Value::Int(2), Value::Bool(false))])),
            ("coupons", list_of(Some("set"), vec![s("SAVE10")])),
            ("note", s("Happy birthday! 🎂\tLove,\\ Ann")),
            ("refund", tuple_obj("Some", vec![Value::Int(-5)])),
            ("total", s("170141183460469231731687303715884105727")),
        ],
    )
}

#[test]
fn derived_debug_of_a_nested_order_parses_to_its_tree_compact_and_pretty() {
    let order = sample_order();
    let compact = format!("{order:?}");
    let pretty = format!("{order:#?}");
    assert!(parse(&compact) == expected_order(), "compact: {compact}");
    assert!(parse(&pretty) == expected_order(), "pretty: {pretty}");
}

#[test]
fn derived_debug_under_default_limits_matches_truncating_the_full_tree() {
    let order = sample_order();
    let limits = CaptureLimits::default();
    let expected = truncated(expected_order(), &limits);
    for text in [format!("{order:?}"), format!("{order:#?}")] {
        let value = parse_debug(&text, &limits);
        assert!(value == expected);
        assert_within_limits(&value, &limits);
    }
    // GeoPoint sits at level 4 and is cut; Address at level 3 keeps its leaves.
    let address = expected.field("customer").and_then(|c| c.field("address")).expect("address");
    assert_eq!(address.field("city"), Some(&s("Zürich")));
    assert!(matches!(address.field("geo"), Some(Value::Cut(Cut { reason: CutReason::Depth, .. }))));
}

// -- properties ---------------------------------------------------------------------

/// One element of a group, written at an indentation.
type Item<'a> = Box<dyn Fn(&mut String, usize) + 'a>;

/// Renders a value the way `#[derive(Debug)]` and the standard collections would.
fn render(value: &Value, pretty: bool, indent: usize, out: &mut String) {
    let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
    // Writes `items` between `open` and `close` in compact or pretty layout.
    let group = |out: &mut String, open: &str, close: &str, items: Vec<Item<'_>>| {
        out.push_str(open);
        if items.is_empty() {
            out.push_str(close.trim_start());
            return;
        }
        for (i, item) in items.iter().enumerate() {
            if pretty {
                out.push('\n');
                pad(out, indent + 4);
                item(out, indent + 4);
                out.push(',');
            } else {
                if i > 0 {
                    out.push_str(", ");
                }
                item(out, indent);
            }
        }
        if pretty {
            out.push('\n');
            pad(out, indent);
            out.push_str(close.trim_start());
        } else {
            out.push_str(close);
        }
    };
    match value {
        Value::Null => out.push_str("()"),
        Value::Bool(b) => out.push_str(&format!("{b:?}")),
        Value::Int(n) => out.push_str(&format!("{n:?}")),
        Value::UInt(n) => out.push_str(&format!("{n:?}")),
        Value::Float(f) => out.push_str(&format!("{f:?}")),
        Value::Str(t) => out.push_str(&format!("{:?}", t.value)),
        Value::Cut(_) => out.push_str("Cut"),
        Value::Object(o) if o.fields.is_empty() => out.push_str(&o.type_name),
        Value::Object(o) => {
            let positional = o.fields.iter().enumerate().all(|(i, f)| f.name == i.to_string());
            let items = o
                .fields
                .iter()
                .map(|f| {
                    Box::new(move |out: &mut String, ind: usize| {
                        if !positional {
                            out.push_str(&f.name);
                            out.push_str(": ");
                        }
                        render(&f.value, pretty, ind, out);
                    }) as Item<'_>
                })
                .collect();
            out.push_str(&o.type_name);
            if positional { group(out, "(", ")", items) } else { group(out, " { ", " }", items) }
        }
        Value::List(l) => {
            let items: Vec<Item<'_>> = l
                .items
                .iter()
                .map(|v| Box::new(move |out: &mut String, ind: usize| render(v, pretty, ind, out)) as Item<'_>)
                .collect();
            match l.type_name.as_deref() {
                Some("tuple") if l.items.len() == 1 && !pretty => group(out, "(", ",)", items),
                Some("tuple") => group(out, "(", ")", items),
                Some("set") => group(out, "{", "}", items),
                Some(name) => {
                    out.push_str(name);
                    out.push(' ');
                    group(out, "[", "]", items)
                }
                None => group(out, "[", "]", items),
            }
        }
        Value::Map(m) => {
            let items = m
                .entries
                .iter()
                .map(|(k, v)| {
                    Box::new(move |out: &mut String, ind: usize| {
                        render(k, pretty, ind, out);
                        out.push_str(": ");
                        render(v, pretty, ind, out);
                    }) as Item<'_>
                })
                .collect();
            group(out, "{", "}", items)
        }
    }
}

/// `truncate` leaves list and map type names alone; the parser shortens the ones it
/// read from the text (`Name [..]`), so that no part of its output grows with the input.
fn shorten_collection_names(value: &mut Value, max: usize) {
    let shorten = |name: &mut Option<String>| {
        if let Some(n) = name.as_mut().filter(|n| *n != "tuple" && *n != "set") {
            *n = truncate_chars(n, max).to_owned();
        }
    };
    match value {
        Value::List(l) => {
            shorten(&mut l.type_name);
            l.items.iter_mut().for_each(|v| shorten_collection_names(v, max));
        }
        Value::Map(m) => {
            shorten(&mut m.type_name);
            for (k, v) in &mut m.entries {
                shorten_collection_names(k, max);
                shorten_collection_names(v, max);
            }
        }
        Value::Object(o) => o.fields.iter_mut().for_each(|f| shorten_collection_names(&mut f.value, max)),
        _ => {}
    }
}

/// What the parser reads back from a rendered value: `render` writes a field-less
/// object as its bare name, and a bare name is a string.
///
/// Applied before `truncate`, so that a long name is shortened and counted as the
/// string it becomes. Depth limits treat both alike: a field-less object is not a
/// container, so it is never a depth cut, and neither is a string.
fn as_parsed(value: &Value) -> Value {
    fn bare_names_to_strings(value: &mut Value) {
        match value {
            Value::Object(o) if o.fields.is_empty() && o.omitted == 0 => {
                *value = Value::str(std::mem::take(&mut o.type_name));
            }
            Value::Object(o) => o.fields.iter_mut().for_each(|f| bare_names_to_strings(&mut f.value)),
            Value::List(l) => l.items.iter_mut().for_each(bare_names_to_strings),
            Value::Map(m) => {
                for (k, v) in &mut m.entries {
                    bare_names_to_strings(k);
                    bare_names_to_strings(v);
                }
            }
            _ => {}
        }
    }
    let mut value = value.clone();
    bare_names_to_strings(&mut value);
    value
}

fn rendered(value: &Value, pretty: bool) -> String {
    let mut out = String::new();
    render(value, pretty, 0, &mut out);
    out
}

fn type_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Z][A-Za-z0-9_]{0,7}",
        ("[a-z][a-z_]{0,4}", "[A-Z][A-Za-z0-9]{0,5}").prop_map(|(m, n)| format!("{m}::{n}")),
    ]
    .prop_filter("NaN is a float", |n| n != "NaN")
}

/// A lowercase word, as a `%display` value such as an error code prints.
fn display_word() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,9}".prop_filter("literals", |w| !matches!(w.as_str(), "true" | "false" | "inf"))
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::UInt),
        any::<f64>().prop_filter("NaN never equals itself", |f| !f.is_nan()).prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
        prop::collection::vec(any::<char>(), 0..24).prop_map(|c| Value::str(c.into_iter().collect::<String>())),
        "[ -~]{0,12}".prop_map(Value::str),
        // Rendered as bare names: unit structs and variants, `%display` text.
        type_name().prop_map(|n| fieldless(&n)),
        display_word().prop_map(|w| fieldless(&w)),
    ];
    leaf.prop_recursive(6, 128, 6, |inner| {
        prop_oneof![
            (type_name(), prop::collection::vec(("[a-z_][a-z0-9_]{0,7}", inner.clone()), 1..6)).prop_map(
                |(name, fields)| Value::Object(Object {
                    type_name: name,
                    fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
                    omitted: 0,
                })
            ),
            (type_name(), prop::collection::vec(inner.clone(), 1..5)).prop_map(|(n, v)| tuple_obj(&n, v)),
            prop::collection::vec(inner.clone(), 0..8).prop_map(list),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| list_of(Some("tuple"), v)),
            prop::collection::vec(inner.clone(), 1..5).prop_map(|v| list_of(Some("set"), v)),
            (type_name(), prop::collection::vec(inner.clone(), 0..4)).prop_map(|(n, v)| list_of(Some(&n), v)),
            prop::collection::vec((inner.clone(), inner), 0..5).prop_map(map),
        ]
    })
}

fn arb_limits() -> impl Strategy<Value = CaptureLimits> {
    (1u32..6, 1u32..7, 1u32..7, 1u32..40).prop_map(|(max_depth, max_items, max_fields, max_string_len)| CaptureLimits {
        max_depth,
        max_items,
        max_fields,
        max_string_len,
        ..CaptureLimits::default()
    })
}

/// Text that looks enough like Debug output to reach every branch of the parser.
fn debugish() -> impl Strategy<Value = String> {
    let pieces = vec![
        "[", "]", "{", "}", "(", ")", "\"", "'", "\\", ",", ", ", ":", ": ", "::", "..", " ", "\n", "a", "Foo",
        "Foo { ", "Some(", "1", "-", ".", "e", "0x", "😀", "é", "u{1f600}", "\\u{", "inf", "NaN", "r#", "<", ">",
        "\"x\"", "'c'",
    ];
    prop::collection::vec(prop::sample::select(pieces), 0..80).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_the_output_obeys_the_limits(text in any::<String>(), limits in arb_limits()) {
        let value = parse_debug(&text, &limits);
        assert_within_limits(&value, &limits);
    }

    #[test]
    fn debug_like_text_never_panics_and_the_output_obeys_the_limits(text in debugish(), limits in arb_limits()) {
        let value = parse_debug(&text, &limits);
        assert_within_limits(&value, &limits);
    }

    #[test]
    fn rendered_values_parse_back_to_themselves_truncated(value in arb_value(), limits in arb_limits()) {
        let mut expected = as_parsed(&value);
        let mut expected_summary = TruncationSummary::default();
        truncate(&mut expected, &limits, &mut expected_summary);
        shorten_collection_names(&mut expected, limits.max_string_len as usize);
        for pretty in [false, true] {
            let text = rendered(&value, pretty);
            let mut summary = TruncationSummary::default();
            let parsed = parse_debug_with_summary(&text, &limits, &mut summary);
            prop_assert!(parsed == expected, "text: {}\nparsed: {:?}\nexpected: {:?}", text, parsed, expected);
            prop_assert_eq!(summary, expected_summary);
        }
    }

    #[test]
    fn rendered_values_cut_off_anywhere_still_obey_the_limits(
        value in arb_value(),
        cut in any::<prop::sample::Index>(),
        limits in arb_limits(),
    ) {
        let text = rendered(&value, true);
        let at = text.char_indices().map(|(i, _)| i).nth(cut.index(text.chars().count().max(1))).unwrap_or(text.len());
        assert_within_limits(&parse_debug(&text[..at], &limits), &limits);
    }

    #[test]
    fn rendered_values_parse_back_whole_under_roomy_limits(value in arb_value()) {
        let text = rendered(&value, false);
        prop_assert!(parse(&text) == as_parsed(&value), "text: {}", text);
    }
}
