//! Pieces shared by the targets: captured values built from fuzz bytes, and checks.

#![allow(dead_code)]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use periscope_protocol::{CaptureLimits, Cut, CutReason, Field, List, Map, Object, Text, Value};

/// Names likely to be read by expressions and caught by the redaction name rules.
pub const NAMES: &[&str] =
    &["a", "b", "order", "user", "user.id", "id", "items", "status", "x", "password", "token", "email", "größe"];

/// A short string: mostly one of [`NAMES`], sometimes arbitrary.
pub fn name(u: &mut Unstructured) -> Result<String> {
    if u.ratio(3, 4)? { Ok((*u.choose(NAMES)?).to_owned()) } else { Ok(u.arbitrary::<&str>()?.to_owned()) }
}

/// A captured value of at most `depth` levels, including the hostile shapes an agent
/// could send (absurd omitted counts and original lengths, NaN, cuts).
pub fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let pick = if depth == 0 { u.int_in_range(0..=6)? } else { u.int_in_range(0..=9)? };
    Ok(match pick {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Int(u.arbitrary()?),
        3 => Value::UInt(u.arbitrary()?),
        4 => Value::Float(u.arbitrary()?),
        5 => Value::Str(Text { value: u.arbitrary::<&str>()?.to_owned(), original_len: u.arbitrary()? }),
        6 => Value::Cut(Cut {
            reason: *u.choose(&[CutReason::Depth, CutReason::Size, CutReason::Unsupported])?,
            type_name: u.arbitrary::<Option<&str>>()?.map(str::to_owned),
            size: u.arbitrary()?,
        }),
        7 => {
            let n = u.int_in_range(0..=6)?;
            let items = (0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?;
            Value::List(List {
                type_name: u.arbitrary::<Option<&str>>()?.map(str::to_owned),
                items,
                omitted: u.arbitrary()?,
            })
        }
        8 => {
            let n = u.int_in_range(0..=4)?;
            let entries = (0..n).map(|_| Ok((value(u, depth - 1)?, value(u, depth - 1)?))).collect::<Result<_>>()?;
            Value::Map(Map { type_name: None, entries, omitted: u.arbitrary()? })
        }
        _ => {
            let n = u.int_in_range(0..=5)?;
            let fields = (0..n).map(|_| Ok(Field::new(name(u)?, value(u, depth - 1)?))).collect::<Result<_>>()?;
            Value::Object(Object { type_name: name(u)?, fields, omitted: u.arbitrary()? })
        }
    })
}

/// Capture limits within the hard maxima, skewed small so that every cut happens.
pub fn limits(u: &mut Unstructured) -> Result<CaptureLimits> {
    if u.ratio(1, 3)? {
        return Ok(CaptureLimits::default());
    }
    let max = CaptureLimits::HARD_MAX;
    let small = |u: &mut Unstructured, hi: u32| -> Result<u32> {
        if u.ratio(3, 4)? { u.int_in_range(1..=hi.min(8)) } else { u.int_in_range(1..=hi) }
    };
    Ok(CaptureLimits {
        max_depth: small(u, max.max_depth)?,
        max_items: small(u, max.max_items)?,
        max_string_len: small(u, max.max_string_len)?,
        max_fields: small(u, max.max_fields)?,
        max_hit_bytes: u.int_in_range(256..=max.max_hit_bytes)?,
        max_frames: small(u, max.max_frames)?,
        frames_with_values: small(u, max.frames_with_values)?,
    })
}

/// JSON text of anything serializable; values compared this way treat NaN as equal to
/// itself (non-finite floats travel as strings).
pub fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| panic!("serializing a decoded value failed: {e}"))
}
