//! The knowledge base: chunks, their vectors, an updatable HNSW index and a BM25 index, savable as one
//! validated binary pack.
//!
//! Vectors live in *slots* (rows of one flat array). Sealed HNSW [segments](hnsw) index most slots; new
//! slots go to a small *tail* searched exactly; deleting marks a slot dead (a tombstone) and every search
//! skips it. When the tail reaches [`IndexConfig::tail_threshold`] it is sealed into a new segment; when there
//! are more than [`IndexConfig::max_segments`] segments, or more dead slots than live ones, everything is
//! rebuilt into one segment, which [`KnowledgeBase::compact`] also does on request.
//!
//! ```
//! use lorag::index::{EmbedderId, IndexConfig, KnowledgeBase, SearchMode, SearchOptions, DocInfo};
//! use lorag::{ingest, ChunkConfig, Chunker, IngestOptions};
//! let doc = ingest("notes.txt", b"Cats purr.\n\nDogs bark loudly.", &IngestOptions::default()).unwrap();
//! let chunks = Chunker::chars(ChunkConfig { size: Some(20), overlap: Some(0), ..Default::default() })
//!     .unwrap().chunk(&doc).unwrap();
//! let vectors = vec![vec![1.0, 0.0], vec![0.0, 1.0]]; // from an embedder, one per chunk
//! let mut kb = KnowledgeBase::new(EmbedderId::new("toy", 2, "0"), IndexConfig::default()).unwrap();
//! kb.add_document(DocInfo::from(&doc), chunks, vectors).unwrap();
//! let hits = kb.search(Some(&[0.1, 0.9]), Some("barking dogs"), &SearchOptions { k: 1, ..Default::default() }).unwrap();
//! assert_eq!(hits[0].chunk.text, "Dogs bark loudly.");
//! let copy = KnowledgeBase::from_bytes(&kb.to_bytes(), None).unwrap();
//! assert_eq!(copy.len(), 2);
//! ```

pub mod bm25;
pub(crate) mod hnsw;
mod pack;
pub mod simd;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use bm25::{top_k, Bm25};
pub use bm25::{Analyzer, Bm25Params};
use hnsw::Segment;
#[cfg(not(target_arch = "wasm32"))]
pub use pack::atomic_write;
pub use pack::{PACK_MAGIC, PACK_VERSION};

use crate::{Chunk, Document, Error, Result};

/// Largest vector dimension accepted.
pub const MAX_DIM: usize = 1 << 16;

/// Which embedding model produced the vectors: a pack is never searched with another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedderId {
    /// A human-readable name (model folder or hub name).
    pub name: String,
    /// Vector dimension.
    pub dim: u32,
    /// Content hash of the model weights ([`crate::Embedder::identity`]).
    pub hash: String,
}

impl EmbedderId {
    /// Name, dimension and weights hash.
    pub fn new(name: impl Into<String>, dim: u32, hash: impl Into<String>) -> Self {
        EmbedderId {
            name: name.into(),
            dim,
            hash: hash.into(),
        }
    }

    /// The identity of a loaded embedder.
    #[cfg(feature = "embed")]
    pub fn of(embedder: &crate::Embedder, name: impl Into<String>) -> Self {
        EmbedderId::new(name, embedder.dim() as u32, embedder.identity())
    }

    /// Same model: dimension and hash agree (the name is only a label).
    pub fn matches(&self, other: &EmbedderId) -> bool {
        self.dim == other.dim && self.hash == other.hash
    }
}

impl std::fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (dim {}, {})", self.name, self.dim, self.hash)
    }
}

/// Index settings. Plain data with defaults; stored in the pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IndexConfig {
    /// Seed of the HNSW level assignment: same chunks, vectors and seed ⇒ same graph.
    pub seed: u64,
    /// Candidate list size while building the graph (instant-distance's `efConstruction`).
    pub ef_construction: usize,
    /// Default candidate list size while searching (per query: [`SearchOptions::ef`]).
    pub ef_search: usize,
    /// Unindexed (tail) chunks searched exactly before the tail is sealed into an HNSW segment.
    pub tail_threshold: usize,
    /// More segments than this are merged into one.
    pub max_segments: usize,
    /// Threads for building a segment (native only). 1 (the default) builds the same graph every time;
    /// more is faster but the graph then depends on thread scheduling.
    pub build_threads: usize,
    /// A filtered vector search that lets fewer chunks through than this runs exactly over them.
    pub exact_below: usize,
    /// BM25 parameters.
    pub bm25: Bm25Params,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            seed: 0x10_4a_9b,
            ef_construction: 200,
            ef_search: 64,
            tail_threshold: 1024,
            max_segments: 8,
            build_threads: 1,
            exact_below: 2048,
            bm25: Bm25Params::default(),
        }
    }
}

impl IndexConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(format!("index: {what}")));
        if self.ef_construction == 0 || self.ef_construction > 10_000 {
            return bad("ef_construction must be in 1..=10000");
        }
        if self.ef_search == 0 || self.ef_search > 100_000 {
            return bad("ef_search must be in 1..=100000");
        }
        if self.tail_threshold == 0 || self.max_segments == 0 || self.build_threads == 0 {
            return bad("tail_threshold, max_segments and build_threads must be at least 1");
        }
        let (k1, b) = (self.bm25.k1, self.bm25.b);
        if !(k1.is_finite() && k1 >= 0.0 && (0.0..=1.0).contains(&b)) {
            return bad("bm25 needs k1 ≥ 0 and b in [0, 1]");
        }
        Ok(())
    }
}

/// What the index keeps of a document: id, title and metadata (for filters and citations).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DocInfo {
    /// The document id (chunks refer to it).
    pub id: String,
    /// Title, when known.
    pub title: Option<String>,
    /// Metadata for filters (front matter, `<meta>`, PDF Info, or the caller's own).
    pub metadata: BTreeMap<String, String>,
}

impl From<&Document> for DocInfo {
    fn from(d: &Document) -> Self {
        let mut metadata = d.metadata.clone();
        metadata
            .entry("format".into())
            .or_insert_with(|| d.format.to_string());
        DocInfo {
            id: d.id.clone(),
            title: d.title.clone(),
            metadata,
        }
    }
}

impl DocInfo {
    /// The value a filter sees for `key`: `doc_id` and `title` are built in, the rest is metadata.
    fn field(&self, key: &str) -> Option<&str> {
        match key {
            "doc_id" => Some(&self.id),
            "title" => self.title.as_deref(),
            _ => self.metadata.get(key).map(String::as_str),
        }
    }
}

/// A filter bound: a number (compared numerically with values that parse as numbers) or a string
/// (compared lexicographically, which orders ISO dates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
}

/// A condition on document fields (`doc_id`, `title`, or any metadata key). In JSON:
/// `{"eq": {"key": "lang", "value": "en"}}`, `{"in": {"key": "team", "values": ["a", "b"]}}`,
/// `{"range": {"key": "year", "min": 2020, "max": 2024}}` (inclusive; either bound optional),
/// `{"and": […]}`, `{"or": […]}`, `{"not": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// The field equals the value.
    Eq {
        /// Field name.
        key: String,
        /// Wanted value.
        value: String,
    },
    /// The field is one of the values.
    In {
        /// Field name.
        key: String,
        /// Accepted values.
        values: Vec<String>,
    },
    /// The field lies in `[min, max]`.
    Range {
        /// Field name.
        key: String,
        /// Lower bound, inclusive.
        #[serde(default)]
        min: Option<Scalar>,
        /// Upper bound, inclusive.
        #[serde(default)]
        max: Option<Scalar>,
    },
    /// All hold.
    And(Vec<Filter>),
    /// At least one holds.
    Or(Vec<Filter>),
    /// Does not hold.
    Not(Box<Filter>),
}

impl Filter {
    /// Whether a document passes.
    pub fn matches(&self, doc: &DocInfo) -> bool {
        match self {
            Filter::Eq { key, value } => doc.field(key) == Some(value.as_str()),
            Filter::In { key, values } => doc
                .field(key)
                .is_some_and(|v| values.iter().any(|x| x == v)),
            Filter::Range { key, min, max } => {
                let Some(v) = doc.field(key) else {
                    return false;
                };
                let ok = |bound: &Scalar, want: std::cmp::Ordering| -> bool {
                    let ord = match bound {
                        Scalar::Num(b) => match v.trim().parse::<f64>() {
                            Ok(x) => x.partial_cmp(b),
                            Err(_) => None,
                        },
                        Scalar::Str(b) => Some(v.cmp(b.as_str())),
                    };
                    matches!(ord, Some(o) if o == want || o == std::cmp::Ordering::Equal)
                };
                min.as_ref()
                    .is_none_or(|b| ok(b, std::cmp::Ordering::Greater))
                    && max.as_ref().is_none_or(|b| ok(b, std::cmp::Ordering::Less))
            }
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Not(f) => !f.matches(doc),
        }
    }
}

/// How a search ranks chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Brute-force cosine over every chunk (the reference).
    Exact,
    /// HNSW segments plus the exact tail.
    Hnsw,
    /// BM25 over the chunk text.
    Bm25,
    /// HNSW and BM25, fused ([`Fusion`]).
    #[default]
    Hybrid,
}

impl std::str::FromStr for SearchMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "exact" => SearchMode::Exact,
            "hnsw" => SearchMode::Hnsw,
            "bm25" => SearchMode::Bm25,
            "hybrid" => SearchMode::Hybrid,
            _ => {
                return Err(Error::InvalidQuery(format!(
                    "unknown search mode {s:?} (exact, hnsw, bm25, hybrid)"
                )))
            }
        })
    }
}

/// How hybrid search combines the vector and keyword rankings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Reciprocal-rank fusion: Σ 1 / (k + rank), rank from 1 (Cormack et al.; k = 60 is usual).
    Rrf {
        /// The rank constant.
        k: f32,
    },
    /// `alpha · vector + (1 − alpha) · keyword`, each score min-max normalized over its candidates.
    Weighted {
        /// Weight of the vector score, in [0, 1].
        alpha: f32,
    },
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::Rrf { k: 60.0 }
    }
}

/// Per-query settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchOptions {
    /// Results wanted (≥ 1). Fewer come back when fewer chunks match.
    pub k: usize,
    /// Ranking.
    pub mode: SearchMode,
    /// HNSW candidate list size for this query (default [`IndexConfig::ef_search`]); raised to the number of
    /// candidates needed when smaller.
    pub ef: Option<usize>,
    /// Drop results scoring below this (cosine for exact/hnsw, BM25 score, fused score for hybrid).
    pub min_score: Option<f32>,
    /// Only chunks of documents passing this filter.
    pub filter: Option<Filter>,
    /// Hybrid fusion.
    pub fusion: Fusion,
    /// Candidates taken from each ranking before fusion or MMR (default `max(2k, 100)` for hybrid,
    /// `max(4k, 20)` for MMR).
    pub candidates: Option<usize>,
    /// MMR re-ranking for diversity: `λ · relevance − (1 − λ) · max similarity to those already picked`
    /// (λ in [0, 1]; 1 = plain relevance).
    pub mmr_lambda: Option<f32>,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 10,
            mode: SearchMode::Hybrid,
            ef: None,
            min_score: None,
            filter: None,
            fusion: Fusion::default(),
            candidates: None,
            mmr_lambda: None,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit<'a> {
    /// The chunk.
    pub chunk: &'a Chunk,
    /// The score the results are ordered by (see [`SearchOptions::min_score`]).
    pub score: f32,
    /// Cosine similarity to the query vector, when the vector ranking found it.
    pub vector_score: Option<f32>,
    /// BM25 score, when the keyword ranking found it.
    pub keyword_score: Option<f32>,
}

/// Embeds chunks for [`KnowledgeBase::upsert_document`]: one vector per chunk, in order.
pub type EmbedFn<'a> = dyn FnMut(&[&Chunk]) -> Result<Vec<Vec<f32>>> + 'a;

/// What [`KnowledgeBase::upsert_document`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UpsertStats {
    /// Chunks whose content hash was already there: kept with their vectors, not re-embedded.
    pub kept: usize,
    /// Chunks embedded and indexed.
    pub embedded: usize,
    /// Old chunks deleted.
    pub removed: usize,
}

/// Memory held, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// Live chunks.
    pub chunks: usize,
    /// Vectors (all slots, dead ones until compaction).
    pub vector_bytes: usize,
    /// HNSW neighbour arrays.
    pub graph_bytes: usize,
    /// Chunk text and records.
    pub text_bytes: usize,
    /// BM25 postings and vocabulary.
    pub postings_bytes: usize,
}

struct DocEntry {
    info: DocInfo,
    slots: Vec<u32>,
}

/// An updatable hybrid index over chunks of documents. See the [module docs](self).
pub struct KnowledgeBase {
    config: IndexConfig,
    embedder: EmbedderId,
    dim: usize,
    /// slot → chunk (`None`: deleted).
    chunks: Vec<Option<Chunk>>,
    /// slot → vector, `dim` floats each, unit length.
    vectors: Vec<f32>,
    chunk_slot: HashMap<String, u32>,
    docs: BTreeMap<String, DocEntry>,
    segments: Vec<Segment>,
    /// Live slots not in any segment, searched exactly.
    tail: Vec<u32>,
    live: usize,
    bm25: Bm25,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("embedder", &self.embedder)
            .field("documents", &self.docs.len())
            .field("chunks", &self.live)
            .field("segments", &self.segments.len())
            .field("tail", &self.tail.len())
            .finish()
    }
}

/// Check a vector and return it scaled to unit length.
fn unit(v: &[f32], dim: usize, what: &dyn Fn() -> String) -> Result<Vec<f32>> {
    if v.len() != dim {
        return Err(Error::InvalidVector(format!(
            "{}: dimension {} but the embedder's is {dim}",
            what(),
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidVector(format!(
            "{}: component {i} is {}",
            what(),
            v[i]
        )));
    }
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm < 1e-12 {
        return Err(Error::InvalidVector(format!("{}: zero norm", what())));
    }
    Ok(v.iter().map(|&x| (x as f64 / norm) as f32).collect())
}

impl KnowledgeBase {
    /// An empty knowledge base for vectors from `embedder`.
    pub fn new(embedder: EmbedderId, config: IndexConfig) -> Result<Self> {
        config.validate()?;
        let dim = embedder.dim as usize;
        if dim == 0 || dim > MAX_DIM {
            return Err(Error::Config(format!(
                "index: dimension {dim} outside 1..={MAX_DIM}"
            )));
        }
        Ok(KnowledgeBase {
            bm25: Bm25::new(config.bm25),
            config,
            embedder,
            dim,
            chunks: Vec::new(),
            vectors: Vec::new(),
            chunk_slot: HashMap::new(),
            docs: BTreeMap::new(),
            segments: Vec::new(),
            tail: Vec::new(),
            live: 0,
        })
    }

    /// The embedder the vectors come from.
    pub fn embedder(&self) -> &EmbedderId {
        &self.embedder
    }

    /// The settings.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live chunks.
    pub fn len(&self) -> usize {
        self.live
    }

    /// No live chunks.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Documents, by id.
    pub fn documents(&self) -> impl Iterator<Item = &DocInfo> {
        self.docs.values().map(|d| &d.info)
    }

    /// A document's info.
    pub fn document(&self, id: &str) -> Option<&DocInfo> {
        self.docs.get(id).map(|d| &d.info)
    }

    /// A document's live chunks, in order.
    pub fn document_chunks(&self, id: &str) -> Vec<&Chunk> {
        let mut v: Vec<&Chunk> = self
            .docs
            .get(id)
            .map(|d| {
                d.slots
                    .iter()
                    .filter_map(|&s| self.chunks[s as usize].as_ref())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|c| c.index);
        v
    }

    /// A chunk by id.
    pub fn chunk(&self, id: &str) -> Option<&Chunk> {
        self.chunk_slot
            .get(id)
            .and_then(|&s| self.chunks[s as usize].as_ref())
    }

    /// The stored (unit) vector of a chunk.
    pub fn vector(&self, chunk_id: &str) -> Option<&[f32]> {
        self.chunk_slot.get(chunk_id).map(|&s| self.row(s))
    }

    /// Sealed HNSW segments and tail size (for tests and diagnostics).
    pub fn layout(&self) -> (Vec<usize>, usize) {
        (
            self.segments.iter().map(Segment::len).collect(),
            self.tail.len(),
        )
    }

    fn row(&self, slot: u32) -> &[f32] {
        let s = slot as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    /// Check a new document's chunks before anything changes: a document id, chunks belonging to it, chunk
    /// ids unique in it and not taken by another document (`replacing`: the document already exists and its
    /// own chunk ids may be reused).
    fn check_chunks(&self, info: &DocInfo, chunks: &[Chunk], replacing: bool) -> Result<()> {
        if info.id.is_empty() {
            return Err(Error::InvalidDocument("empty document id".into()));
        }
        let mut ids = std::collections::HashSet::new();
        for c in chunks {
            if c.doc_id != info.id {
                return Err(Error::InvalidDocument(format!(
                    "chunk {} belongs to {:?}, not {:?}",
                    c.id, c.doc_id, info.id
                )));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(Error::DuplicateId(format!("chunk {}", c.id)));
            }
            if let Some(&s) = self.chunk_slot.get(&c.id) {
                // A live slot's chunk names its document, so this is "the slot is one of ours".
                let ours = replacing
                    && self.chunks[s as usize]
                        .as_ref()
                        .is_some_and(|old| old.doc_id == info.id);
                if !ours {
                    return Err(Error::DuplicateId(format!("chunk {}", c.id)));
                }
            }
        }
        Ok(())
    }

    /// One checked unit vector per chunk.
    fn unit_vectors(&self, chunks: &[&Chunk], vectors: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if chunks.len() != vectors.len() {
            return Err(Error::InvalidVector(format!(
                "{} chunks but {} vectors",
                chunks.len(),
                vectors.len()
            )));
        }
        vectors
            .iter()
            .zip(chunks)
            .map(|(v, c)| unit(v, self.dim, &|| format!("chunk {}", c.id)))
            .collect()
    }

    /// Add a new document's chunks with their vectors (one per chunk, from this knowledge base's embedder).
    /// Refused as a whole, with nothing changed, when the document id exists ([`Error::DuplicateId`]; use
    /// [`KnowledgeBase::upsert_document`]), a chunk id is taken, or a vector is bad.
    pub fn add_document(
        &mut self,
        info: DocInfo,
        chunks: Vec<Chunk>,
        vectors: Vec<Vec<f32>>,
    ) -> Result<()> {
        if self.docs.contains_key(&info.id) {
            return Err(Error::DuplicateId(format!("document {}", info.id)));
        }
        if chunks.len() != vectors.len() {
            return Err(Error::InvalidVector(format!(
                "{} chunks but {} vectors",
                chunks.len(),
                vectors.len()
            )));
        }
        self.check_chunks(&info, &chunks, false)?;
        let units = self.unit_vectors(&chunks.iter().collect::<Vec<_>>(), &vectors)?;
        let slots = chunks
            .into_iter()
            .zip(units)
            .map(|(c, v)| self.push_slot(c, &v))
            .collect();
        self.docs.insert(info.id.clone(), DocEntry { info, slots });
        self.after_insert();
        Ok(())
    }

    /// Add or replace a document. Chunks whose content hash is already among the document's chunks keep
    /// their vectors and index entries; only the others are passed to `embed` (one call, in order) and
    /// indexed; old chunks no longer present are deleted. Nothing changes when `embed` or a check fails.
    pub fn upsert_document(
        &mut self,
        info: DocInfo,
        chunks: Vec<Chunk>,
        embed: &mut EmbedFn<'_>,
    ) -> Result<UpsertStats> {
        let old = self.docs.get(&info.id);
        // hash → old slots with that hash (a document may repeat a passage).
        let mut by_hash: HashMap<&str, Vec<u32>> = HashMap::new();
        if let Some(d) = old {
            for &s in d.slots.iter().rev() {
                if let Some(c) = &self.chunks[s as usize] {
                    by_hash.entry(c.hash.as_str()).or_default().push(s);
                }
            }
        }
        let reuse: Vec<Option<u32>> = chunks
            .iter()
            .map(|c| by_hash.get_mut(c.hash.as_str()).and_then(|v| v.pop()))
            .collect();
        let fresh: Vec<&Chunk> = chunks
            .iter()
            .zip(&reuse)
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| c)
            .collect();
        let new_vectors = if fresh.is_empty() {
            Vec::new()
        } else {
            embed(&fresh)?
        };
        if new_vectors.len() != fresh.len() {
            return Err(Error::InvalidVector(format!(
                "the embedder returned {} vectors for {} chunks",
                new_vectors.len(),
                fresh.len()
            )));
        }
        // Kept chunks keep their stored (already checked) vectors; only the new ones are checked.
        self.check_chunks(&info, &chunks, old.is_some())?;
        let mut units = self.unit_vectors(&fresh, &new_vectors)?.into_iter();
        let mut stats = UpsertStats::default();
        // Apply: drop the old document's chunk ids, delete the slots not reused.
        let old_slots = self
            .docs
            .remove(&info.id)
            .map(|d| d.slots)
            .unwrap_or_default();
        let kept: std::collections::HashSet<u32> = reuse.iter().flatten().copied().collect();
        for &s in &old_slots {
            if let Some(c) = &self.chunks[s as usize] {
                self.chunk_slot.remove(&c.id);
            }
            if !kept.contains(&s) {
                self.kill_slot(s);
                stats.removed += 1;
            }
        }
        let mut slots = Vec::with_capacity(chunks.len());
        for (c, r) in chunks.into_iter().zip(reuse) {
            match r {
                Some(s) => {
                    self.chunk_slot.insert(c.id.clone(), s);
                    self.chunks[s as usize] = Some(c);
                    slots.push(s);
                    stats.kept += 1;
                }
                None => {
                    let v = units.next().expect("one checked vector per fresh chunk");
                    slots.push(self.push_slot(c, &v));
                    stats.embedded += 1;
                }
            }
        }
        self.docs.insert(info.id.clone(), DocEntry { info, slots });
        self.after_insert();
        Ok(stats)
    }

    /// Delete a document and its chunks; returns how many chunks went.
    pub fn delete_document(&mut self, id: &str) -> Result<usize> {
        let d = self
            .docs
            .remove(id)
            .ok_or_else(|| Error::NotFound(format!("document {id}")))?;
        let mut n = 0;
        for s in d.slots {
            if let Some(c) = &self.chunks[s as usize] {
                self.chunk_slot.remove(&c.id);
                self.kill_slot(s);
                n += 1;
            }
        }
        self.after_delete();
        Ok(n)
    }

    /// Delete one chunk.
    pub fn delete_chunk(&mut self, chunk_id: &str) -> Result<()> {
        let s = self
            .chunk_slot
            .remove(chunk_id)
            .ok_or_else(|| Error::NotFound(format!("chunk {chunk_id}")))?;
        if let Some(doc) = self.chunks[s as usize].as_ref().map(|c| c.doc_id.clone()) {
            if let Some(d) = self.docs.get_mut(&doc) {
                d.slots.retain(|&x| x != s);
            }
        }
        self.kill_slot(s);
        self.after_delete();
        Ok(())
    }

    fn push_slot(&mut self, chunk: Chunk, v: &[f32]) -> u32 {
        let s = self.chunks.len() as u32;
        self.bm25.add(s, &chunk.embed_text());
        self.chunk_slot.insert(chunk.id.clone(), s);
        self.chunks.push(Some(chunk));
        self.vectors.extend_from_slice(v);
        self.tail.push(s);
        self.live += 1;
        s
    }

    fn kill_slot(&mut self, s: u32) {
        if let Some(c) = self.chunks[s as usize].take() {
            self.bm25.remove(s, &c.embed_text());
            self.live -= 1;
            if let Some(p) = self.tail.iter().position(|&t| t == s) {
                self.tail.swap_remove(p);
            }
        }
    }

    fn after_insert(&mut self) {
        if self.tail.len() >= self.config.tail_threshold {
            let mut tail = std::mem::take(&mut self.tail);
            tail.sort_unstable();
            let seg = self.build_segment(&tail);
            self.segments.push(seg);
        }
        if self.segments.len() > self.config.max_segments {
            self.rebuild_segments();
        }
    }

    fn after_delete(&mut self) {
        let dead = self.chunks.len() - self.live;
        if dead > self.live.max(64) {
            self.compact();
        }
    }

    fn build_segment(&self, slots: &[u32]) -> Segment {
        // Building from validated vectors cannot fail; an internal inconsistency would be a bug.
        Segment::build(
            &self.vectors,
            self.dim,
            slots,
            self.config.ef_construction,
            self.config.seed,
            if cfg!(target_arch = "wasm32") {
                1
            } else {
                self.config.build_threads
            },
        )
        .expect("building an HNSW segment from checked vectors")
    }

    /// Every live slot into one segment (slots keep their numbers).
    fn rebuild_segments(&mut self) {
        let live: Vec<u32> = (0..self.chunks.len() as u32)
            .filter(|&s| self.chunks[s as usize].is_some())
            .collect();
        self.segments.clear();
        self.tail.clear();
        if !live.is_empty() {
            let seg = self.build_segment(&live);
            self.segments.push(seg);
        }
    }

    /// Drop deleted slots (renumbering the rest), rebuild BM25 and one HNSW segment over everything.
    pub fn compact(&mut self) {
        let mut map = vec![u32::MAX; self.chunks.len()];
        let mut chunks = Vec::with_capacity(self.live);
        let mut vectors = Vec::with_capacity(self.live * self.dim);
        for (s, c) in self.chunks.iter_mut().enumerate() {
            if let Some(c) = c.take() {
                map[s] = chunks.len() as u32;
                vectors.extend_from_slice(&self.vectors[s * self.dim..(s + 1) * self.dim]);
                chunks.push(Some(c));
            }
        }
        self.chunks = chunks;
        self.vectors = vectors;
        for d in self.docs.values_mut() {
            d.slots = d
                .slots
                .iter()
                .map(|&s| map[s as usize])
                .filter(|&s| s != u32::MAX)
                .collect();
        }
        for s in self.chunk_slot.values_mut() {
            *s = map[*s as usize];
        }
        let texts: Vec<(u32, String)> = self
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(s, c)| c.as_ref().map(|c| (s as u32, c.embed_text())))
            .collect();
        self.bm25
            .rebuild(texts.iter().map(|(s, t)| (*s, t.as_str())));
        self.rebuild_segments();
    }

    /// Bytes held by each part.
    pub fn memory(&self) -> MemoryReport {
        MemoryReport {
            chunks: self.live,
            vector_bytes: self.vectors.len() * 4,
            graph_bytes: self
                .segments
                .iter()
                .map(Segment::memory_bytes)
                .sum::<usize>()
                + self.tail.len() * 4,
            text_bytes: self
                .chunks
                .iter()
                .flatten()
                .map(|c| {
                    std::mem::size_of::<Chunk>()
                        + c.id.len()
                        + c.doc_id.len()
                        + c.text.len()
                        + c.hash.len()
                        + c.heading_path.iter().map(|h| h.len() + 24).sum::<usize>()
                })
                .sum::<usize>()
                + self.chunk_slot.keys().map(|k| k.len() + 32).sum::<usize>(),
            postings_bytes: self.bm25.memory_bytes(),
        }
    }

    /// Search. `vector` (from this knowledge base's embedder, for the query) is needed by the exact, HNSW
    /// and hybrid modes; `text` by BM25 and hybrid. See [`SearchOptions`] for the rest. An empty index
    /// gives no results; `k` larger than the matches gives all matches.
    pub fn search(
        &self,
        vector: Option<&[f32]>,
        text: Option<&str>,
        opts: &SearchOptions,
    ) -> Result<Vec<Hit<'_>>> {
        if opts.k == 0 {
            return Err(Error::InvalidQuery("k must be at least 1".into()));
        }
        if let Some(l) = opts.mmr_lambda {
            if !(0.0..=1.0).contains(&l) {
                return Err(Error::InvalidQuery("mmr_lambda must be in [0, 1]".into()));
            }
        }
        if let Fusion::Weighted { alpha } = opts.fusion {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(Error::InvalidQuery("fusion alpha must be in [0, 1]".into()));
            }
        }
        let needs_vector = opts.mode != SearchMode::Bm25;
        let needs_text = matches!(opts.mode, SearchMode::Bm25 | SearchMode::Hybrid);
        let q = match (needs_vector, vector) {
            (true, Some(v)) => Some(unit(v, self.dim, &|| "query".to_string())?),
            (true, None) => {
                return Err(Error::InvalidQuery(format!(
                    "{:?} search needs a query vector",
                    opts.mode
                )))
            }
            (false, _) => None,
        };
        let text = match (needs_text, text) {
            (true, Some(t)) => Some(t),
            (true, None) => {
                return Err(Error::InvalidQuery(format!(
                    "{:?} search needs the query text",
                    opts.mode
                )))
            }
            (false, _) => None,
        };
        if self.live == 0 {
            return Ok(Vec::new());
        }
        // The slots a result may come from: live, and passing the filter.
        let (accept, passing) = match &opts.filter {
            None => (None, self.live),
            Some(f) => {
                let mut bits = vec![false; self.chunks.len()];
                let mut n = 0;
                for d in self.docs.values().filter(|d| f.matches(&d.info)) {
                    for &s in &d.slots {
                        if self.chunks[s as usize].is_some() {
                            bits[s as usize] = true;
                            n += 1;
                        }
                    }
                }
                (Some(bits), n)
            }
        };
        if passing == 0 {
            return Ok(Vec::new());
        }
        let ok = |s: u32| match &accept {
            Some(bits) => bits[s as usize],
            None => self.chunks[s as usize].is_some(),
        };
        let depth = match (opts.mode, opts.mmr_lambda) {
            (_, Some(_)) | (SearchMode::Hybrid, _) => opts
                .candidates
                .unwrap_or(if opts.mmr_lambda.is_some() {
                    (4 * opts.k).max(20)
                } else {
                    (2 * opts.k).max(100)
                })
                .max(opts.k),
            _ => opts.k,
        };
        let dense = match (&q, opts.mode) {
            (Some(q), SearchMode::Exact) => self.exact(q, depth, &ok),
            (Some(q), _) if accept.is_some() && passing < self.config.exact_below => {
                self.exact(q, depth, &ok)
            }
            (Some(q), _) => {
                let ef = opts.ef.unwrap_or(self.config.ef_search).max(depth);
                self.approximate(q, depth, ef, &ok)
            }
            (None, _) => Vec::new(),
        };
        let sparse = match text {
            Some(t) => self.bm25.search(t, depth, &ok),
            None => Vec::new(),
        };
        let mut ranked: Vec<(f32, u32)> = match opts.mode {
            SearchMode::Exact | SearchMode::Hnsw => dense.clone(),
            SearchMode::Bm25 => sparse.clone(),
            SearchMode::Hybrid => fuse(&dense, &sparse, opts.fusion),
        };
        if let Some(lambda) = opts.mmr_lambda {
            // Redundancy is measured on the stored chunk vectors (also for BM25-only searches).
            ranked = mmr(&ranked, opts.k, lambda, |a, b| {
                simd::dot(self.row(a), self.row(b))
            });
        }
        ranked.truncate(opts.k);
        if let Some(min) = opts.min_score {
            ranked.retain(|r| r.0 >= min);
        }
        let dense: HashMap<u32, f32> = dense.into_iter().map(|(x, s)| (s, x)).collect();
        let sparse: HashMap<u32, f32> = sparse.into_iter().map(|(x, s)| (s, x)).collect();
        Ok(ranked
            .into_iter()
            .filter_map(|(score, s)| {
                Some(Hit {
                    chunk: self.chunks[s as usize].as_ref()?,
                    score,
                    vector_score: dense.get(&s).copied(),
                    keyword_score: sparse.get(&s).copied(),
                })
            })
            .collect())
    }

    /// Brute force over the accepted live slots.
    fn exact(&self, q: &[f32], k: usize, ok: &dyn Fn(u32) -> bool) -> Vec<(f32, u32)> {
        let mut v: Vec<(f32, u32)> = (0..self.chunks.len() as u32)
            .filter(|&s| ok(s))
            .map(|s| (simd::dot(q, self.row(s)), s))
            .collect();
        top_k(&mut v, k);
        v
    }

    /// HNSW over each segment plus the exact tail, merged.
    fn approximate(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        ok: &dyn Fn(u32) -> bool,
    ) -> Vec<(f32, u32)> {
        let mut v: Vec<(f32, u32)> = self
            .tail
            .iter()
            .filter(|&&s| ok(s))
            .map(|&s| (simd::dot(q, self.row(s)), s))
            .collect();
        for seg in &self.segments {
            v.extend(seg.search(q, &self.vectors, self.dim, ef, ok));
        }
        top_k(&mut v, k);
        v
    }
}

/// Fuse a vector ranking and a keyword ranking (each `(score, slot)`, best first).
fn fuse(dense: &[(f32, u32)], sparse: &[(f32, u32)], fusion: Fusion) -> Vec<(f32, u32)> {
    let mut acc: HashMap<u32, f32> = HashMap::new();
    match fusion {
        Fusion::Rrf { k } => {
            for list in [dense, sparse] {
                for (rank, &(_, s)) in list.iter().enumerate() {
                    *acc.entry(s).or_default() += 1.0 / (k + rank as f32 + 1.0);
                }
            }
        }
        Fusion::Weighted { alpha } => {
            for (list, w) in [(dense, alpha), (sparse, 1.0 - alpha)] {
                let (lo, hi) = list
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), x| {
                        (l.min(x.0), h.max(x.0))
                    });
                for &(x, s) in list {
                    let norm = if hi > lo { (x - lo) / (hi - lo) } else { 1.0 };
                    *acc.entry(s).or_default() += w * norm;
                }
            }
        }
    }
    let mut v: Vec<(f32, u32)> = acc.into_iter().map(|(s, x)| (x, s)).collect();
    let n = v.len();
    top_k(&mut v, n);
    v
}

/// Maximal marginal relevance: pick `k` of `ranked` (best first), each maximizing
/// `λ · relevance − (1 − λ) · max similarity to the picked ones`, relevance min-max normalized to [0, 1].
/// Scores in the output stay the original relevance scores.
fn mmr(
    ranked: &[(f32, u32)],
    k: usize,
    lambda: f32,
    sim: impl Fn(u32, u32) -> f32,
) -> Vec<(f32, u32)> {
    let (lo, hi) = ranked
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), x| {
            (l.min(x.0), h.max(x.0))
        });
    let rel = |x: f32| if hi > lo { (x - lo) / (hi - lo) } else { 1.0 };
    let mut left: Vec<(f32, u32)> = ranked.to_vec();
    let mut picked: Vec<(f32, u32)> = Vec::with_capacity(k);
    let mut max_sim = vec![f32::NEG_INFINITY; left.len()];
    while picked.len() < k && !left.is_empty() {
        let mut best = 0;
        let mut best_v = f32::NEG_INFINITY;
        for (i, &(x, _)) in left.iter().enumerate() {
            let red = if picked.is_empty() { 0.0 } else { max_sim[i] };
            let v = lambda * rel(x) - (1.0 - lambda) * red;
            if v > best_v {
                best_v = v;
                best = i;
            }
        }
        let chosen = left.swap_remove(best);
        max_sim.swap_remove(best);
        for (i, &(_, s)) in left.iter().enumerate() {
            max_sim[i] = max_sim[i].max(sim(chosen.1, s));
        }
        picked.push(chosen);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_and_weighted_fusion_by_hand() {
        let dense = [(0.9, 1), (0.8, 2), (0.1, 3)];
        let sparse = [(5.0, 3), (1.0, 1)];
        let f = fuse(&dense, &sparse, Fusion::Rrf { k: 60.0 });
        // slot 1: 1/61 + 1/62; slot 3: 1/63 + 1/61; slot 2: 1/62.
        assert_eq!(f.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 3, 2]);
        assert!((f[0].0 - (1.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-7);
        let w = fuse(&dense, &sparse, Fusion::Weighted { alpha: 0.5 });
        // normalized dense: 1 → 1, 2 → 0.875, 3 → 0; sparse: 3 → 1, 1 → 0.
        // slot 1: 0.5; slot 2: 0.4375; slot 3: 0.5 → ties by slot.
        assert_eq!(w.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 3, 2]);
        assert!((w[2].0 - 0.4375).abs() < 1e-6);
    }

    #[test]
    fn mmr_skips_near_duplicates() {
        // Slots 1 and 2 are identical; 3 is different but a little less relevant.
        let ranked = [(1.0, 1), (0.99, 2), (0.9, 3)];
        let sim = |a: u32, b: u32| {
            if (a == 1 || a == 2) && (b == 1 || b == 2) {
                1.0
            } else {
                0.0
            }
        };
        let picked = mmr(&ranked, 2, 0.5, sim);
        assert_eq!(picked.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 3]);
        let plain = mmr(&ranked, 2, 1.0, sim);
        assert_eq!(plain.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn filters() {
        let d = DocInfo {
            id: "a".into(),
            title: Some("T".into()),
            metadata: [("year", "2021"), ("lang", "en"), ("date", "2024-03-01")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        };
        let f: Filter =
            serde_json::from_str(r#"{"range": {"key": "year", "min": 2020, "max": 2021}}"#)
                .unwrap();
        assert!(f.matches(&d));
        let f: Filter = serde_json::from_str(r#"{"range": {"key": "year", "min": 2022}}"#).unwrap();
        assert!(!f.matches(&d));
        let f: Filter =
            serde_json::from_str(r#"{"range": {"key": "date", "min": "2024-01-01"}}"#).unwrap();
        assert!(f.matches(&d));
        let f: Filter = serde_json::from_str(
            r#"{"and": [{"eq": {"key": "lang", "value": "en"}}, {"in": {"key": "doc_id", "values": ["a", "b"]}}, {"not": {"eq": {"key": "title", "value": "X"}}}]}"#,
        )
        .unwrap();
        assert!(f.matches(&d));
        let f: Filter = serde_json::from_str(r#"{"eq": {"key": "missing", "value": ""}}"#).unwrap();
        assert!(!f.matches(&d));
        let f: Filter = serde_json::from_str(r#"{"range": {"key": "lang", "min": 1}}"#).unwrap();
        assert!(!f.matches(&d), "a non-number never passes a numeric range");
    }
}
