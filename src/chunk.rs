//! Chunking: token-aware, structure-aware splitting with overlap and source spans.
//!
//! A [`Chunker`] cuts a [`Document`] into [`Chunk`]s of at most `size` units (tokens of the embedder's
//! tokenizer, or characters when no tokenizer is given), with consecutive chunks overlapping by at most
//! `overlap` units. Each block is tokenized once; cuts are made on token offsets at the largest boundary
//! that fits (section > paragraph > line/sentence > word), never inside a word unless one word alone is
//! larger than a chunk, and never inside a UTF-8 character. Every chunk carries its span in
//! [`Document::text`], the span in the original bytes where known, its page range, its heading path and
//! a content hash of the text the embedder will see.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ingest::{BlockKind, Document};
use crate::{Error, Result};

/// A tokenizer for counting and cutting: a Hugging Face `tokenizer.json` with padding and truncation off.
#[cfg(feature = "tokenizer")]
pub struct TokenCounter {
    inner: tokenizers::Tokenizer,
    fast: Option<crate::wordpiece::FastWordPiece>,
    special_tokens: usize,
    max_seq_length: usize,
}

/// Used when a model folder does not say: BERT-family sentence models mostly use 256 or 512.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

#[cfg(feature = "tokenizer")]
impl TokenCounter {
    /// Load from the bytes of `tokenizer.json` and, when present, `sentence_bert_config.json`
    /// (whose `max_seq_length` sets the default chunk size; the padding and truncation baked into
    /// `tokenizer.json` are ignored).
    pub fn from_bytes(tokenizer_json: &[u8], sentence_bert_config: Option<&[u8]>) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let special_tokens = inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        let max_seq_length = match sentence_bert_config {
            Some(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(bytes)
                    .map_err(|e| Error::Config(format!("sentence_bert_config.json: {e}")))?;
                match v.get("max_seq_length").and_then(|m| m.as_u64()) {
                    Some(m) if m > special_tokens as u64 && m <= 1 << 20 => m as usize,
                    _ => {
                        return Err(Error::Config(
                            "sentence_bert_config.json: max_seq_length missing or out of range"
                                .into(),
                        ))
                    }
                }
            }
            None => DEFAULT_MAX_SEQ_LENGTH,
        };
        let fast = crate::wordpiece::FastWordPiece::from_tokenizer_json(tokenizer_json);
        Ok(TokenCounter {
            inner,
            fast,
            special_tokens,
            max_seq_length,
        })
    }

    /// The model's maximum sequence length (from `sentence_bert_config.json`, else [`DEFAULT_MAX_SEQ_LENGTH`]).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Number of special tokens the post-processor adds to one sequence (`[CLS]`, `[SEP]` for BERT).
    pub fn special_tokens(&self) -> usize {
        self.special_tokens
    }

    /// Number of tokens in `text`, without special tokens.
    pub fn count(&self, text: &str) -> Result<usize> {
        if self.fast.is_some() {
            return Ok(self.offsets(text)?.len());
        }
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .len())
    }

    /// Byte offsets of the tokens of `text`, without special tokens: exactly what `tokenizers`' `encode`
    /// gives, computed on the fast path where the tokenizer allows it (see [`crate::wordpiece`]).
    pub fn offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let Some(fast) = &self.fast else {
            return self.offsets_reference(text);
        };
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(text.len() / 4);
        let (mut word, mut align) = (Vec::new(), Vec::new());
        // Runs of text between ASCII whitespace; consecutive runs the fast path cannot take are sent to
        // the tokenizers crate together.
        let mut slow: Option<(usize, usize)> = None;
        let mut i = 0;
        while i < bytes.len() {
            if matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
                i += 1;
            }
            let run = &bytes[start..i];
            if fast.accepts(run) {
                if let Some((s, e)) = slow.take() {
                    self.slow_offsets(text, s, e, &mut out)?;
                }
                fast.run_offsets(run, start, &mut out, &mut word, &mut align);
            } else {
                slow = Some((slow.map_or(start, |(s, _)| s), i));
            }
        }
        if let Some((s, e)) = slow {
            self.slow_offsets(text, s, e, &mut out)?;
        }
        Ok(out)
    }

    fn slow_offsets(
        &self,
        text: &str,
        s: usize,
        e: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        let enc = self
            .inner
            .encode(&text[s..e], false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        out.extend(enc.get_offsets().iter().map(|&(a, b)| (s + a, s + b)));
        Ok(())
    }

    /// Offsets straight from the `tokenizers` crate, without the fast path (the reference it is tested against).
    #[doc(hidden)]
    pub fn offsets_reference(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_offsets()
            .to_vec())
    }

    /// Whether the exact fast path is in use for this tokenizer.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }
}

/// Chunking settings. `None` means "the default for this tokenizer".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChunkConfig {
    /// Most units (tokens, or characters without a tokenizer) per chunk. Default: the embedder's
    /// `max_seq_length` minus its special tokens; 1000 characters without a tokenizer.
    pub size: Option<usize>,
    /// Most units shared by consecutive chunks. Default: 15 % of `size`.
    pub overlap: Option<usize>,
    /// Prefix each chunk's embedding text with its heading path (`A > B\n`); the prefix counts toward `size`.
    pub prefix_headings: bool,
}

/// Default chunk size in characters when there is no tokenizer.
pub const DEFAULT_CHAR_CHUNK: usize = 1000;

/// The unit chunk sizes are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Tokens of the tokenizer.
    Tokens,
    /// Unicode scalar values.
    Chars,
}

/// A piece of a document, sized for the embedder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// `"{doc_id}#{index}"`.
    pub id: String,
    /// The document's id.
    pub doc_id: String,
    /// Position of the chunk in the document, from 0.
    pub index: u32,
    /// Byte range in [`Document::text`]; `text == doc.text[span]`.
    pub span: Range<usize>,
    /// Byte range in the original bytes, where known (exact for text and Markdown; see [`Document::source_range`]).
    pub source_span: Option<Range<usize>>,
    /// First and last page (PDF only).
    pub pages: Option<(u32, u32)>,
    /// Heading path shared by the chunk's blocks (outermost first).
    pub heading_path: Vec<String>,
    /// Size in the chunker's unit ([`Chunker::unit`]), not counting a heading prefix.
    pub size: u32,
    /// The chunk text.
    pub text: String,
    /// Hex SHA-256 (first 128 bits) of [`Chunk::embed_text`]: unchanged chunks need no new embedding.
    pub hash: String,
    /// Whether [`Chunk::embed_text`] starts with the heading path.
    pub prefix_headings: bool,
}

impl Chunk {
    /// The text to embed: the heading path (`A > B`) and a newline before the text when the chunker was
    /// configured with `prefix_headings`, else the text itself.
    pub fn embed_text(&self) -> String {
        match (self.prefix_headings, self.heading_path.is_empty()) {
            (true, false) => format!("{}\n{}", self.heading_path.join(" > "), self.text),
            _ => self.text.clone(),
        }
    }
}

/// Splits documents into chunks. Build once per embedder, reuse for every document.
///
/// ```
/// use lorag::{ingest, Chunker, ChunkConfig, IngestOptions};
/// let doc = ingest("a.txt", "One. Two three.\n\nFour five six seven.".as_bytes(), &IngestOptions::default()).unwrap();
/// let chunker = Chunker::chars(ChunkConfig { size: Some(20), overlap: Some(5), ..Default::default() }).unwrap();
/// let chunks = chunker.chunk(&doc).unwrap();
/// assert_eq!(chunks.len(), 2);
/// assert_eq!(chunks[0].text, "One. Two three.");
/// assert_eq!(chunks[1].text, "Four five six seven.");
/// ```
pub struct Chunker {
    #[cfg(feature = "tokenizer")]
    tokenizer: Option<TokenCounter>,
    size: usize,
    overlap: usize,
    prefix_headings: bool,
}

/// Blocks are tokenized in segments of about this many bytes, cut before a whitespace character, so that a
/// huge single-line document does not become one huge tokenizer call.
const SEGMENT_BYTES: usize = 16 * 1024;

/// Tokens longer than this (in bytes) are split into pieces of [`LONG_TOKEN_CHARS`] characters.
#[cfg(feature = "tokenizer")]
const LONG_TOKEN_BYTES: usize = 400;
#[cfg(feature = "tokenizer")]
const LONG_TOKEN_CHARS: usize = 100;

/// Gap levels: what separates atom `i - 1` from atom `i`.
const INSIDE_WORD: u8 = 0;
const WORD: u8 = 1;
const SENTENCE: u8 = 2;
const BLOCK: u8 = 3;
const SECTION: u8 = 4;

/// The units a document is cut into: token (or word, in character mode) byte ranges with their costs.
#[derive(Default)]
struct Atoms {
    start: Vec<u32>,
    end: Vec<u32>,
    /// Cumulative cost before and after each atom (tokens, or characters).
    cost_start: Vec<u64>,
    cost_end: Vec<u64>,
    block: Vec<u32>,
    /// `level[i]`: the boundary before atom `i` (`level[0]` unused).
    level: Vec<u8>,
}

impl Atoms {
    fn len(&self) -> usize {
        self.start.len()
    }
    fn cost(&self, s: usize, e: usize) -> u64 {
        if e <= s {
            0
        } else {
            self.cost_end[e - 1] - self.cost_start[s]
        }
    }
    fn push(&mut self, range: Range<usize>, cost_start: u64, cost_end: u64, block: usize) {
        self.start.push(range.start as u32);
        self.end.push(range.end as u32);
        self.cost_start.push(cost_start);
        self.cost_end.push(cost_end);
        self.block.push(block as u32);
    }
}

impl Chunker {
    /// A chunker that counts tokens of `tokenizer`.
    #[cfg(feature = "tokenizer")]
    pub fn new(tokenizer: TokenCounter, config: ChunkConfig) -> Result<Self> {
        let default = tokenizer
            .max_seq_length()
            .saturating_sub(tokenizer.special_tokens());
        let (size, overlap) = Self::sizes(&config, default)?;
        if size > default {
            return Err(Error::Config(format!(
                "chunk size {size} exceeds what the embedder reads ({} tokens minus {} special)",
                tokenizer.max_seq_length(),
                tokenizer.special_tokens()
            )));
        }
        Ok(Chunker {
            tokenizer: Some(tokenizer),
            size,
            overlap,
            prefix_headings: config.prefix_headings,
        })
    }

    /// A chunker that counts characters (no tokenizer).
    pub fn chars(config: ChunkConfig) -> Result<Self> {
        let (size, overlap) = Self::sizes(&config, DEFAULT_CHAR_CHUNK)?;
        Ok(Chunker {
            #[cfg(feature = "tokenizer")]
            tokenizer: None,
            size,
            overlap,
            prefix_headings: config.prefix_headings,
        })
    }

    fn sizes(config: &ChunkConfig, default_size: usize) -> Result<(usize, usize)> {
        let size = config.size.unwrap_or(default_size);
        if !(8..=1 << 24).contains(&size) {
            return Err(Error::Config(format!(
                "chunk size {size} is outside 8..=16777216"
            )));
        }
        let overlap = config.overlap.unwrap_or(size * 15 / 100);
        if overlap * 2 > size {
            return Err(Error::Config(format!(
                "overlap {overlap} is more than half the chunk size {size}"
            )));
        }
        Ok((size, overlap))
    }

    /// Chunk size in [`Chunker::unit`]s.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Overlap bound in [`Chunker::unit`]s.
    pub fn overlap(&self) -> usize {
        self.overlap
    }

    /// What sizes are counted in.
    pub fn unit(&self) -> Unit {
        #[cfg(feature = "tokenizer")]
        if self.tokenizer.is_some() {
            return Unit::Tokens;
        }
        Unit::Chars
    }

    /// The tokenizer, when counting tokens.
    #[cfg(feature = "tokenizer")]
    pub fn tokenizer(&self) -> Option<&TokenCounter> {
        self.tokenizer.as_ref()
    }

    /// Cut `doc` into chunks.
    pub fn chunk(&self, doc: &Document) -> Result<Vec<Chunk>> {
        doc.validate()?;
        let atoms = self.atoms(doc)?;
        let n = atoms.len();
        let mut chunks = Vec::new();
        let mut prefix_cost: HashMap<&[String], usize> = HashMap::new();
        let (mut s, mut floor) = (0, 0);
        while s < n {
            let budget = if self.prefix_headings {
                let path = &doc.blocks[atoms.block[s] as usize].heading_path;
                let cost = match prefix_cost.get(path.as_slice()) {
                    Some(c) => *c,
                    None => {
                        let c = self.measure(&format!("{}\n", path.join(" > ")))?;
                        prefix_cost.insert(path.as_slice(), c);
                        c
                    }
                };
                self.size
                    .saturating_sub(if path.is_empty() { 0 } else { cost })
                    .max(self.size / 2)
            } else {
                self.size
            } as u64;
            // The chunk must end past the previous one; if the overlap leaves no room for that, drop it.
            let cut = match self.choose_cut(&atoms, s, budget, floor) {
                Some(cut) => cut,
                None => {
                    s = floor;
                    continue;
                }
            };
            chunks.push(self.make_chunk(doc, &atoms, s, cut, chunks.len()));
            if cut >= n {
                break;
            }
            floor = cut;
            s = self.overlap_start(&atoms, s, cut);
        }
        Ok(chunks)
    }

    /// Where the chunk starting at atom `s` ends (exclusive), past `floor`; `None` when the budget ends first.
    fn choose_cut(&self, a: &Atoms, s: usize, budget: u64, floor: usize) -> Option<usize> {
        let n = a.len();
        // Largest e with cost(s, e) <= budget, at least s + 1.
        let base = a.cost_start[s];
        let e_max = s + a.cost_end[s..]
            .partition_point(|&c| c - base <= budget)
            .max(1);
        if e_max <= floor {
            return None;
        }
        let first = (s + 1).max(floor + 1);
        // A section boundary ends the chunk once it holds a meaningful amount of text.
        let min_section = (budget / 8).max(1);
        if let Some(g) =
            (first..e_max.min(n)).find(|&g| a.level[g] == SECTION && a.cost(s, g) >= min_section)
        {
            return Some(g);
        }
        if e_max >= n {
            return Some(n);
        }
        // Best boundary in the second half of the window, latest among the strongest; then anywhere.
        let half = budget / 2;
        for lo_ok in [true, false] {
            let mut best: Option<(u8, usize)> = None;
            for g in (first..=e_max).rev() {
                if lo_ok && a.cost(s, g) < half {
                    break;
                }
                let l = a.level[g];
                if l > INSIDE_WORD && best.is_none_or(|(bl, _)| l > bl) {
                    best = Some((l, g));
                }
            }
            if best.is_some() {
                return best.map(|(_, g)| g);
            }
        }
        Some(e_max) // one "word" longer than a chunk: cut between tokens (never inside a character)
    }

    /// Where the next chunk starts, given the previous one is `[s, cut)`: at most `overlap` units before
    /// `cut`, at the strongest boundary (earliest among equals); no overlap across a section boundary.
    fn overlap_start(&self, a: &Atoms, s: usize, cut: usize) -> usize {
        if self.overlap == 0 || a.level[cut] == SECTION {
            return cut;
        }
        let mut best: Option<(u8, usize)> = None;
        let mut g = cut;
        while g > s + 1 {
            g -= 1;
            if a.cost(g, cut) > self.overlap as u64 {
                break;
            }
            let l = a.level[g];
            if l > INSIDE_WORD && best.is_none_or(|(bl, _)| l >= bl) {
                best = Some((l, g));
            }
        }
        best.map_or(cut, |(_, g)| g)
    }

    fn make_chunk(&self, doc: &Document, a: &Atoms, s: usize, e: usize, index: usize) -> Chunk {
        let (b_first, b_last) = (a.block[s] as usize, a.block[e - 1] as usize);
        let first_block = &doc.blocks[b_first];
        let last_block = &doc.blocks[b_last];
        // Extend to the block edges so characters the tokenizer drops (controls, zero-width) stay covered.
        let start = if s == 0 || a.block[s - 1] as usize != b_first {
            first_block.range.start
        } else {
            a.start[s] as usize
        };
        let end = if e == a.len() || a.block[e] as usize != b_last {
            last_block.range.end
        } else {
            a.end[e - 1] as usize
        };
        let span = start..end;
        let mut heading_path = first_block.heading_path.clone();
        for b in &doc.blocks[b_first + 1..=b_last] {
            let common = heading_path
                .iter()
                .zip(&b.heading_path)
                .take_while(|(x, y)| x == y)
                .count();
            heading_path.truncate(common);
        }
        let pages = first_block.page.zip(last_block.page);
        let text = doc.text[span.clone()].to_string();
        let mut chunk = Chunk {
            id: format!("{}#{index}", doc.id),
            doc_id: doc.id.clone(),
            index: index as u32,
            source_span: doc.source_range(span.clone()),
            span,
            pages,
            heading_path,
            size: a.cost(s, e) as u32,
            text,
            hash: String::new(),
            prefix_headings: self.prefix_headings,
        };
        let digest = Sha256::digest(chunk.embed_text().as_bytes());
        chunk.hash = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        chunk
    }

    fn measure(&self, text: &str) -> Result<usize> {
        #[cfg(feature = "tokenizer")]
        if let Some(t) = &self.tokenizer {
            return t.count(text);
        }
        Ok(text.chars().count())
    }

    fn atoms(&self, doc: &Document) -> Result<Atoms> {
        let mut a = Atoms::default();
        let text = doc.text.as_str();
        let mut cost = 0u64;
        let mut prev_end = 0;
        for (bi, block) in doc.blocks.iter().enumerate() {
            if self.unit() == Unit::Chars {
                // Characters between blocks count when a chunk spans them.
                cost += text[prev_end.min(block.range.start)..block.range.start]
                    .chars()
                    .count() as u64;
            }
            prev_end = block.range.end;
            let first = a.len();
            let mut seg_start = block.range.start;
            while seg_start < block.range.end {
                let seg_end = segment_end(text, seg_start, block.range.end);
                self.segment_atoms(text, seg_start..seg_end, bi, &mut cost, &mut a)?;
                seg_start = seg_end;
            }
            if a.len() == first {
                // Nothing countable (only characters the tokenizer drops): keep the block as one free atom.
                a.push(block.range.clone(), cost, cost, bi);
            }
            // Boundary levels for this block's atoms.
            for i in first..a.len() {
                let level = if i == first {
                    if doc.blocks[bi].kind == BlockKind::Heading {
                        SECTION
                    } else {
                        BLOCK
                    }
                } else {
                    gap_level(text, a.end[i - 1] as usize, a.start[i] as usize)
                };
                a.level.push(level);
            }
        }
        a.level.push(SECTION); // boundary after the last atom (index n), used by overlap_start
        Ok(a)
    }

    fn segment_atoms(
        &self,
        text: &str,
        seg: Range<usize>,
        bi: usize,
        cost: &mut u64,
        a: &mut Atoms,
    ) -> Result<()> {
        let piece = &text[seg.clone()];
        #[cfg(feature = "tokenizer")]
        if let Some(t) = &self.tokenizer {
            for (ts, te) in t.offsets(piece)? {
                let (ts, te) = (seg.start + ts, seg.start + te);
                if te - ts > LONG_TOKEN_BYTES {
                    // A word too long for the vocabulary ([UNK] for WordPiece): split it into pieces of at
                    // most LONG_TOKEN_CHARS characters, one unit each, so a chunk's length stays bounded.
                    let mut ps = ts;
                    for (k, (off, _)) in text[ts..te].char_indices().enumerate() {
                        if k > 0 && k % LONG_TOKEN_CHARS == 0 {
                            a.push(ps..ts + off, *cost, *cost + 1, bi);
                            *cost += 1;
                            ps = ts + off;
                        }
                    }
                    a.push(ps..te, *cost, *cost + 1, bi);
                    *cost += 1;
                    continue;
                }
                // Tokens that overlap the previous one (one character split into several tokens) join it.
                if a.len() > 0
                    && a.block[a.len() - 1] as usize == bi
                    && (ts as u32) < a.end[a.len() - 1]
                {
                    let last = a.len() - 1;
                    a.end[last] = a.end[last].max(te as u32);
                    a.cost_end[last] += 1;
                } else {
                    a.push(ts..te.max(ts), *cost, *cost + 1, bi);
                }
                *cost += 1;
            }
            return Ok(());
        }
        // Character mode: atoms are whitespace-separated words, split into pieces no longer than a chunk.
        let max_piece = self.size.max(1);
        let mut word: Option<(usize, usize)> = None; // (byte start, chars so far)
        let mut char_pos = *cost;
        for (off, c) in piece.char_indices() {
            let at = seg.start + off;
            if c.is_whitespace() {
                if let Some((ws, len)) = word.take() {
                    a.push(ws..at, char_pos - len as u64, char_pos, bi);
                }
            } else {
                match word.as_mut() {
                    Some((ws, len)) if *len == max_piece => {
                        a.push(*ws..at, char_pos - *len as u64, char_pos, bi);
                        word = Some((at, 0));
                    }
                    None => word = Some((at, 0)),
                    _ => {}
                }
                word.as_mut().unwrap().1 += 1;
            }
            char_pos += 1;
        }
        if let Some((ws, len)) = word {
            a.push(ws..seg.end, char_pos - len as u64, char_pos, bi);
        }
        *cost = char_pos;
        Ok(())
    }
}

/// End of the tokenizer segment starting at `start`: about [`SEGMENT_BYTES`] on, just before a whitespace
/// character (so the whitespace goes with the next segment, as byte-level BPE expects), else at a char boundary.
fn segment_end(text: &str, start: usize, end: usize) -> usize {
    if end - start <= SEGMENT_BYTES {
        return end;
    }
    let mut limit = start + SEGMENT_BYTES;
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let window = &text[start..limit];
    match window.rfind(|c: char| c.is_whitespace()) {
        Some(p) if p > 0 => start + p,
        _ => limit,
    }
}

fn gap_level(text: &str, prev_end: usize, next_start: usize) -> u8 {
    if next_start <= prev_end {
        return INSIDE_WORD;
    }
    let gap = &text[prev_end..next_start];
    if gap.contains('\n') {
        return SENTENCE;
    }
    if !gap.chars().any(char::is_whitespace) {
        return INSIDE_WORD;
    }
    let before = text[..prev_end].trim_end_matches(['"', '\'', ')', ']', '”', '’', '»']);
    if before.ends_with(['.', '!', '?', '…', '。', '！', '？']) {
        SENTENCE
    } else {
        WORD
    }
}
