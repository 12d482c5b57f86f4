//! Content hashes of the source files the catalog names, for actions placed with a
//! `file_hash` (code-version safety).
//!
//! A Rust program carries no source, only the paths `file!()` recorded at compile time
//! (relative to the workspace that built it, or absolute). The agent hashes a file when
//! it can read it at run time, under `PERISCOPE_SOURCE_ROOT` when set, else relative to
//! the working directory (or one of its first ancestors), and reports no hash otherwise: an action that expects a hash
//! is then refused with "cannot read that file's source" rather than run on code the
//! agent cannot vouch for. The hash is `sha256:` and the hex digest of the file's bytes,
//! what `sha256sum` prints, and what the Python agent reports for its files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use periscope_protocol::CatalogEntry;
use sha2::{Digest, Sha256};

/// Largest source file hashed; a bigger one reports no hash.
const MAX_SOURCE_BYTES: u64 = 16 * 1024 * 1024;

/// Hashes already computed, by path as the catalog reports it (`None`: unreadable).
/// Only the agent thread touches it: hashing never runs on a host thread or under a lock
/// a host thread takes.
#[derive(Debug, Default)]
pub(crate) struct SourceHashes {
    known: Mutex<HashMap<String, Option<String>>>,
    root: Option<PathBuf>,
}

impl SourceHashes {
    /// Hashes resolved under `PERISCOPE_SOURCE_ROOT`, or the working directory.
    pub(crate) fn from_env() -> SourceHashes {
        let root = std::env::var_os("PERISCOPE_SOURCE_ROOT").filter(|r| !r.is_empty()).map(PathBuf::from);
        SourceHashes { known: Mutex::default(), root }
    }

    /// Sets each entry's `hash` (reading each file once per process).
    pub(crate) fn fill(&self, entries: &mut [CatalogEntry]) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            if !known.contains_key(&e.file) {
                let hash = self.hash(&e.file);
                known.insert(e.file.clone(), hash);
            }
            e.hash = known.get(&e.file).cloned().flatten();
        }
    }

    fn hash(&self, file: &str) -> Option<String> {
        let path = self.resolve(Path::new(file))?;
        if std::fs::metadata(&path).ok()?.len() > MAX_SOURCE_BYTES {
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        Some(format!("sha256:{}", hex(&Sha256::digest(&bytes))))
    }

    /// Where a catalog path is on disk: absolute as it is; relative under
    /// `PERISCOPE_SOURCE_ROOT`, else under the working directory or one of its first
    /// few ancestors (a workspace member run from its own directory records paths
    /// relative to the workspace root).
    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        if path.is_absolute() {
            return Some(path.to_path_buf());
        }
        if let Some(root) = &self.root {
            return Some(root.join(path));
        }
        let cwd = std::env::current_dir().ok()?;
        cwd.ancestors().take(4).map(|dir| dir.join(path)).find(|p| p.is_file())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use periscope_protocol::LocationKind;

    use super::*;

    #[test]
    fn a_readable_file_gets_the_hash_sha256sum_prints_and_an_unreadable_one_none() {
        let hashes = SourceHashes::default();
        let entry = |file: &str| CatalogEntry {
            file: file.into(),
            line: 1,
            kind: LocationKind::Event,
            name: "e".into(),
            module: None,
            level: None,
            fields: Vec::new(),
            hits: 0,
            hash: None,
        };
        let me = concat!(env!("CARGO_MANIFEST_DIR"), "/src/source_hash.rs");
        let mut entries = [entry(me), entry("no/such/file.rs")];
        hashes.fill(&mut entries);
        let expected = format!("sha256:{}", hex(&Sha256::digest(std::fs::read(me).unwrap())));
        assert_eq!(entries[0].hash.as_deref(), Some(expected.as_str()));
        assert_eq!(entries[0].hash.as_ref().map(String::len), Some(7 + 64));
        assert_eq!(entries[1].hash, None);
    }
}
