//! Plain text: paragraphs are separated by blank lines.

use super::{decode_utf8, trim_range, Block, BlockKind, Document, Format, IngestOptions};
use crate::Result;

pub(super) fn ingest(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    let mut warnings = Vec::new();
    let (text, exact) = decode_utf8(bytes, opts.lossy_utf8, &mut warnings)?;
    let blocks = paragraphs(&text, 0..text.len())
        .map(|range| Block {
            kind: BlockKind::Paragraph,
            heading_path: Vec::new(),
            source: exact.then(|| range.clone()),
            range,
            page: None,
        })
        .collect::<Vec<_>>();
    let title = blocks.first().map(|b| {
        let first_line = text[b.range.clone()].lines().next().unwrap_or("");
        super::squash_ws(&first_line.chars().take(120).collect::<String>())
    });
    Ok(Document {
        id: id.to_string(),
        title,
        format: Format::Text,
        metadata: Default::default(),
        text,
        blocks,
        warnings,
        source_len: bytes.len(),
        text_is_source: exact,
    })
}

/// Paragraph ranges (trimmed) inside `range` of `text`: runs of lines separated by blank lines.
pub(crate) fn paragraphs(
    text: &str,
    range: std::ops::Range<usize>,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut out = Vec::new();
    let mut para_start: Option<usize> = None;
    let mut pos = range.start;
    let body = &text[range.clone()];
    for line in body.split_inclusive('\n') {
        let blank = line.trim().is_empty();
        match (blank, para_start) {
            (true, Some(s)) => {
                out.extend(trim_range(text, s..pos));
                para_start = None;
            }
            (false, None) => para_start = Some(pos),
            _ => {}
        }
        pos += line.len();
    }
    if let Some(s) = para_start {
        out.extend(trim_range(text, s..range.end));
    }
    out.into_iter()
}
