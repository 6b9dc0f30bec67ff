//! Ingestion: bytes in, text with structure out.
//!
//! [`ingest`] turns the bytes of a plain-text, Markdown, HTML or PDF file into a [`Document`]: the
//! extracted text, a list of [`Block`]s (heading path, kind, range in the text, span in the original
//! bytes, page) and metadata. For plain text and Markdown the document text *is* the source (strict
//! UTF-8), so every span maps back byte for byte; for HTML the text is the visible text with
//! entities decoded and each block records the byte range of the source it came from; for PDF each
//! block records its page.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use crate::error::Format;
use crate::{Error, Limits, Result};

#[cfg(feature = "html")]
mod html;
mod markdown;
#[cfg(feature = "pdf")]
mod pdf;
mod text;

/// What a block is, as far as the source format says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// A heading; its text is also the last element of its heading path.
    Heading,
    /// Running text.
    Paragraph,
    /// A list (Markdown keeps the whole list as one block; HTML one block per item).
    List,
    /// Preformatted code.
    Code,
    /// A table (rows as text).
    Table,
    /// A block quote.
    Quote,
    /// Anything else (raw HTML in Markdown, thematic breaks…).
    Other,
}

/// A structural unit of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// What kind of block this is.
    pub kind: BlockKind,
    /// Titles of the enclosing headings, outermost first (a heading block includes itself).
    pub heading_path: Vec<String>,
    /// Byte range of this block in [`Document::text`]; never starts or ends with whitespace.
    pub range: Range<usize>,
    /// Byte range in the original bytes this block came from (`None` for PDF).
    pub source: Option<Range<usize>>,
    /// 1-based page number (PDF only).
    pub page: Option<u32>,
}

/// A warning about a document that was still ingested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Warning {
    /// The document produced no text at all (for a PDF: no text layer, e.g. a scan).
    NoText,
    /// Invalid UTF-8 was replaced by U+FFFD (lossy decoding was asked for).
    LossyUtf8 {
        /// Number of replaced sequences.
        replaced: usize,
    },
    /// Bidirectional control characters (possible "Trojan Source" text); kept in the text.
    BidiControls {
        /// How many were found.
        count: usize,
    },
    /// Some PDF pages could not be read; the others were.
    PdfPagesSkipped {
        /// The 1-based numbers of the skipped pages.
        pages: Vec<u32>,
        /// The first reason given.
        reason: String,
    },
}

/// Text with structure: what ingestion produces and chunking consumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Caller-chosen identifier (file name, URL, database key…).
    pub id: String,
    /// Title from the format's metadata (front matter, `<title>`, PDF Info) or the first heading.
    pub title: Option<String>,
    /// The format the bytes were read as.
    pub format: Format,
    /// Metadata: Markdown front matter, HTML `<meta name>` and PDF Info entries, as strings.
    pub metadata: BTreeMap<String, String>,
    /// The extracted text. Block ranges and chunk spans index into it.
    pub text: String,
    /// Blocks in reading order; their ranges do not overlap and are increasing.
    pub blocks: Vec<Block>,
    /// Things worth knowing that did not stop ingestion.
    pub warnings: Vec<Warning>,
    /// Length of the original bytes.
    pub source_len: usize,
    /// True when [`Document::text`] equals the original bytes, so any text range is also a source range.
    pub text_is_source: bool,
}

impl Document {
    /// The text of one block.
    pub fn block_text(&self, block: &Block) -> &str {
        &self.text[block.range.clone()]
    }

    /// Check the invariants the chunker relies on: block ranges inside the text, on character boundaries,
    /// increasing and non-overlapping; source spans inside the original; `text_is_source` only with a source
    /// as long as the text. [`ingest`] always produces valid documents; this guards documents that come back
    /// from JS or are built by hand.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidDocument(what));
        let mut prev_end = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            let r = &b.range;
            if r.start > r.end || r.end > self.text.len() {
                return bad(format!(
                    "block {i} range {}..{} is outside the text ({} bytes)",
                    r.start,
                    r.end,
                    self.text.len()
                ));
            }
            if !self.text.is_char_boundary(r.start) || !self.text.is_char_boundary(r.end) {
                return bad(format!(
                    "block {i} range {}..{} splits a UTF-8 character",
                    r.start, r.end
                ));
            }
            if r.start < prev_end {
                return bad(format!(
                    "block {i} overlaps or precedes block {}",
                    i.saturating_sub(1)
                ));
            }
            if let Some(s) = &b.source {
                if s.start > s.end || s.end > self.source_len {
                    return bad(format!(
                        "block {i} source span {}..{} is outside the source ({} bytes)",
                        s.start, s.end, self.source_len
                    ));
                }
            }
            prev_end = r.end;
        }
        if self.text_is_source && self.source_len != self.text.len() {
            return bad("text_is_source but the source length differs from the text".into());
        }
        Ok(())
    }

    /// Map a byte range of [`Document::text`] to the byte range of the original it came from, when known.
    ///
    /// Exact for plain text and Markdown. For HTML, a range inside one block maps to that block's source
    /// span (the text was decoded and whitespace-collapsed, so finer positions are not meaningful), and a
    /// range over several blocks to the union of their spans. `None` for PDF.
    pub fn source_range(&self, range: Range<usize>) -> Option<Range<usize>> {
        if self.text_is_source {
            return Some(range);
        }
        let first = self.blocks.iter().find(|b| b.range.end > range.start)?;
        let last = self
            .blocks
            .iter()
            .rev()
            .find(|b| b.range.start < range.end)?;
        Some(first.source.as_ref()?.start..last.source.as_ref()?.end)
    }
}

/// How to read a document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestOptions {
    /// Force a format; otherwise it is told from the file name, then from the bytes.
    pub format: Option<Format>,
    /// Replace invalid UTF-8 with U+FFFD (plain text and Markdown) instead of failing.
    pub lossy_utf8: bool,
    /// Caps on the input.
    pub limits: Limits,
}

/// Guess a format from a file name (extension) or, failing that, from the first bytes.
pub fn detect_format(name: &str, bytes: &[u8]) -> Result<Format> {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "md" | "markdown" | "mdx" | "mdown" => return Ok(Format::Markdown),
        "html" | "htm" | "xhtml" => return Ok(Format::Html),
        "pdf" => return Ok(Format::Pdf),
        "txt" | "text" | "log" | "csv" | "tsv" => return Ok(Format::Text),
        _ => {}
    }
    let head = &bytes[..bytes.len().min(1024)];
    if head.starts_with(b"%PDF-") {
        return Ok(Format::Pdf);
    }
    let trimmed = String::from_utf8_lossy(head);
    let t = trimmed
        .trim_start_matches('\u{feff}')
        .trim_start()
        .to_ascii_lowercase();
    if t.starts_with("<!doctype html")
        || t.starts_with("<html")
        || t.starts_with("<head")
        || t.starts_with("<body")
    {
        return Ok(Format::Html);
    }
    if ext.is_empty() || !bytes.is_empty() && std::str::from_utf8(head).is_ok() {
        return Ok(Format::Text);
    }
    Err(Error::UnknownFormat(name.to_string()))
}

/// Ingest one document. `id` names it (a file name works, and its extension picks the format).
///
/// ```
/// use lorag::{ingest, IngestOptions};
/// let doc = ingest("notes.md", b"# Title\n\nSome *text*.\n", &IngestOptions::default()).unwrap();
/// assert_eq!(doc.title.as_deref(), Some("Title"));
/// assert_eq!(doc.blocks.len(), 2);
/// assert_eq!(doc.blocks[1].heading_path, vec!["Title".to_string()]);
/// assert_eq!(doc.block_text(&doc.blocks[1]), "Some *text*.");
/// ```
pub fn ingest(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    Limits::check("document bytes", bytes.len(), opts.limits.max_doc_bytes)?;
    if bytes.is_empty() {
        return Err(Error::EmptyDocument);
    }
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(id, bytes)?,
    };
    let mut doc = match format {
        Format::Text => text::ingest(id, bytes, opts)?,
        Format::Markdown => markdown::ingest(id, bytes, opts)?,
        #[cfg(feature = "html")]
        Format::Html => html::ingest(id, bytes, opts)?,
        #[cfg(not(feature = "html"))]
        Format::Html => return Err(Error::FeatureDisabled("HTML", "html")),
        #[cfg(feature = "pdf")]
        Format::Pdf => pdf::ingest(id, bytes, opts)?,
        #[cfg(not(feature = "pdf"))]
        Format::Pdf => return Err(Error::FeatureDisabled("PDF", "pdf")),
    };
    doc.source_len = bytes.len();
    if doc.blocks.is_empty() {
        doc.warnings.push(Warning::NoText);
    }
    let bidi = doc.text.chars().filter(|&c| is_bidi_control(c)).count();
    if bidi > 0 {
        doc.warnings.push(Warning::BidiControls { count: bidi });
    }
    Ok(doc)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Decode UTF-8 (strictly, or lossily when asked), recording a warning for replacements.
pub(crate) fn decode_utf8(
    bytes: &[u8],
    lossy: bool,
    warnings: &mut Vec<Warning>,
) -> Result<(String, bool)> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok((s.to_string(), true)),
        Err(e) if !lossy => Err(Error::InvalidUtf8 {
            offset: e.valid_up_to(),
        }),
        Err(_) => {
            let replaced = bytes
                .utf8_chunks()
                .filter(|c| !c.invalid().is_empty())
                .count();
            warnings.push(Warning::LossyUtf8 { replaced });
            Ok((String::from_utf8_lossy(bytes).into_owned(), false))
        }
    }
}

/// Shrink `range` of `text` so it neither starts nor ends with whitespace; `None` when nothing is left.
pub(crate) fn trim_range(text: &str, range: Range<usize>) -> Option<Range<usize>> {
    let s = &text[range.clone()];
    let start = range.start + (s.len() - s.trim_start().len());
    let end = range.start + s.trim_end().len();
    (start < end).then_some(start..end)
}

/// Keeps the heading path while walking a document: push a heading of level `level`, read the path.
#[derive(Default)]
pub(crate) struct HeadingStack {
    stack: Vec<(u8, String)>,
}

impl HeadingStack {
    pub(crate) fn push(&mut self, level: u8, title: String) {
        while self.stack.last().is_some_and(|(l, _)| *l >= level) {
            self.stack.pop();
        }
        self.stack.push((level, title));
    }
    pub(crate) fn path(&self) -> Vec<String> {
        self.stack.iter().map(|(_, t)| t.clone()).collect()
    }
}

/// Collapse runs of whitespace to one space and trim: used for heading titles and metadata values.
pub(crate) fn squash_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
