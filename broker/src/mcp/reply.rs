//! Turning outcomes into tool results: the one place where an [`ApiError`] becomes an
//! error `CallToolResult`, and where tool arguments are parsed.
//!
//! Errors a model can act on are tool results with `isError: true`, the sentence from
//! the error as text, and `structuredContent: {"error": {"code", "message",
//! "details"}}` (the REST API's error body), so a model can branch on the stable code.
//! JSON-RPC errors are left for protocol faults (unknown tool, broken transport).

use rmcp::model::{CallToolResult, ContentBlock, JsonObject};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A successful result: a short text for the model plus the full JSON.
pub(crate) fn success(text: String, structured: serde_json::Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(structured);
    result
}

/// An error result a model can act on.
pub(crate) fn failure(error: &ApiError) -> CallToolResult {
    let mut result =
        CallToolResult::error(vec![ContentBlock::text(format!("{}: {}", error.code.as_str(), error.message))]);
    result.structured_content = Some(error.body());
    result
}

/// Either outcome, as a tool result.
pub(crate) fn respond(outcome: Result<CallToolResult, ApiError>) -> CallToolResult {
    outcome.unwrap_or_else(|e| failure(&e))
}

/// Parses a tool's arguments; a mistake is `invalid_input` naming the field and the
/// tool, so the model can fix its call (rather than a protocol error it cannot read).
pub(crate) fn parse_args<T: DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::Object(args)).map_err(|e| {
        ApiError::invalid(format!("invalid arguments for {tool}: {e}; the tool's input schema lists every argument"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        file: String,
        #[serde(default)]
        line: u32,
    }

    #[test]
    fn a_misspelled_argument_is_invalid_input_naming_it() {
        let args = serde_json::json!({"file": "a.rs", "lin": 3}).as_object().cloned().unwrap();
        let err = parse_args::<Args>("place_snapshot", args).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidInput);
        assert!(err.message.contains("`lin`") && err.message.contains("place_snapshot"), "{err}");
    }

    #[test]
    fn errors_become_tool_results_with_the_code_in_structured_content() {
        let result = failure(&ApiError::not_found("no action `act_x`"));
        assert_eq!(result.is_error, Some(true));
        let body = result.structured_content.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["error"]["message"], "no action `act_x`");
    }
}
