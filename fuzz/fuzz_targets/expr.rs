//! The expression language: parser, evaluator and templates over a fuzzed scope.
//!
//! Input: the source, then (after the first 0xFF byte, which UTF-8 never contains) the
//! bytes that build the scope. Checks: parse errors point inside the source on a
//! character boundary and render in a bounded message; evaluation never spends more
//! than its budget (plus one bounded step) and gives the same answer twice; a rendered
//! template line stays within its byte bound.

#![no_main]

mod common;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use periscope_protocol::expr::{self, Budget, Expr, ParseError, SimpleScope, Template};
use periscope_protocol::{Field, Value};

fn check_error(src: &str, err: &ParseError) {
    assert!(err.position <= src.len(), "{src:?}: {err:?}");
    assert!(src.is_char_boundary(err.position), "{src:?}: {err:?}");
    assert!(err.line >= 1 && err.column >= 1, "{err:?}");
    let shown = err.render(src);
    assert!(shown.lines().count() >= 3, "{shown}");
    assert!(shown.len() < 2_000, "a {}-byte error for a {}-byte source", shown.len(), src.len());
}

fn scope(u: &mut Unstructured) -> SimpleScope {
    let mut scope = SimpleScope::new();
    let mut build = || -> libfuzzer_sys::arbitrary::Result<()> {
        for _ in 0..u.int_in_range(0..=6)? {
            scope.fields.push(Field::new(common::name(u)?, common::value(u, 4)?));
        }
        for _ in 0..u.int_in_range(0..=3)? {
            let span = (*u.choose(&["request", "handler", "a"])?).to_owned();
            let fields = (0..u.int_in_range(0..=3)?)
                .map(|_| Ok(Field::new(common::name(u)?, common::value(u, 3)?)))
                .collect::<libfuzzer_sys::arbitrary::Result<_>>()?;
            scope.spans.push((span, fields));
        }
        Ok(())
    };
    let _ = build();
    scope
}

fuzz_target!(|data: &[u8]| {
    let (src, rest) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(src) = std::str::from_utf8(src) else { return };
    let scope = scope(&mut Unstructured::new(rest));

    match Expr::parse(src) {
        Ok(e) => {
            assert_eq!(e.source(), src);
            let _ = e.roots();
            let _ = e.field_name();
            for limit in [0, 7, Budget::DEFAULT_STEPS] {
                let mut b = Budget::new(limit);
                let first = e.eval(&scope, &mut b);
                assert!(b.used() <= limit.saturating_add(2_000), "{src:?}: used {} of {limit}", b.used());
                // Evaluation reads, never writes: the same scope gives the same answer.
                let second = e.eval(&scope, &mut Budget::new(limit));
                assert_eq!(format!("{first:?}"), format!("{second:?}"), "{src:?}");
                if let Ok(v) = &first {
                    let shown = expr::display_value(v, 64);
                    assert!(shown.len() <= 64 + 3, "{shown:?}");
                }
                let _ = e.eval_condition(&scope, &mut Budget::new(limit));
                let _ = e.eval_number(&scope, &mut Budget::new(limit));
            }
        }
        Err(err) => check_error(src, &err),
    }
    for parsed in [expr::parse_condition(src), expr::parse_watch(src), expr::parse_numeric(src)] {
        if let Err(err) = parsed {
            check_error(src, &err);
        }
    }
    match Template::parse(src) {
        Ok(t) => {
            let mut b = Budget::default();
            if let Ok(r) = t.render(&scope, &mut b, |_, _, v| *v = Value::Null) {
                assert!(r.text.len() <= Template::MAX_LINE_BYTES + 3, "{} bytes", r.text.len());
            }
            assert!(b.used() <= Budget::DEFAULT_STEPS + 2_000);
        }
        Err(err) => check_error(src, &err),
    }
});
