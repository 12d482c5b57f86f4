//! Prompts that start an investigation: a user picks one in their client and the model
//! gets a short plan in Periscope's terms (which tool, with what, in which order).
//! They only describe tool calls; the tools do the work and enforce every rule.

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{PromptMessage, Role};
use rmcp::{prompt, prompt_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::PeriscopeMcp;

/// Arguments of the `investigate` and `find_location` prompts.
#[derive(Debug, Deserialize, JsonSchema)]
struct SymptomArgs {
    /// What is wrong, in the user's words, e.g. "checkout totals are off for EU orders".
    symptom: String,
    /// The service or pool to look in, when known, e.g. `shop`.
    service: Option<String>,
}

/// Arguments of the `summarize_hits` prompt.
#[derive(Debug, Deserialize, JsonSchema)]
struct SummarizeArgs {
    /// The action whose hits to summarize (`act_…`).
    action_id: String,
}

/// Arguments of the `inspect_location` prompt (each completes: `completion/complete`).
#[derive(Debug, Deserialize, JsonSchema)]
struct LocationArgs {
    /// The pool, e.g. `shop`.
    pool: String,
    /// Tags the agents must carry, comma-separated, e.g. `region:eu,env:canary`.
    tags: Option<String>,
    /// The source file, e.g. `demo/src/shop.rs`.
    file: String,
    /// The line, e.g. `504`.
    line: String,
}

fn scope_hint(service: Option<&str>) -> String {
    match service.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => format!(" Look in `{s}` (as a pool, or a service name: use list_agents to tell which)."),
        None => String::new(),
    }
}

// `#[prompt]` generates public attribute functions without docs; the prompts' own docs
// are their descriptions.
#[allow(missing_docs)]
#[prompt_router(vis = "pub(super)")]
impl PeriscopeMcp {
    /// Investigate a symptom in a running service with Periscope: find where to look,
    /// capture values there, and explain what they show.
    #[prompt(name = "investigate")]
    async fn investigate(&self, Parameters(args): Parameters<SymptomArgs>) -> Vec<PromptMessage> {
        let text = format!(
            "Investigate this problem in the running services with the Periscope tools: {symptom}.{hint}\n\n\
             1. list_agents to see which services and pools are connected.\n\
             2. list_sources with a `query` or `name` built from the symptom's key words (function names, field \
             names like user_id or total) to find inspectable locations; prefer ones with a rising `hits` count \
             and fields that bear on the symptom.\n\
             3. place_snapshot on the best location (pool or agent_ids, file, line; max_hits 3 to 5) and let it \
             wait for the hits.\n\
             4. Read the captured fields and span stack. Say what the values show, quoting them, and whether they \
             confirm or rule out a cause. Note truncation markers (<cut: …>, …+N more) and redactions instead of \
             guessing what they hid.\n\
             5. If the snapshot expires without hits, follow the error's advice (another line, a longer timeout).\n\
             Remove actions you no longer need with remove_action.",
            symptom = args.symptom.trim(),
            hint = scope_hint(args.service.as_deref()),
        );
        vec![PromptMessage::new_text(Role::User, text)]
    }

    /// Find the code locations where a symptom can be observed, without placing anything.
    #[prompt(name = "find_location")]
    async fn find_location(&self, Parameters(args): Parameters<SymptomArgs>) -> Vec<PromptMessage> {
        let text = format!(
            "Find where in the running code this can be observed: {symptom}.{hint}\n\n\
             Use list_agents, then list_sources with `query`, `name` and `file` filters built from the symptom. \
             Propose up to three locations as file:line with the span or event name, the fields available there, \
             how often each is hit, and why each would show the problem. Do not place any action yet.",
            symptom = args.symptom.trim(),
            hint = scope_hint(args.service.as_deref()),
        );
        vec![PromptMessage::new_text(Role::User, text)]
    }

    /// Capture what happens at one code location: a snapshot on a pool's agents at a
    /// file and line, explained.
    #[prompt(name = "inspect_location")]
    async fn inspect_location(&self, Parameters(args): Parameters<LocationArgs>) -> Vec<PromptMessage> {
        let tags: Vec<String> = args
            .tags
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| format!("\"{t}\""))
            .collect();
        let text = format!(
            "Call place_snapshot with {{\"pool\": \"{pool}\", \"tags\": [{tags}], \"file\": \"{file}\", \"line\": \
             {line}, \"max_hits\": 3}} and wait for the hits. Then say what the captured fields and span stack \
             show at {file}:{line}, quoting values, noting truncation and redaction markers as such. If the \
             location is unknown, use the nearest locations the error lists.",
            pool = args.pool.trim(),
            tags = tags.join(", "),
            file = args.file.trim(),
            line = args.line.trim().parse::<u32>().unwrap_or(0),
        );
        vec![PromptMessage::new_text(Role::User, text)]
    }

    /// Summarize the hits an action collected.
    #[prompt(name = "summarize_hits")]
    async fn summarize_hits(&self, Parameters(args): Parameters<SummarizeArgs>) -> Vec<PromptMessage> {
        let text = format!(
            "Call get_action with {{\"action_id\": \"{id}\", \"since\": 0}} (repeat with since=next_cursor while \
             has_more) and summarize the hits: how many, from which agents, over what time; the values that stay \
             the same and the ones that vary, quoting them; anything unusual. Mention truncated or redacted \
             values as such. If the action is still active and more hits would help, say so.",
            id = args.action_id.trim(),
        );
        vec![PromptMessage::new_text(Role::User, text)]
    }
}
