//! `server.json`, the description of the server that MCP registries list: it stays true
//! to this build and within the registry's rules.

use serde_json::Value;

#[test]
fn server_json_describes_this_version_within_the_registry_rules() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../server.json")).unwrap();
    let s: Value = serde_json::from_str(&text).unwrap();
    assert!(s["$schema"].as_str().unwrap().starts_with("https://static.modelcontextprotocol.io/schemas/"));
    // The registry's rules: a reverse-DNS namespace and a name, a short description, an
    // exact version (not "latest"), remotes with a transport and a URL whose template
    // variables are all described.
    let name = s["name"].as_str().unwrap();
    let (namespace, server) = name.split_once('/').unwrap();
    assert!(namespace.contains('.') && !server.is_empty(), "{name}");
    assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_/".contains(&b)), "{name}");
    let description = s["description"].as_str().unwrap();
    assert!((1..=100).contains(&description.chars().count()), "{} characters", description.len());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "server.json names this version");
    let remotes = s["remotes"].as_array().unwrap();
    assert!(!remotes.is_empty());
    for r in remotes {
        assert_eq!(r["type"], "streamable-http");
        let url = r["url"].as_str().unwrap();
        assert!(url.ends_with("/mcp"), "{url}");
        let mut rest = url;
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').unwrap() + start;
            let var = &rest[start + 1..end];
            assert!(r["variables"][var]["description"].is_string(), "`{var}` is described");
            rest = &rest[end + 1..];
        }
        // Nothing secret is required: a person signs in with OAuth; a key is optional.
        for h in r["headers"].as_array().into_iter().flatten() {
            assert_eq!(h["isRequired"], false, "{h}");
        }
    }
}
