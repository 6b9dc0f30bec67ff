//! BM25 keyword index over chunk text.
//!
//! The analyzer follows Elasticsearch's `english` analyzer, which BEIR's published BM25 figures use: Unicode
//! word splitting (letters and digits; apostrophes inside words kept, then an English possessive `'s`
//! dropped), lower-casing, Lucene's English stop words, then an English stemmer (Snowball's English, i.e.
//! Porter2, from `rust-stemmers`; Elasticsearch uses the original Porter, which differs on a few suffixes).
//! Scores are Okapi BM25 with Lucene's idf `ln(1 + (N - df + 0.5) / (df + 0.5))`.
//!
//! Updatable like the vector index: a deleted slot's postings stay until [`Bm25::rebuild`] (at compaction),
//! but it no longer counts in `N`, `df` or the average length, and queries skip it.

use std::collections::HashMap;

use rust_stemmers::{Algorithm, Stemmer};

/// BM25 parameters (Lucene and Elasticsearch defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Bm25Params {
    /// Term-frequency saturation.
    pub k1: f32,
    /// Length normalization (0 = none, 1 = full).
    pub b: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Bm25Params { k1: 1.2, b: 0.75 }
    }
}

/// Lucene's `EnglishAnalyzer` stop set.
const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Longest token kept (longer runs are cut there; Lucene's standard tokenizer uses 255).
const MAX_TOKEN_CHARS: usize = 255;

/// Text → terms, the same for documents and queries.
pub struct Analyzer {
    stemmer: Stemmer,
}

impl Default for Analyzer {
    fn default() -> Self {
        Analyzer {
            stemmer: Stemmer::create(Algorithm::English),
        }
    }
}

impl Analyzer {
    /// The terms of `text`, in order (stop words removed, stemmed).
    pub fn terms(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut chars = text.chars().peekable();
        let flush = |word: &mut String, out: &mut Vec<String>| {
            if word.is_empty() {
                return;
            }
            let mut w = std::mem::take(word).to_lowercase();
            for suffix in ["'s", "\u{2019}s"] {
                if w.len() > suffix.len() && w.ends_with(suffix) {
                    w.truncate(w.len() - suffix.len());
                }
            }
            let w: String = w
                .chars()
                .filter(|&c| c != '\'' && c != '\u{2019}')
                .collect();
            if w.is_empty() || STOP.contains(&w.as_str()) {
                return;
            }
            out.push(self.stemmer.stem(&w).into_owned());
        };
        let mut n = 0;
        while let Some(c) = chars.next() {
            let inner_apostrophe = (c == '\'' || c == '\u{2019}')
                && !word.is_empty()
                && chars.peek().is_some_and(|p| p.is_alphanumeric());
            if (c.is_alphanumeric() || inner_apostrophe) && n < MAX_TOKEN_CHARS {
                word.push(c);
                n += 1;
            } else {
                flush(&mut word, &mut out);
                n = 0;
                if c.is_alphanumeric() {
                    word.push(c);
                    n = 1;
                }
            }
        }
        flush(&mut word, &mut out);
        out
    }
}

/// An inverted index: term → postings `(slot, term frequency)`, plus each slot's length in terms.
#[derive(Default)]
pub struct Bm25 {
    pub(crate) params: Bm25Params,
    analyzer: Analyzer,
    /// term → term id.
    pub(crate) terms: HashMap<String, u32>,
    /// term id → term (the inverse of `terms`, for saving).
    pub(crate) term_names: Vec<String>,
    /// term id → postings, slots increasing.
    pub(crate) postings: Vec<Vec<(u32, u32)>>,
    /// term id → live documents containing it.
    pub(crate) df: Vec<u32>,
    /// slot → length in terms (0 for slots never indexed).
    pub(crate) lengths: Vec<u32>,
    /// slot → live.
    pub(crate) live: Vec<bool>,
    pub(crate) live_count: u32,
    pub(crate) total_len: u64,
}

impl std::fmt::Debug for Bm25 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bm25")
            .field("params", &self.params)
            .field("terms", &self.term_names.len())
            .field("live", &self.live_count)
            .finish()
    }
}

impl Bm25 {
    /// An empty index.
    pub fn new(params: Bm25Params) -> Self {
        Bm25 {
            params,
            ..Default::default()
        }
    }

    /// The analyzer the index uses.
    pub fn analyzer(&self) -> &Analyzer {
        &self.analyzer
    }

    /// Index `text` as `slot` (slots are added in increasing order, each once).
    pub fn add(&mut self, slot: u32, text: &str) {
        let terms = self.analyzer.terms(text);
        let mut tf: HashMap<u32, u32> = HashMap::new();
        for t in &terms {
            let id = match self.terms.get(t) {
                Some(&id) => id,
                None => {
                    let id = self.term_names.len() as u32;
                    self.terms.insert(t.clone(), id);
                    self.term_names.push(t.clone());
                    self.postings.push(Vec::new());
                    self.df.push(0);
                    id
                }
            };
            *tf.entry(id).or_default() += 1;
        }
        let mut tf: Vec<(u32, u32)> = tf.into_iter().collect();
        tf.sort_unstable();
        for (id, f) in tf {
            self.postings[id as usize].push((slot, f));
            self.df[id as usize] += 1;
        }
        let s = slot as usize;
        if self.lengths.len() <= s {
            self.lengths.resize(s + 1, 0);
            self.live.resize(s + 1, false);
        }
        self.lengths[s] = terms.len() as u32;
        self.live[s] = true;
        self.live_count += 1;
        self.total_len += terms.len() as u64;
    }

    /// Forget `slot` (its `text` is needed to find its terms).
    pub fn remove(&mut self, slot: u32, text: &str) {
        let s = slot as usize;
        if !self.live.get(s).copied().unwrap_or(false) {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        for t in self.analyzer.terms(text) {
            if let Some(&id) = self.terms.get(&t) {
                if seen.insert(id) {
                    self.df[id as usize] = self.df[id as usize].saturating_sub(1);
                }
            }
        }
        self.live[s] = false;
        self.live_count -= 1;
        self.total_len -= self.lengths[s] as u64;
    }

    /// Rebuild from scratch over `(slot, text)` (compaction: drops dead postings and unused terms).
    pub fn rebuild<'a>(&mut self, docs: impl Iterator<Item = (u32, &'a str)>) {
        let params = self.params;
        *self = Bm25::new(params);
        for (slot, text) in docs {
            self.add(slot, text);
        }
    }

    /// The best `k` live slots for `query` with `accept(slot)`, as `(score, slot)`, best first.
    pub fn search(&self, query: &str, k: usize, accept: &dyn Fn(u32) -> bool) -> Vec<(f32, u32)> {
        if k == 0 || self.live_count == 0 {
            return Vec::new();
        }
        let n = self.live_count as f32;
        let avgdl = (self.total_len as f32 / n).max(1e-6);
        let Bm25Params { k1, b } = self.params;
        let mut scores: HashMap<u32, f32> = HashMap::new();
        for t in self.analyzer.terms(query) {
            let Some(&id) = self.terms.get(&t) else {
                continue;
            };
            let df = self.df[id as usize] as f32;
            if df == 0.0 {
                continue;
            }
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(slot, tf) in &self.postings[id as usize] {
                if !self.live[slot as usize] {
                    continue;
                }
                let dl = self.lengths[slot as usize] as f32;
                let tf = tf as f32;
                let s = idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * dl / avgdl));
                *scores.entry(slot).or_default() += s;
            }
        }
        let mut out: Vec<(f32, u32)> = scores
            .into_iter()
            .filter(|&(slot, _)| accept(slot))
            .map(|(slot, s)| (s, slot))
            .collect();
        top_k(&mut out, k);
        out
    }

    /// Bytes held by postings, lengths and the vocabulary.
    pub fn memory_bytes(&self) -> usize {
        self.postings
            .iter()
            .map(|p| p.len() * 8 + 24)
            .sum::<usize>()
            + self
                .term_names
                .iter()
                .map(|t| t.len() + 24 + 4 + 8)
                .sum::<usize>()
            + self.lengths.len() * 5
    }
}

/// Keep the best `k` of `(score, id)`, sorted best first (ties by id).
pub(crate) fn top_k(v: &mut Vec<(f32, u32)>, k: usize) {
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if v.len() > k && k > 0 {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.truncate(k);
    v.sort_by(cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyzer_words_stops_stems_possessives() {
        let a = Analyzer::default();
        assert_eq!(
            a.terms("The runners' RUNNING quickly: the dog's bones, Ünïcode déjà-vu 42x!"),
            [
                "runner",
                "run",
                "quick",
                "dog",
                "bone",
                "ünïcode",
                "déjà",
                "vu",
                "42x"
            ]
        );
        assert_eq!(a.terms("it isn't"), ["isnt"]);
        assert!(a.terms("the of and ... !!").is_empty());
        assert_eq!(a.terms("日本語 text"), ["日本語", "text"]);
    }

    /// Scores checked by hand against the BM25 formula on a three-document corpus.
    #[test]
    fn scores_by_hand() {
        let mut ix = Bm25::new(Bm25Params::default());
        ix.add(0, "apple banana apple");
        ix.add(1, "banana cherry");
        ix.add(2, "cherry date elderberry fig");
        // "apple": df 1, N 3 → idf = ln(1 + 2.5/1.5). Doc 0: tf 2, dl 3, avgdl 3 → tf·2.2 / (2 + 1.2).
        let idf = (1.0f32 + 2.5 / 1.5).ln();
        let want0 = idf * 2.0 * 2.2 / (2.0 + 1.2);
        let got = ix.search("apple", 10, &|_| true);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, 0);
        assert!((got[0].0 - want0).abs() < 1e-5, "{got:?} vs {want0}");
        // "banana": df 2 → idf ln(1 + 1.5/2.5); doc 1 (dl 2) outranks doc 0 (dl 3) at tf 1.
        let got = ix.search("banana", 10, &|_| true);
        assert_eq!(got.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 0]);
        let idf_b = (1.0f32 + 1.5 / 2.5).ln();
        let want1 = idf_b * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * 2.0 / 3.0));
        assert!((got[0].0 - want1).abs() < 1e-5);
        // Deleting doc 0: "apple" disappears; N, df and avgdl follow.
        ix.remove(0, "apple banana apple");
        assert!(ix.search("apple", 10, &|_| true).is_empty());
        let got = ix.search("banana", 10, &|_| true);
        let idf_b = (1.0f32 + 1.5 / 1.5).ln();
        let want = idf_b * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * 2.0 / 3.0));
        assert_eq!(got.len(), 1);
        assert!((got[0].0 - want).abs() < 1e-5, "{got:?} vs {want}");
        // accept() filters, k bounds.
        assert!(ix.search("cherry", 10, &|s| s != 1 && s != 2).is_empty());
        assert_eq!(ix.search("cherry banana", 1, &|_| true).len(), 1);
        assert!(ix.search("cherry", 0, &|_| true).is_empty());
    }
}
