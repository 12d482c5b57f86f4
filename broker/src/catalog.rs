//! Agents' catalogs, each distinct one stored once.
//!
//! A fleet runs many copies of few builds: every agent of one service and version
//! publishes the same locations. The registry keeps each distinct catalog once
//! ([`Catalog`], immutable, shared by reference count through the [`Interner`]) and
//! gives every agent an [`AgentCatalog`]: the shared catalog plus the few hit counts
//! that are its own. Catalogs are interned by content, not by the service name and
//! version an agent claims: two builds that differ share nothing, an agent still
//! warming up (its catalog growing) shares with the others at the same point, and no
//! agent can change what another one is said to offer.
//!
//! An update builds a new catalog from the old one and the frame (arrival order
//! decides what a full catalog ignores, as it always did); a catalog nobody else holds
//! is taken apart rather than copied. The result stays the agent's own while its frames
//! keep coming (a catalog arrives in many small frames) and is interned when they stop
//! ([`AgentCatalog::settle`]): one hash and one comparison per burst, not per frame.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use periscope_protocol::{CatalogEntry, FileLines, LocationKind};
use serde::{Deserialize, Serialize};

/// One distinct catalog: callsites sorted by their identity `(file, line, kind, name)`
/// with hit counts zeroed (those are per agent), and whole files sorted by path.
#[derive(Debug, Default)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
    files: Vec<FileLines>,
    /// What the catalog is charged against `agents.max_catalog_bytes`.
    bytes: usize,
    /// The interner's hash of the content (0 until interned).
    hash: u64,
    /// Whether the interner holds it (else it is one agent's own, still being built).
    interned: bool,
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Catalog) -> bool {
        self.entries == other.entries && self.files == other.files
    }
}

fn entry_key(e: &CatalogEntry) -> (&str, u32, LocationKind, &str) {
    e.key()
}

impl Catalog {
    /// Callsites, sorted by identity (hit counts are zero here: see [`AgentCatalog::iter`]).
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    /// Whole source files, sorted by path.
    pub fn files(&self) -> &[FileLines] {
        &self.files
    }

    /// Callsites plus files.
    pub fn len(&self) -> usize {
        self.entries.len() + self.files.len()
    }

    /// Whether the catalog holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.files.is_empty()
    }

    /// The memory it is charged ([`CatalogEntry::footprint`], [`FileLines::footprint`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn find(&self, key: (&str, u32, LocationKind, &str)) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| entry_key(e).cmp(&key))
    }

    fn find_file(&self, file: &str) -> Result<usize, usize> {
        self.files.binary_search_by(|f| f.file.as_str().cmp(file))
    }
}

/// Stores each distinct catalog once. It holds catalogs weakly: one is freed with the
/// last agent holding it, and the interner forgets it at its next sweep.
#[derive(Debug, Default)]
pub struct Interner {
    inner: Mutex<InternerInner>,
    /// Keyed per process, so that no agent can aim catalogs at another one's hash.
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug, Default)]
struct InternerInner {
    by_hash: HashMap<u64, Vec<Weak<Catalog>>>,
    /// Buckets after the last sweep of dead catalogs.
    swept_len: usize,
}

/// What the interner holds, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InternerStats {
    /// Distinct catalogs held by at least one agent.
    pub catalogs: usize,
    /// Their bytes, counted once each.
    pub bytes: usize,
}

impl Interner {
    /// The shared copy of `catalog`: an equal one already held by some agent, or this one.
    pub fn intern(&self, mut catalog: Catalog) -> Arc<Catalog> {
        let mut h = self.hasher.build_hasher();
        catalog.entries.hash(&mut h);
        catalog.files.hash(&mut h);
        catalog.hash = h.finish();
        catalog.interned = true;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = inner.by_hash.entry(catalog.hash).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        if let Some(same) = bucket.iter().filter_map(Weak::upgrade).find(|c| **c == catalog) {
            return same;
        }
        let shared = Arc::new(catalog);
        bucket.push(Arc::downgrade(&shared));
        // Forget freed catalogs once the map has doubled since the last sweep: amortized
        // constant work per catalog interned.
        if inner.by_hash.len() > 2 * inner.swept_len + 1_024 {
            inner.by_hash.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
            inner.swept_len = inner.by_hash.len();
        }
        shared
    }

    /// Distinct live catalogs and their bytes.
    pub fn stats(&self) -> InternerStats {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = InternerStats::default();
        for c in inner.by_hash.values().flatten().filter_map(Weak::upgrade) {
            s.catalogs += 1;
            s.bytes += c.bytes;
        }
        s
    }
}

/// One agent's catalog: the shared locations and the agent's own hit counts.
#[derive(Debug, Clone, Default)]
pub struct AgentCatalog {
    shared: Arc<Catalog>,
    /// Hit counts by index into `shared.entries`; empty while every count is zero (an
    /// agent reports counts only for locations with actions on them).
    hits: Box<[u64]>,
}

/// What became of a catalog update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogOutcome {
    /// Entries not kept (over the entry or byte bound, or beyond one frame's share).
    pub ignored: usize,
    /// Entries kept but cut to their bounds.
    pub cut: usize,
}

/// The bounds one agent's catalog is held to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most callsites (a file counts as one more).
    pub max_entries: usize,
    /// Most bytes ([`Catalog::bytes`]).
    pub max_bytes: usize,
}

impl AgentCatalog {
    /// The shared part.
    pub fn shared(&self) -> &Arc<Catalog> {
        &self.shared
    }

    /// Each callsite with this agent's hit count for it.
    pub fn iter(&self) -> impl Iterator<Item = (&CatalogEntry, u64)> {
        self.shared.entries.iter().enumerate().map(|(i, e)| (e, self.hits.get(i).copied().unwrap_or(0)))
    }

    /// Whole source files.
    pub fn files(&self) -> &[FileLines] {
        &self.shared.files
    }

    /// Callsites plus files.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether the agent published nothing.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }

    /// Inspectable locations: callsites plus every executable line of every file.
    pub fn locations(&self) -> usize {
        self.shared.entries.len() + self.shared.files.iter().map(|f| f.lines.len() as usize).sum::<usize>()
    }

    /// The memory this catalog is charged.
    pub fn bytes(&self) -> usize {
        self.shared.bytes
    }

    /// An empty catalog, shared.
    pub fn empty(interner: &Interner) -> AgentCatalog {
        AgentCatalog { shared: interner.intern(Catalog::default()), hits: Box::default() }
    }

    /// Applies an update from the agent: a `full` one replaces the catalog. Each entry is
    /// cut to the protocol's bounds first; entries beyond `bounds` or beyond one frame's
    /// share are ignored, in the order they arrived. A later copy of an entry or file
    /// replaces the earlier one.
    pub fn update(
        &mut self,
        bounds: Bounds,
        full: bool,
        entries: Vec<CatalogEntry>,
        files: Vec<FileLines>,
    ) -> CatalogOutcome {
        let old = if full { AgentCatalog::default() } else { std::mem::take(self) };
        let mut out = CatalogOutcome::default();
        let mut bytes = old.shared.bytes;
        let mut n_entries = old.shared.entries.len();

        // The frame's entries that are kept, in arrival order, later copies replacing
        // earlier ones.
        let per_frame = periscope_protocol::messages::MAX_CATALOG_ENTRIES_PER_FRAME;
        out.ignored += entries.len().saturating_sub(per_frame);
        let mut kept: Vec<CatalogEntry> = Vec::new();
        let mut kept_at: HashMap<(String, u32, LocationKind, String), usize> = HashMap::new();
        for mut e in entries.into_iter().take(per_frame) {
            if e.sanitize() {
                out.cut += 1;
            }
            let size = e.footprint();
            let key = (e.file.clone(), e.line, e.kind, e.name.clone());
            let in_frame = kept_at.get(&key).copied();
            let replaced = match in_frame {
                Some(i) => kept[i].footprint(),
                None => old.shared.find(e.key()).map_or(0, |i| old.shared.entries[i].footprint()),
            };
            let bytes_after = bytes - replaced + size;
            if (n_entries >= bounds.max_entries && replaced == 0) || bytes_after > bounds.max_bytes {
                out.ignored += 1;
                continue;
            }
            bytes = bytes_after;
            if replaced == 0 {
                n_entries += 1;
            }
            match in_frame {
                Some(i) => kept[i] = e,
                None => {
                    kept_at.insert(key, kept.len());
                    kept.push(e);
                }
            }
        }
        drop(kept_at);

        let per_frame = periscope_protocol::messages::MAX_CATALOG_FILES_PER_FRAME;
        out.ignored += files.len().saturating_sub(per_frame);
        let mut kept_files: Vec<FileLines> = Vec::new();
        let mut n_files = old.shared.files.len();
        for mut f in files.into_iter().take(per_frame) {
            if f.sanitize() {
                out.cut += 1;
            }
            let size = f.footprint();
            let in_frame = kept_files.iter().position(|k| k.file == f.file);
            let replaced = match in_frame {
                Some(i) => kept_files[i].footprint(),
                None => old.shared.find_file(&f.file).map_or(0, |i| old.shared.files[i].footprint()),
            };
            let bytes_after = bytes - replaced + size;
            if (n_entries + n_files >= bounds.max_entries && replaced == 0) || bytes_after > bounds.max_bytes {
                out.ignored += 1;
                continue;
            }
            bytes = bytes_after;
            if replaced == 0 {
                n_files += 1;
            }
            match in_frame {
                Some(i) => kept_files[i] = f,
                None => kept_files.push(f),
            }
        }

        *self = old.merged(kept, kept_files);
        out
    }

    /// This catalog with `entries` and `files` (already within bounds, unique) merged in.
    fn merged(self, mut entries: Vec<CatalogEntry>, mut files: Vec<FileLines>) -> AgentCatalog {
        if entries.is_empty() && files.is_empty() && !self.shared.is_empty() {
            return self;
        }
        let old_hits = self.hits;
        // Nobody else holds the old catalog: take it apart rather than copy it.
        let old = Arc::try_unwrap(self.shared).unwrap_or_else(|shared| Catalog {
            entries: shared.entries.clone(),
            files: shared.files.clone(),
            ..Catalog::default()
        });
        entries.sort_by(|a, b| entry_key(a).cmp(&entry_key(b)));
        files.sort_by(|a, b| a.file.cmp(&b.file));

        let mut merged = Vec::with_capacity(old.entries.len() + entries.len());
        let mut hits = Vec::with_capacity(merged.capacity());
        let mut old_entries = old.entries.into_iter().enumerate().peekable();
        let mut new_entries = entries.into_iter().peekable();
        loop {
            let take_new = match (old_entries.peek(), new_entries.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((_, o)), Some(n)) => match entry_key(o).cmp(&entry_key(n)) {
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => {
                        // Replaced by the new copy.
                        old_entries.next();
                        true
                    }
                },
            };
            if take_new {
                if let Some(mut e) = new_entries.next() {
                    hits.push(std::mem::take(&mut e.hits));
                    merged.push(e);
                }
            } else if let Some((i, e)) = old_entries.next() {
                hits.push(old_hits.get(i).copied().unwrap_or(0));
                merged.push(e);
            }
        }

        let mut merged_files = Vec::with_capacity(old.files.len() + files.len());
        let mut old_files = old.files.into_iter().peekable();
        let mut new_files = files.into_iter().peekable();
        loop {
            let take_new = match (old_files.peek(), new_files.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(o), Some(n)) => match o.file.cmp(&n.file) {
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => {
                        old_files.next();
                        true
                    }
                },
            };
            let next = if take_new { new_files.next() } else { old_files.next() };
            merged_files.extend(next);
        }

        let bytes = merged.iter().map(CatalogEntry::footprint).sum::<usize>()
            + merged_files.iter().map(FileLines::footprint).sum::<usize>();
        let catalog = Catalog { entries: merged, files: merged_files, bytes, ..Catalog::default() };
        let hits = if hits.iter().all(|h| *h == 0) { Box::default() } else { hits.into_boxed_slice() };
        AgentCatalog { shared: Arc::new(catalog), hits }
    }

    /// Shares the catalog with every agent holding an equal one (or makes it the copy
    /// others will share): called when an agent's catalog frames stop coming.
    pub fn settle(&mut self, interner: &Interner) {
        if self.shared.interned {
            return;
        }
        let private = std::mem::take(&mut self.shared);
        let catalog = Arc::try_unwrap(private).unwrap_or_else(|shared| Catalog {
            entries: shared.entries.clone(),
            files: shared.files.clone(),
            bytes: shared.bytes,
            ..Catalog::default()
        });
        self.shared = interner.intern(catalog);
    }

    /// A catalog another node published (already within bounds there; cut again here).
    pub fn from_published(interner: &Interner, published: PublishedCatalog) -> AgentCatalog {
        if published.entries.is_empty() && published.files.is_empty() {
            return AgentCatalog::empty(interner);
        }
        let bounds = Bounds { max_entries: usize::MAX, max_bytes: usize::MAX };
        let mut c = AgentCatalog::default();
        let mut entries = published.entries;
        // Whole, however many frames it took the agent.
        while !entries.is_empty() {
            let rest =
                entries.split_off(entries.len().min(periscope_protocol::messages::MAX_CATALOG_ENTRIES_PER_FRAME));
            c.update(bounds, false, entries, Vec::new());
            entries = rest;
        }
        let mut files = published.files;
        while !files.is_empty() {
            let rest = files.split_off(files.len().min(periscope_protocol::messages::MAX_CATALOG_FILES_PER_FRAME));
            c.update(bounds, false, Vec::new(), files);
            files = rest;
        }
        c.settle(interner);
        c
    }

    /// The catalog as published to the other nodes of a cluster (hit counts included).
    pub fn published(&self) -> PublishedCatalog {
        PublishedCatalog {
            entries: self
                .iter()
                .map(|(e, hits)| {
                    let mut e = e.clone();
                    e.hits = hits;
                    e
                })
                .collect(),
            files: self.shared.files.clone(),
        }
    }
}

/// An agent's catalog as its node publishes it for the other nodes of a cluster, so that
/// placing on it from any node validates the location the same way: its callsites and,
/// for languages where any line can be inspected, its whole files. The receiving node
/// interns it ([`AgentCatalog::from_published`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishedCatalog {
    /// Callsites.
    pub entries: Vec<CatalogEntry>,
    /// Whole files with their executable lines and functions.
    #[serde(default)]
    pub files: Vec<FileLines>,
}

#[cfg(test)]
mod tests {
    use periscope_protocol::LineSet;

    use super::*;

    fn entry(file: &str, line: u32, hits: u64) -> CatalogEntry {
        CatalogEntry {
            file: file.into(),
            line,
            kind: LocationKind::Event,
            name: format!("event {file}:{line}"),
            module: Some("shop::orders".into()),
            level: Some("info".into()),
            fields: vec!["user_id".into(), "amount".into()],
            hash: None,
            hits,
        }
    }

    fn file(path: &str) -> FileLines {
        FileLines {
            file: path.into(),
            module: Some("shop".into()),
            hash: Some("sha256:00".into()),
            lines: LineSet::from_lines([3, 4, 5, 9]),
            functions: Vec::new(),
        }
    }

    const ROOMY: Bounds = Bounds { max_entries: 10_000, max_bytes: 4 << 20 };

    #[test]
    fn agents_publishing_the_same_catalog_share_one_copy() {
        let interner = Interner::default();
        let catalog = || (0..200).map(|i| entry(&format!("src/m{}.rs", i / 20), i, 0)).collect::<Vec<_>>();
        let mut agents: Vec<AgentCatalog> = (0..50).map(|_| AgentCatalog::empty(&interner)).collect();
        for a in &mut agents {
            // In two frames, the second out of order: the result is the same catalog.
            let mut all = catalog();
            let second = all.split_off(120);
            a.update(ROOMY, true, all, vec![file("app/views.py")]);
            a.update(ROOMY, false, second.into_iter().rev().collect(), Vec::new());
            a.settle(&interner);
        }
        assert!(agents.iter().all(|a| Arc::ptr_eq(a.shared(), agents[0].shared())));
        assert_eq!(agents[0].len(), 201);
        let stats = interner.stats();
        assert_eq!(stats.catalogs, 1, "one distinct catalog held: {stats:?}");
        assert_eq!(stats.bytes, agents[0].bytes());
        let keys: Vec<_> = agents[0].iter().map(|(e, _)| (e.file.clone(), e.line)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);

        // One agent's catalog changes: it alone gets a new copy; the rest still share.
        agents[7].update(ROOMY, false, vec![entry("src/new.rs", 1, 0)], Vec::new());
        assert_eq!(interner.stats().catalogs, 1, "its own until it settles");
        agents[7].settle(&interner);
        assert!(!Arc::ptr_eq(agents[7].shared(), agents[0].shared()));
        assert!(Arc::ptr_eq(agents[8].shared(), agents[0].shared()));
        assert_eq!(interner.stats().catalogs, 2);
        agents.truncate(1);
        assert_eq!(interner.stats().catalogs, 1, "a catalog nobody holds is freed");
    }

    #[test]
    fn hit_counts_stay_with_their_agent() {
        let interner = Interner::default();
        let mut a = AgentCatalog::empty(&interner);
        let mut b = AgentCatalog::empty(&interner);
        a.update(ROOMY, true, vec![entry("a.rs", 1, 0), entry("a.rs", 2, 0)], Vec::new());
        b.update(ROOMY, true, vec![entry("a.rs", 1, 0), entry("a.rs", 2, 0)], Vec::new());
        b.update(ROOMY, false, vec![entry("a.rs", 2, 42)], Vec::new());
        a.settle(&interner);
        b.settle(&interner);
        assert!(Arc::ptr_eq(a.shared(), b.shared()), "counts are not part of what is shared");
        let counts = |c: &AgentCatalog| c.iter().map(|(e, h)| (e.line, h)).collect::<Vec<_>>();
        assert_eq!(counts(&a), vec![(1, 0), (2, 0)]);
        assert_eq!(counts(&b), vec![(1, 0), (2, 42)]);
        assert_eq!(b.published().entries.iter().map(|e| e.hits).collect::<Vec<_>>(), vec![0, 42]);
        let back = AgentCatalog::from_published(&interner, b.published());
        assert!(Arc::ptr_eq(back.shared(), a.shared()), "a published catalog is interned where it lands");
        assert_eq!(counts(&back), counts(&b));
    }

    #[test]
    fn bounds_ignore_what_arrives_last_and_a_full_update_replaces() {
        let interner = Interner::default();
        let mut a = AgentCatalog::empty(&interner);
        let bounds = Bounds { max_entries: 3, max_bytes: 4 << 20 };
        let frame: Vec<_> = [9, 8, 7, 6, 5].iter().map(|l| entry("a.rs", *l, 0)).collect();
        let out = a.update(bounds, true, frame, Vec::new());
        assert_eq!(out, CatalogOutcome { ignored: 2, cut: 0 });
        assert_eq!(a.iter().map(|(e, _)| e.line).collect::<Vec<_>>(), vec![7, 8, 9]);
        // A replacement of a kept entry fits; a new one does not.
        let out = a.update(bounds, false, vec![entry("a.rs", 8, 3), entry("a.rs", 1, 0)], Vec::new());
        assert_eq!(out.ignored, 1);
        assert_eq!(a.len(), 3);
        let out = a.update(bounds, true, vec![entry("b.rs", 1, 0)], vec![file("x.py")]);
        assert_eq!(out.ignored, 0);
        assert_eq!(a.len(), 2);
        assert_eq!(a.locations(), 1 + 4);
        let tight = Bounds { max_entries: 100, max_bytes: a.bytes() };
        let out = a.update(tight, false, vec![entry("c.rs", 1, 0)], Vec::new());
        assert_eq!(out.ignored, 1, "over the byte bound");
    }
}
