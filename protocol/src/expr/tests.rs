//! Behaviour of the expression language as the broker and the agent see it: what
//! parses, what is refused and where, and what evaluation gives.

use super::*;
use crate::action::{ActionKind, ActionSpec, Location, LogSpec, MetricKind, MetricSpec, SnapshotSpec};
use crate::ids::ActionId;
use crate::value::{Cut, CutReason, Field, List, Map, Object, Text};

fn obj(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.into(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

fn list(items: Vec<Value>) -> Value {
    Value::List(List { type_name: None, items, omitted: 0 })
}

fn fixture() -> SimpleScope {
    let item = |sku: &str, price: Value| obj("Item", vec![("sku", Value::str(sku)), ("price", price)]);
    let order = obj(
        "Order",
        vec![
            ("id", Value::Int(42)),
            ("items", list(vec![item("A1", Value::Float(3.5)), item("B2", Value::Int(10)), item("C3", Value::Int(2))])),
            (
                "customer",
                Value::Cut(Cut { reason: CutReason::Depth, type_name: Some("Customer".into()), size: Some(4) }),
            ),
            ("tags", list(vec![Value::str("x"), Value::str("y")])),
            (
                "meta",
                Value::Map(Map {
                    type_name: None,
                    entries: vec![
                        (Value::str("k"), Value::Int(1)),
                        (Value::str("region"), Value::str("eu")),
                        (Value::Int(7), Value::str("seven")),
                    ],
                    omitted: 0,
                }),
            ),
            ("note", Value::Null),
        ],
    );
    SimpleScope::new()
        .with_field("status", "failed")
        .with_field("amount", 1500_i64)
        .with_field("price", 9.5)
        .with_field("big", Value::UInt(u64::MAX))
        .with_field("name", "Ada Lovelace")
        .with_field("city", "ÉCOLE Zürich")
        .with_field("empty", Value::Null)
        .with_field("flag", true)
        .with_field("order", order)
        .with_field("pair", obj("(i32, &str)", vec![("0", Value::Int(1)), ("1", Value::str("one"))]))
        .with_field("user.id", 7_i64)
        .with_field("long", Value::Str(Text { value: "abcdef".into(), original_len: Some(300) }))
        .with_field(
            "trunc_list",
            Value::List(List { type_name: None, items: vec![Value::Int(1), Value::Int(2)], omitted: 3 }),
        )
        .with_field(
            "wide",
            Value::Object(Object {
                type_name: "Wide".into(),
                fields: vec![Field::new("a", Value::Int(1))],
                omitted: 5,
            }),
        )
        .with_field("i", 1_i64)
        .with_field("key", "region")
        .with_span(
            "handler",
            vec![Field::new("user_id", Value::Int(5)), Field::new("request", Value::str("inner-field"))],
        )
        .with_span("request", vec![Field::new("user_id", Value::Int(9)), Field::new("method", Value::str("GET"))])
}

fn eval(src: &str) -> Result<Value, EvalError> {
    Expr::parse(src).unwrap_or_else(|e| panic!("{src}: {e}")).eval(&fixture(), &mut Budget::default())
}

fn val(src: &str) -> Value {
    eval(src).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn cond(src: &str) -> Result<bool, EvalError> {
    parse_condition(src).unwrap_or_else(|e| panic!("{src}: {e}")).eval_condition(&fixture(), &mut Budget::default())
}

fn yes(src: &str) -> bool {
    cond(src).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn perr(src: &str) -> ParseError {
    match Expr::parse(src) {
        Ok(e) => panic!("{src} parsed as {e:?}"),
        Err(e) => e,
    }
}

#[test]
fn a_typical_condition_compares_fields_with_literals() {
    assert!(!yes(r#"status == "ok" && amount > 1000"#));
    assert!(yes(r#"status == "failed" && amount > 1000"#));
    assert!(yes(r#"status != "ok" and amount >= 1500 and amount <= 1500"#));
    assert!(yes(r#"status == "ok" || price < 10"#));
}

#[test]
fn numbers_compare_exactly_across_int_uint_and_float() {
    assert!(yes("1 == 1.0"));
    assert!(yes("amount == 1500.0"));
    assert!(yes("big > -1 && big > 9223372036854775807"));
    assert!(yes("big == 18446744073709551615"));
    assert!(yes("9007199254740993 > 9007199254740992.0"), "an int above 2^53 must not be rounded to a float");
    assert!(yes("3 < 3.5 && 4 > 3.5 && -1 < -0.5"));
    assert!(yes("price > 9 && price < 10"));
}

#[test]
fn paths_walk_objects_maps_lists_and_tuples() {
    assert_eq!(val("order.items[0].price"), Value::Float(3.5));
    assert_eq!(val("order.items[-1].sku"), Value::str("C3"));
    assert_eq!(val(r#"order.meta["region"]"#), Value::str("eu"));
    assert_eq!(val("order.meta.region"), Value::str("eu"));
    assert_eq!(val("order.meta[7]"), Value::str("seven"));
    assert_eq!(val("order.meta[key]"), Value::str("eu"));
    assert_eq!(val("order.items[i].sku"), Value::str("B2"));
    assert_eq!(val("pair.1"), Value::str("one"));
    assert_eq!(val("pair[0]"), Value::Int(1));
    assert_eq!(val(r#"order["id"]"#), Value::Int(42));
    assert_eq!(val("order?.items?.len()"), Value::Int(3));
    assert_eq!(val("[10, 20, 30][1]"), Value::Int(20));
    assert_eq!(val("[amount, 2][0]"), Value::Int(1500));
}

#[test]
fn missing_fields_out_of_range_indexes_and_null_links_read_as_null() {
    for src in [
        "nosuch",
        "order.nosuch",
        "order.items[3]",
        "order.items[-4]",
        "order.note.deeper.still",
        "empty.x[0]",
        "status.length",
        "amount[0]",
        "order.meta[missing_key_field]",
        "span.nosuch",
    ] {
        assert_eq!(val(src), Value::Null, "{src}");
    }
    assert!(!yes("nosuch.x == 1"));
    assert!(yes("nosuch == null && order.note == null"));
}

#[test]
fn a_cut_value_in_the_middle_of_a_path_is_reported_with_its_depth() {
    let err = eval("order.customer.name").unwrap_err();
    assert_eq!(err.code(), "truncated");
    assert_eq!(
        err.to_string(),
        "value was truncated at depth 2; `order.customer` is a Customer with 4 children that capture limits left out \
         (depth limit), so the path cannot look inside it"
    );
    // A watch on the cut value itself shows the marker; comparing with null is decidable.
    assert!(matches!(val("order.customer"), Value::Cut(_)));
    assert!(yes("order.customer != null"));
    assert_eq!(val("len(order.customer)"), Value::Int(4));
    let err = cond(r#"order.customer == "x""#).unwrap_err();
    assert!(err.to_string().contains("so \"==\" cannot use it"), "{err}");
}

#[test]
fn reading_past_what_capture_limits_kept_is_unknown_rather_than_null() {
    assert_eq!(val("trunc_list[1]"), Value::Int(2));
    assert_eq!(val("trunc_list[9]"), Value::Null);
    let err = eval("trunc_list[3]").unwrap_err();
    assert!(err.to_string().contains("is not among the 2 of 5 items"), "{err}");
    assert!(eval("trunc_list[-1]").is_err(), "the real last item was not captured");
    assert!(eval("wide.b").is_err(), "b may be one of the 5 omitted fields");
    assert_eq!(val("wide.a"), Value::Int(1));
    assert_eq!(val("len(trunc_list)"), Value::Int(5));
    assert_eq!(val("len(long)"), Value::Int(300));
    assert!(yes("2 in trunc_list"));
    assert!(cond("4 in trunc_list").is_err());
}

#[test]
fn shortened_strings_answer_only_what_their_kept_part_decides() {
    assert!(yes(r#"long != "abc""#), "lengths differ");
    assert!(yes(r#"long.starts_with("abc")"#));
    assert!(!yes(r#"long.starts_with("xyz")"#));
    assert!(yes(r#"long > "abb" && long < "abd""#));
    assert!(yes(r#""bcd" in long"#));
    assert!(cond(r#""zzz" in long"#).is_err());
    assert!(cond(r#"long.ends_with("f")"#).is_err());
    assert_eq!(val("lower(long)"), Value::Str(Text { value: "abcdef".into(), original_len: Some(300) }));
}

#[test]
fn type_mismatches_name_the_operator_and_both_types() {
    let err = cond("status > amount").unwrap_err();
    assert_eq!(err.to_string(), "`>` cannot be applied to string and int (in `status > amount`)");
    assert_eq!(err.code(), "type_mismatch");
    let err = eval("status + amount").unwrap_err();
    assert_eq!(err.to_string(), "`+` cannot be applied to string and int (in `status + amount`)");
    let err = cond("!amount").unwrap_err();
    assert_eq!(err.to_string(), "`!` cannot be applied to int (in `!amount`)");
    let err = cond("amount && flag").unwrap_err();
    assert_eq!(err.to_string(), "`&&` cannot be applied to int (in `amount`)");
    let err = cond("status == amount").unwrap_err();
    assert_eq!(err.code(), "type_mismatch");
    let err = eval("lower(amount)").unwrap_err();
    assert_eq!(err.to_string(), "`lower` expects a string, got int (in `lower(amount)`)");
    let err = cond("amount in status").unwrap_err();
    assert_eq!(err.to_string(), "`in` cannot be applied to int and string (in `amount in status`)");
    let err = eval("order.items[flag]").unwrap_err();
    assert_eq!(err.code(), "bad_operand");
}

#[test]
fn operators_applied_to_literals_of_the_wrong_type_are_refused_at_parse_time() {
    let cases = [
        (r#""abc" > 3"#, 7, "\">\" cannot compare a string with a number"),
        (r#"x == 1 && "a" + 1 > 0"#, 15, "\"+\" cannot be applied to a string and a number"),
        ("!5", 1, "\"!\" needs true or false, but its operand is a number"),
        ("x || (!5)", 6, "\"!\" needs true or false, but its operand is a number"),
        ("not 'a'", 1, "\"not\" needs true or false, but its operand is a string"),
        ("lower(5)", 7, "\"lower\" expects a string, but this argument is a number"),
        ("x && 3", 6, "\"&&\" needs true or false on each side, but this operand is a number"),
        ("3 in 5", 3, "\"in\" looks inside a list, map, object or string, but its right side is a number"),
        ("true < false", 6, "\"<\" cannot compare a bool with a bool"),
        ("a[true]", 3, "an index must be a number or a string, found bool"),
    ];
    for (src, column, message) in cases {
        let err = perr(src);
        assert_eq!((err.column, err.message.as_str()), (column, message), "{src}");
    }
}

#[test]
fn null_is_false_in_boolean_positions_and_ordering_with_it_is_false() {
    assert!(!yes("empty"));
    assert!(!yes("nosuch"));
    assert!(yes("!empty && not nosuch"));
    assert!(!yes("nosuch > 1") && !yes("nosuch < 1") && !yes("nosuch >= 1"));
    assert!(yes("!(nosuch > 1)"));
    assert!(yes("null == null && empty == null && amount != null"));
    assert!(!yes("empty && 1/0 > 0"), "&& stops at the first false");
    assert_eq!(val("nosuch + 1"), Value::Null);
    assert_eq!(val("-nosuch"), Value::Null);
}

#[test]
fn and_and_or_short_circuit() {
    assert!(!yes("flag == false && status > 3"));
    assert!(yes("flag || status > 3"));
    assert!(cond("flag && status > 3").is_err());
}

#[test]
fn in_looks_inside_lists_strings_maps_and_objects() {
    assert!(yes("amount in [1, 1500, 3]"));
    assert!(yes(r#"status in ["ok", "failed"]"#));
    assert!(yes(r#""Love" in name"#));
    assert!(!yes(r#""love" in name"#));
    assert!(yes(r#""region" in order.meta && 7 in order.meta"#));
    assert!(yes(r#""items" in order && !("nosuch" in order)"#));
    assert!(yes(r#""x" in order.tags && "z" not in order.tags"#));
    assert!(yes("amount in [status, amount]"));
    assert!(!yes("nosuch in [1, 2]"));
    assert!(!yes("1 in nosuch"));
    // Items of another type are simply not it.
    assert!(!yes(r#"1 in ["1", true, null]"#));
    assert!(yes(r#"contains(order.tags, "y") && order.tags.contains("x")"#));
}

#[test]
fn string_helpers_work_as_functions_and_as_methods() {
    assert!(yes(r#"contains(name, "Love") && name.contains("Ada")"#));
    assert!(yes(r#"starts_with(name, "Ada") && name.starts_with("") && !name.starts_with("Bob")"#));
    assert!(yes(r#"ends_with(name, "lace") && name.ends_with("Lovelace")"#));
    assert!(yes("len(name) == 12 && name.len() == 12 && order.items.len() == 3 && len(order.meta) == 3"));
    assert_eq!(val("lower(city)"), Value::str("école zürich"));
    assert_eq!(val("city.lower().len()"), Value::Int(12));
    assert!(yes(r#"lower(name).starts_with("ada")"#));
    assert_eq!(val("len(nosuch)"), Value::Null);
    assert_eq!(val("lower(nosuch)"), Value::Null);
    assert!(!yes(r#"starts_with(nosuch, "a")"#));
}

#[test]
fn not_binds_looser_than_comparison_while_bang_binds_tighter() {
    assert!(yes(r#"not status == "ok""#));
    let err = perr(r#"!status == "ok""#);
    assert_eq!(err.message, "\"==\" cannot compare a bool with a string", "`!status == ...` compares a bool");
    assert!(yes("not flag == false"));
    assert!(yes("!flag == false"));
    assert!(yes("not not flag"));
}

#[test]
fn arithmetic_follows_documented_rules() {
    assert_eq!(val("7 / 2"), Value::Float(3.5));
    assert_eq!(val("7 % 3"), Value::Int(1));
    assert_eq!(val("-7 % 3"), Value::Int(-1));
    assert_eq!(val("2 + 3 * 4 - 1"), Value::Int(13));
    assert_eq!(val("(2 + 3) * 4"), Value::Int(20));
    assert_eq!(val("amount * 2 + price"), Value::Float(3009.5));
    assert_eq!(val("big - 1"), Value::UInt(u64::MAX - 1));
    assert_eq!(val("-9223372036854775808"), Value::Int(i64::MIN));
    assert_eq!(val(r#"status + "!""#), Value::str("failed!"));
    assert_eq!(val("5.5 % 2"), Value::Float(1.5));
    let err = eval("amount / 0").unwrap_err();
    assert_eq!(err.to_string(), "division by zero (in `amount / 0`)");
    assert_eq!(eval("amount % 0").unwrap_err().code(), "division_by_zero");
    assert_eq!(eval("big + 1").unwrap_err().to_string(), "`+` overflowed the integer range (in `big + 1`)");
    assert_eq!(eval("big * big").unwrap_err().code(), "overflow");
}

#[test]
fn structural_equality_compares_lists_maps_and_objects() {
    assert!(yes(r#"order.tags == ["x", "y"]"#));
    assert!(yes(r#"order.tags != ["x"]"#));
    assert!(yes(r#"order.tags != ["x", 1]"#));
    assert!(yes("order.items[0] == order.items[0] && order.items[0] != order.items[1]"));
    assert!(cond("trunc_list == [1, 2, 3, 4, 5]").is_err(), "the omitted items decide");
    assert!(yes("trunc_list != [1, 2]"), "the lengths already differ");
}

#[test]
fn nan_is_unordered() {
    let scope = SimpleScope::new().with_field("x", f64::NAN);
    let c = |src: &str| parse_condition(src).unwrap().eval_condition(&scope, &mut Budget::default()).unwrap();
    assert!(!c("x == x") && c("x != x") && !c("x < 1") && !c("x >= 1"));
}

#[test]
fn span_paths_prefer_a_named_span_then_search_innermost_first() {
    assert_eq!(val("span.request.method"), Value::str("GET"));
    assert_eq!(val("span.request.user_id"), Value::Int(9), "a span named request wins");
    assert_eq!(val("span.user_id"), Value::Int(5), "innermost span that has the field");
    assert_eq!(val("span.request"), Value::str("inner-field"), "a single name is always a field");
    assert_eq!(val("span.handler.method"), Value::Null, "the named span has no such field");
    assert_eq!(val("span.method"), Value::str("GET"));
    assert_eq!(val(r#"span["request"]["method"]"#), Value::str("GET"));
}

#[test]
fn a_dotted_field_name_recorded_by_tracing_is_found_by_its_path() {
    assert_eq!(val("user.id"), Value::Int(7));
    assert!(yes("user.id == 7"));
    let scope =
        SimpleScope::new().with_field("user", obj("User", vec![("id", Value::Int(1))])).with_field("user.id", 7_i64);
    let e = Expr::parse("user.id").unwrap();
    assert_eq!(e.eval(&scope, &mut Budget::default()).unwrap(), Value::Int(1), "a real field wins over a dotted name");
}

#[test]
fn roots_list_everything_an_expression_may_read() {
    let e = parse_condition(r#"user.id == 7 && order.items[idx].price > 3 && span.request.user_id in ids"#).unwrap();
    let r = e.roots();
    assert_eq!(r.fields, ["ids", "idx", "order", "order.items", "user", "user.id"]);
    assert_eq!(r.span_names, ["request"]);
    assert_eq!(r.span_fields, ["request", "request.user_id", "user_id"]);
    assert!(r.uses_spans() && r.reads_field("idx") && !r.reads_field("price"));
    assert!(Expr::parse("1 + 2").unwrap().roots().is_empty());
}

#[test]
fn the_redaction_name_of_an_expression_is_its_last_path_name() {
    let name = |s: &str| Expr::parse(s).unwrap().field_name().map(str::to_owned);
    assert_eq!(name("user.email").as_deref(), Some("email"));
    assert_eq!(name(r#"headers["authorization"]"#).as_deref(), Some("authorization"));
    assert_eq!(name("lower(user.password)").as_deref(), Some("password"));
    assert_eq!(name("token").as_deref(), Some("token"));
    assert_eq!(name("items[0]"), None);
    assert_eq!(name("a + b"), None);
}

#[test]
fn parse_errors_point_at_the_position_and_say_what_was_expected() {
    let cases: &[(&str, u32, &str)] = &[
        ("status == \"failed\" &&", 22, "expected an operand after \"&&\", found end of input"),
        ("", 1, "expected an expression, found end of input"),
        ("a b", 3, "expected an operator or end of input, found \"b\""),
        ("(a == 1", 8, "expected \")\" to close the \"(\" at column 1, found end of input"),
        ("a == 1)", 7, "expected an operator or end of input (this closing bracket has no opening one), found \")\""),
        ("a.", 3, "expected a field name after \".\", found end of input"),
        ("a[1", 4, "expected \"]\" to close the \"[\" at column 2, found end of input"),
        ("[1, 2", 6, "expected \",\" or \"]\" to close the list opened at column 1, found end of input"),
        ("len(a b)", 7, "expected \",\" or \")\" to close the list opened at column 4, found \"b\""),
        ("a > and", 5, "expected an operand after \">\", found \"and\""),
        ("a == 1 or", 10, "expected an operand after \"or\", found end of input"),
        ("x = 1", 3, "expected \"==\" to compare for equality, found \"=\""),
        ("x & y", 3, "expected \"&&\" (logical and), found \"&\""),
        ("a # b", 3, "expected an operand or an operator, found \"#\""),
        (
            "span",
            5,
            "expected \".\" and a field name after \"span\" (span.<field> or span.<span name>.<field>), found end of input",
        ),
        ("f(1)", 1, "unknown function \"f\"; the functions are contains, starts_with, ends_with, len, lower"),
        ("a.upper()", 3, "unknown method \"upper\"; the functions are contains, starts_with, ends_with, len, lower"),
        ("len(a, b)", 1, "function \"len\" takes 1 argument, found 2"),
        ("contains(a)", 1, "function \"contains\" takes 2 arguments, found 1"),
        ("a.len(1)", 3, "method \"len\" takes 0 arguments besides the value it is called on, found 1"),
        (
            "a < b < c",
            7,
            "comparisons cannot be chained: \"<\" follows a comparison; join them with \"&&\", as in a < b && b < c",
        ),
        (
            "a in b in c",
            8,
            "comparisons cannot be chained: \"in\" follows a comparison; join them with \"&&\", as in a < b && b < c",
        ),
        ("'abc", 1, "unterminated string: expected a closing ' for the string that starts here"),
        (r#""a\qb""#, 3, "unknown escape \"\\q\" in string; write \\\\ for a backslash"),
    ];
    for (src, column, message) in cases {
        let err = perr(src);
        assert_eq!((err.column, err.message.as_str()), (*column, *message), "{src:?}");
        assert_eq!(err.to_string(), format!("at column {column}: {message}"));
    }
    let err = perr("a &&");
    assert_eq!(
        (err.position, err.expected.as_str(), err.found.as_str()),
        (4, "an operand after \"&&\"", "end of input")
    );
}

#[test]
fn positions_count_characters_in_multibyte_source_and_lines_in_multiline_source() {
    let src = r#"name == "日本語" &&"#;
    let err = perr(src);
    assert_eq!(err.position, src.len());
    assert_eq!(err.column, 17);
    let err = perr("größe > 1 &&\n  (a ||");
    assert_eq!((err.line, err.column), (2, 8));
    assert!(err.to_string().starts_with("at line 2, column 8: "), "{err}");
    assert_eq!(val("größe"), Value::Null, "non-ASCII names are names");
}

#[test]
fn the_caret_rendering_stays_short_on_long_lines() {
    let src = format!("{} && ", "a == 1 && ".repeat(60));
    let err = perr(&src);
    let shown = err.render(&src);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 3, "{shown}");
    assert!(lines[0].chars().count() <= 82, "{}", lines[0]);
    let caret = lines[1].find('^').unwrap();
    assert_eq!(lines[0].chars().skip(caret).take(2).collect::<String>(), "&&", "{shown}");
    let src = "é == \"ü\" @";
    let shown = perr(src).render(src);
    assert_eq!(shown.lines().nth(1), Some("         ^"), "caret counts characters, not bytes");
}

#[test]
fn nesting_is_bounded_while_long_flat_alternatives_are_fine() {
    let deep = format!("{}a{}", "(".repeat(200), ")".repeat(200));
    assert!(perr(&deep).message.contains("nests more than 32 levels"));
    let ok = format!("{}a{}", "(".repeat(20), ")".repeat(20));
    assert!(Expr::parse(&ok).is_ok());
    assert!(perr(&"!".repeat(100)).message.contains("nests more than"));
    assert!(perr(&format!("{}1", "-".repeat(100))).message.contains("nests more than"));
    assert!(perr(&format!("a{}", " + a".repeat(40))).message.contains("nests more than"));
    assert!(perr(&format!("{}a{}", "len(".repeat(40), ")".repeat(40))).message.contains("nests more than"));
    assert!(perr(&format!("{}1{}", "[".repeat(40), "]".repeat(40))).message.contains("nests more than"));
    let flat = (0..80).map(|i| format!("x == {i}")).collect::<Vec<_>>().join(" || ");
    assert!(flat.len() < 1024);
    assert!(parse_condition(&flat).is_ok());
}

#[test]
fn sources_over_the_length_limit_are_refused() {
    let long = format!("a == \"{}\"", "x".repeat(2000));
    let err = perr(&long);
    assert_eq!(err.message, format!("source is {} bytes long; the limit is 1024 bytes", long.len()));
    assert!(Template::parse(&"x".repeat(1025)).is_err());
}

#[test]
fn a_condition_must_be_true_or_false_and_null_counts_as_false() {
    let err = cond("name").unwrap_err();
    assert_eq!(err.to_string(), "condition must be true or false, got string");
    assert!(!yes("nosuch"));
    let err = parse_condition("amount + 1").unwrap_err();
    assert_eq!(err.message, "this expression gives a number, but a condition (true or false) is needed");
    assert!(parse_condition(r#""yes""#).is_err());
    assert!(parse_condition("flag").is_ok());
}

#[test]
fn a_metric_value_is_a_number_or_no_sample() {
    let num = |src: &str| parse_numeric(src).unwrap().eval_number(&fixture(), &mut Budget::default());
    assert_eq!(num("amount").unwrap(), Some(1500.0));
    assert_eq!(num("amount / 1000").unwrap(), Some(1.5));
    assert_eq!(num("order.items[0].price * 2").unwrap(), Some(7.0));
    assert_eq!(num("nosuch").unwrap(), None);
    assert_eq!(num("name").unwrap_err().to_string(), "a metric value must be a number, got string");
    assert!(parse_numeric("a == 1").is_err());
    assert!(parse_numeric("lower(a)").is_err());
}

#[test]
fn evaluation_stops_when_its_step_budget_runs_out() {
    let e = parse_condition(r#"status == "ok" || amount > 1 || name.contains("x")"#).unwrap();
    let mut full = Budget::default();
    assert!(e.eval_condition(&fixture(), &mut full).unwrap());
    let needed = full.used();
    assert!(needed > 3 && needed < 40, "{needed}");
    let mut tight = Budget::new(needed - 1);
    assert_eq!(e.eval_condition(&fixture(), &mut tight), Err(EvalError::BudgetExceeded { limit: needed - 1 }));
    let mut exact = Budget::new(needed);
    assert!(e.eval_condition(&fixture(), &mut exact).unwrap());
    assert_eq!(exact.remaining(), 0);
}

#[test]
fn scanning_long_text_costs_steps_in_proportion() {
    let scope = |n: usize| SimpleScope::new().with_field("s", "x".repeat(n));
    let cost = |n: usize| {
        let mut b = Budget::default();
        parse_condition(r#"s.contains("y")"#).unwrap().eval_condition(&scope(n), &mut b).unwrap();
        b.used()
    };
    assert!(cost(64_000) >= cost(10) + 1_000);
    let mut b = Budget::default();
    let err = parse_condition(r#"s.contains("y")"#).unwrap().eval_condition(&scope(1_000_000), &mut b);
    assert_eq!(err.unwrap_err().code(), "budget_exceeded");
}

#[test]
fn a_stored_hit_is_a_scope() {
    let hit: crate::Hit = serde_json::from_value(serde_json::json!({
        "action_id": "act_0123456789abcdef0123456789abcdef", "seq": 1, "time_ms": 0,
        "location": {"file": "a.rs", "line": 1},
        "fields": {"amount": {"type": "int", "value": 5}},
        "spans": [{"name": "checkout", "fields": {"cart": {"type": "string", "value": "c1"}}}]
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let e = parse_condition(r#"amount == 5 && span.checkout.cart == "c1" && span.cart == "c1""#).unwrap();
    assert!(e.eval_condition(&hit, &mut Budget::default()).unwrap());
}

#[test]
fn compiled_expressions_are_shareable_between_threads() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Expr>();
    shareable::<Template>();
    let e = parse_condition("amount > 1").unwrap();
    let handle = std::thread::spawn(move || e.eval_condition(&fixture(), &mut Budget::default()));
    assert!(handle.join().unwrap().unwrap());
}

fn render(src: &str) -> Rendered {
    Template::parse(src)
        .unwrap_or_else(|e| panic!("{src}: {e}"))
        .render(&fixture(), &mut Budget::default(), |_, _, _| {})
        .unwrap()
}

#[test]
fn a_template_renders_each_placeholder_after_the_caller_redacts_it() {
    let t = Template::parse("user {user.id} paid {amount} for {order.id} by {name}").unwrap();
    assert_eq!(
        t.placeholders().iter().map(Expr::source).collect::<Vec<_>>(),
        ["user.id", "amount", "order.id", "name"]
    );
    assert!(t.roots().reads_field("amount") && t.roots().reads_field("name"));
    let mut seen = Vec::new();
    let out = t
        .render(&fixture(), &mut Budget::default(), |i, expr, v| {
            seen.push((i, expr.field_name().map(str::to_owned)));
            if expr.field_name() == Some("name") {
                *v = Value::str("[redacted]");
            }
        })
        .unwrap();
    assert_eq!(out.text, "user 7 paid 1500 for 42 by [redacted]");
    assert!(out.errors.is_empty() && !out.truncated);
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3], (3, Some("name".to_owned())));
}

#[test]
fn template_values_render_plainly_and_containers_compactly() {
    assert_eq!(render("{price} {flag} {empty} {status}").text, "9.5 true null failed");
    assert_eq!(
        render("{order}").text,
        "Order{id: 42, items: [..3 items], customer: <truncated Customer>, tags: [..2 items], meta: {..3 entries}, note: null}"
    );
    assert_eq!(render("{order.tags}").text, r#"["x", "y"]"#);
    assert_eq!(render("{long}").text, "abcdef…");
    assert_eq!(render("{{literal}} {amount > 1000} }}").text, "{literal} true }");
    assert_eq!(render(r#"{order.meta["region"]}|{ "}" }"#).text, "eu|}");
}

#[test]
fn a_failing_placeholder_renders_inline_and_is_reported_without_losing_the_line() {
    let out = render("a={amount} c={order.customer.name} s={status > 1}");
    assert_eq!(out.errors.len(), 2);
    assert_eq!(out.errors[0].index, 1);
    assert_eq!(out.errors[1].error.code(), "type_mismatch");
    assert!(out.text.starts_with("a=1500 c={order.customer.name: value was truncated at depth 2;"), "{}", out.text);
    assert!(
        out.text.ends_with(" s={status > 1: `>` cannot be applied to string and int (in `status > 1`)}"),
        "{}",
        out.text
    );
}

#[test]
fn a_template_out_of_budget_abandons_the_line() {
    let t = Template::parse("{amount} {amount} {amount}").unwrap();
    let err = t.render(&fixture(), &mut Budget::new(4), |_, _, _| {}).unwrap_err();
    assert_eq!(err.code(), "budget_exceeded");
}

#[test]
fn a_rendered_line_is_bounded() {
    let scope = SimpleScope::new().with_field("s", "é".repeat(5_000));
    let t = Template::parse("{s}{s}{s}{s}{s}{s}{s}{s}{s}{s}{s}{s}").unwrap();
    let out = t.render(&scope, &mut Budget::default(), |_, _, _| {}).unwrap();
    assert!(out.truncated);
    assert!(out.text.len() <= Template::MAX_LINE_BYTES + '…'.len_utf8());
    assert!(out.text.ends_with('…'));
}

#[test]
fn template_errors_point_into_the_template() {
    let cases: &[(&str, u32, &str)] = &[
        ("paid {amount >} ok", 15, "expected an operand after \">\", found end of input"),
        (
            "paid {amount",
            6,
            "unclosed placeholder: expected \"}\" to close the \"{\" here (write \"{{\" for a literal brace)",
        ),
        ("paid } ok", 6, "unmatched \"}\"; write \"}}\" for a literal brace"),
        ("paid { } ok", 8, "expected an expression inside \"{}\", found \"}\""),
        ("paid {a {b}}", 9, "placeholders cannot contain \"{\"; close the previous placeholder with \"}\" first"),
        (
            "prix {montant} € {nom(x)}",
            19,
            "unknown function \"nom\"; the functions are contains, starts_with, ends_with, len, lower",
        ),
    ];
    for (src, column, message) in cases {
        let err = Template::parse(src).unwrap_err();
        assert_eq!((err.column, err.message.as_str()), (*column, *message), "{src:?}");
    }
    let src = "line one\nuser {user.id ==} x";
    let err = Template::parse(src).unwrap_err();
    assert_eq!((err.line, err.column), (2, 17));
    assert!(err.render(src).starts_with("user {user.id ==} x\n                ^\n"), "{}", err.render(src));
}

fn spec(kind: ActionKind, condition: Option<&str>) -> ActionSpec {
    ActionSpec {
        id: ActionId::generate(),
        location: Location { file: "shop.rs".into(), line: 3 },
        condition: condition.map(str::to_owned),
        expires_at_ms: 0,
        kind,
        function: None,
        expect: None,
    }
}

#[test]
fn an_action_is_compiled_whole_and_a_bad_part_is_named() {
    let snap = |watch: Vec<&str>| {
        ActionKind::Snapshot(SnapshotSpec {
            max_hits: 1,
            watch: watch.into_iter().map(str::to_owned).collect(),
            backtrace: false,
        })
    };
    let ok = ActionExprs::compile(&spec(snap(vec!["order.id", "span.user_id"]), Some("amount > 1"))).unwrap();
    assert_eq!(ok.watches.len(), 2);
    assert_eq!(ok.roots.fields, ["amount", "order", "order.id"]);
    assert!(ok.roots.uses_spans());

    let err = ActionExprs::compile(&spec(snap(vec!["order.id", "order."]), None)).unwrap_err();
    assert_eq!(err.to_string(), "watch[1]: at column 7: expected a field name after \".\", found end of input");
    let err = ActionExprs::compile(&spec(snap(vec![]), Some("amount +"))).unwrap_err();
    assert_eq!(err.field, "condition");

    let log = ActionKind::Log(LogSpec {
        template: "paid {amount".into(),
        level: Default::default(),
        destination: Default::default(),
        max_lines: None,
    });
    assert_eq!(ActionExprs::compile(&spec(log, None)).unwrap_err().field, "template");

    let metric = |expression: Option<&str>| {
        ActionKind::Metric(MetricSpec {
            metric: MetricKind::Value,
            expression: expression.map(str::to_owned),
            end_location: None,
            report_interval_ms: 1000,
        })
    };
    assert!(ActionExprs::compile(&spec(metric(Some("amount / 100")), None)).unwrap().value.is_some());
    assert_eq!(ActionExprs::compile(&spec(metric(Some("amount > 1")), None)).unwrap_err().field, "expression");
    assert_eq!(ActionExprs::compile(&spec(metric(None), None)).unwrap_err().field, "expression");
}

#[test]
fn watches_return_owned_copies_of_what_they_read() {
    let v = val("order.items[1]");
    assert_eq!(v, obj("Item", vec![("sku", Value::str("B2")), ("price", Value::Int(10))]));
    assert_eq!(val("[amount, status]"), list(vec![Value::Int(1500), Value::str("failed")]));
    assert_eq!(display_value(&v, 100), "Item{sku: \"B2\", price: 10}");
}

#[test]
fn the_deepest_accepted_expressions_parse_and_evaluate_within_a_default_thread_stack() {
    let shapes: [fn(usize) -> String; 5] = [
        |n| format!("{}flag{}", "(".repeat(n), ")".repeat(n)),
        |n| format!("{}flag", "!".repeat(n)),
        |n| format!("amount{}", " + 1".repeat(n)),
        |n| format!("{}name{}", "lower(".repeat(n), ")".repeat(n)),
        |n| format!("{}amount{}", "[".repeat(n), "]".repeat(n)),
    ];
    let deepest: Vec<String> = shapes
        .iter()
        .map(|shape| {
            let n = (1..200).take_while(|n| Expr::parse(&shape(*n)).is_ok()).last().unwrap();
            assert!((MAX_NESTING - 4..=MAX_NESTING).contains(&n), "{}: {n}", shape(1));
            shape(n)
        })
        .collect();
    let worker = std::thread::Builder::new()
        // 2 MiB is what `std::thread::spawn` and tokio give a thread; even unoptimized
        // builds must fit in it.
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            for src in deepest {
                let e = Expr::parse(&src).unwrap();
                let _ = e.eval(&fixture(), &mut Budget::default());
                let _ = e.eval_condition(&fixture(), &mut Budget::default());
            }
        })
        .unwrap();
    worker.join().unwrap();
}

#[test]
fn hostile_counts_and_extreme_literals_do_not_overflow() {
    assert_eq!(val("- -9223372036854775808"), Value::UInt(9_223_372_036_854_775_808));
    assert_eq!(val("-(-9223372036854775808)"), Value::UInt(9_223_372_036_854_775_808));
    let huge = Value::List(List { type_name: None, items: vec![Value::Int(1)], omitted: u64::MAX });
    let scope = SimpleScope::new().with_field("l", huge.clone()).with_field("m", huge);
    let e = |src: &str| Expr::parse(src).unwrap().eval(&scope, &mut Budget::default());
    assert_eq!(e("len(l)").unwrap(), Value::UInt(u64::MAX));
    assert_eq!(e("l == m").unwrap_err().code(), "truncated");
    assert_eq!(e("l[-1]").unwrap_err().code(), "truncated");
    let t = Template::parse("{l}").unwrap();
    assert!(t.render(&scope, &mut Budget::default(), |_, _, _| {}).unwrap().text.contains("more"));
}

#[test]
fn errors_quote_parenthesized_operands_whole() {
    let err = eval("(status + amount) * 2").unwrap_err();
    assert_eq!(err.to_string(), "`+` cannot be applied to string and int (in `(status + amount)`)");
    let err = eval("(amount + 1) / (amount - 1500)").unwrap_err();
    assert_eq!(err.to_string(), "division by zero (in `(amount + 1) / (amount - 1500)`)");
}

/// A scope as the agent builds it after redaction: `api_token`, `password` and `cvv`
/// were hidden whole by key-name rules, `email` by a value rule, `note` only in part,
/// `user.credentials` (an object) whole.
fn redacted_scope() -> SimpleScope {
    SimpleScope::new()
        .with_field("api_token", "[REDACTED:TOKEN]")
        .with_field("password", "[REDACTED:PASSWORD]")
        .with_field("cvv", "[REDACTED:CVV]")
        .with_field("email", "[REDACTED:EMAIL]")
        .with_field("note", "call [REDACTED:PHONE] after 5pm")
        .with_field("amount", 12_i64)
        .with_field(
            "user",
            obj(
                "User",
                vec![
                    ("name", Value::str("Ada")),
                    ("credentials", Value::str("[REDACTED:CREDENTIALS]")),
                    ("cards", list(vec![Value::str("[REDACTED:CREDIT_CARD]")])),
                ],
            ),
        )
        .with_span("request", vec![Field::new("session", Value::str("[REDACTED:SESSION]"))])
}

fn on_redacted(src: &str) -> Result<Value, EvalError> {
    Expr::parse(src).unwrap_or_else(|e| panic!("{src}: {e}")).eval(&redacted_scope(), &mut Budget::default())
}

#[test]
fn a_redacted_value_can_be_shown_and_compared_with_null_and_nothing_else() {
    // Shown as its marker, as a client sees it.
    assert_eq!(on_redacted("password").unwrap(), Value::str("[REDACTED:PASSWORD]"));
    assert_eq!(
        on_redacted("[password, amount]").unwrap(),
        list(vec![Value::str("[REDACTED:PASSWORD]"), Value::Int(12)])
    );
    assert_eq!(on_redacted("password != null").unwrap(), Value::Bool(true));
    assert_eq!(on_redacted("null == span.session").unwrap(), Value::Bool(false));
    assert_eq!(on_redacted("\"credentials\" in user").unwrap(), Value::Bool(true), "field names are structure");
    assert_eq!(on_redacted("len(user.cards)").unwrap(), Value::Int(1), "counting items reads no item");
    // Every attack shape fails the same way, naming the marker and never the value.
    for src in [
        "len(api_token)",
        "api_token.len()",
        "starts_with(api_token, \"a\")",
        "api_token.ends_with(\"z\")",
        "contains(api_token, \"a\")",
        "\"a\" in api_token",
        "api_token in [\"x\", \"y\"]",
        "password == \"hunter2\"",
        "password != \"hunter2\"",
        "\"hunter2\" == password",
        "password == \"[REDACTED:PASSWORD]\"",
        "password < \"m\"",
        "password >= \"m\"",
        "cvv + 0",
        "0 + cvv",
        "cvv * 1",
        "-cvv",
        "!cvv",
        "cvv && true",
        "password + \"\"",
        "lower(password)",
        "password[0]",
        "password.x",
        "user.credentials.user",
        "user.cards[0] == \"4111111111111111\"",
        "\"4111111111111111\" in user.cards",
        "user == user",
        "[password] == [\"hunter2\"]",
        "amount[password]",
        "starts_with(email, \"a\")",
        "span.session == \"s\"",
        "span.request.session.len()",
    ] {
        match on_redacted(src) {
            Err(EvalError::Redacted { marker, .. }) => assert!(marker.starts_with("[REDACTED:"), "{src}: {marker}"),
            other => panic!("{src} must fail as redacted, got {other:?}"),
        }
    }
    let err = on_redacted("len(api_token)").unwrap_err();
    assert_eq!(err.code(), "redacted");
    assert_eq!(
        err.to_string(),
        "`len(api_token)` reads a value that redaction hides ([REDACTED:TOKEN]); an expression may show a \
         redacted value or compare it with null, nothing else"
    );
}

#[test]
fn a_condition_or_metric_that_is_a_redacted_value_fails_rather_than_reading_it() {
    let scope = redacted_scope();
    let err = Expr::parse("password").unwrap().eval_condition(&scope, &mut Budget::default()).unwrap_err();
    assert_eq!(err.code(), "redacted");
    let err = Expr::parse("cvv").unwrap().eval_number(&scope, &mut Budget::default()).unwrap_err();
    assert_eq!(err.code(), "redacted");
    let err = parse_numeric("cvv + 0").unwrap().eval_number(&scope, &mut Budget::default()).unwrap_err();
    assert_eq!(err.code(), "redacted");
    // A false clause before it decides without reading it.
    assert!(
        !parse_condition("amount > 100 && password == \"x\"")
            .unwrap()
            .eval_condition(&scope, &mut Budget::default())
            .unwrap()
    );
}

#[test]
fn text_redacted_in_part_reads_as_the_client_sees_it() {
    assert_eq!(on_redacted("contains(note, \"after\")").unwrap(), Value::Bool(true));
    assert_eq!(on_redacted("contains(note, \"555\")").unwrap(), Value::Bool(false));
    assert_eq!(on_redacted("len(note)").unwrap(), Value::Int("call [REDACTED:PHONE] after 5pm".len() as i64));
}

#[test]
fn a_template_shows_a_redacted_value_as_its_marker_and_reports_any_other_use() {
    let out = Template::parse("pw={password} len={len(password)}")
        .unwrap()
        .render(&redacted_scope(), &mut Budget::default(), |_, _, _| {})
        .unwrap();
    assert!(out.text.starts_with("pw=[REDACTED:PASSWORD] len={len(password): "), "{}", out.text);
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.errors[0].error.code(), "redacted");
}

#[test]
fn every_eval_error_code_is_listed() {
    let errors = [
        EvalError::TypeMismatch { op: "+", left: "int", right: "string", expr: String::new() },
        EvalError::BadOperand { op: "!", operand: "int", expr: String::new() },
        EvalError::BadArgument { function: "len", expected: "a string", found: "int", expr: String::new() },
        EvalError::Truncated { path: String::new(), depth: None, detail: String::new() },
        EvalError::BudgetExceeded { limit: 1 },
        EvalError::DivisionByZero { expr: String::new() },
        EvalError::Overflow { op: "+", expr: String::new() },
        EvalError::TooDeep { expr: String::new() },
        EvalError::NotBoolean { found: "int" },
        EvalError::NotNumber { found: "string" },
        EvalError::Redacted { expr: String::new(), marker: String::new() },
    ];
    let codes: Vec<&str> = errors.iter().map(EvalError::code).collect();
    assert_eq!(codes, EvalError::CODES);
}
