//! Markdown through pulldown-cmark (CommonMark + GFM tables, task lists, footnotes, strikethrough).
//!
//! Blocks are the top-level elements; their text is the Markdown source itself (headings, list markers
//! and table pipes included), so a chunk's span reproduces the file byte for byte. YAML (`---`) or TOML
//! (`+++`) front matter becomes metadata and is not part of any block.

use pulldown_cmark::{Event, HeadingLevel, MetadataBlockKind, Options, Parser, Tag, TagEnd};

use super::{
    decode_utf8, squash_ws, trim_range, Block, BlockKind, Document, Format, HeadingStack,
    IngestOptions,
};
use crate::Result;

pub(super) fn ingest(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    let mut warnings = Vec::new();
    let (text, exact) = decode_utf8(bytes, opts.lossy_utf8, &mut warnings)?;
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_YAML_STYLE_METADATA_BLOCKS
        | Options::ENABLE_PLUSES_DELIMITED_METADATA_BLOCKS;
    let mut metadata = std::collections::BTreeMap::new();
    let mut blocks = Vec::new();
    let mut headings = HeadingStack::default();
    let mut first_h1: Option<String> = None;
    let mut depth = 0usize;
    // The top-level element being read: its kind, range and (for headings) level and title text.
    let mut current: Option<(BlockKind, std::ops::Range<usize>, Option<u8>)> = None;
    let mut heading_text = String::new();
    let mut in_metadata: Option<MetadataBlockKind> = None;

    for (event, range) in Parser::new_ext(&text, options).into_offset_iter() {
        match event {
            Event::Start(tag) => {
                if depth == 0 {
                    let (kind, level) = match &tag {
                        Tag::Heading { level, .. } => {
                            (BlockKind::Heading, Some(heading_level(*level)))
                        }
                        Tag::Paragraph => (BlockKind::Paragraph, None),
                        Tag::List(_) => (BlockKind::List, None),
                        Tag::CodeBlock(_) => (BlockKind::Code, None),
                        Tag::Table(_) => (BlockKind::Table, None),
                        Tag::BlockQuote(_) => (BlockKind::Quote, None),
                        Tag::MetadataBlock(k) => {
                            in_metadata = Some(*k);
                            (BlockKind::Other, None)
                        }
                        _ => (BlockKind::Other, None),
                    };
                    heading_text.clear();
                    current = Some((kind, range.clone(), level));
                }
                depth += 1;
            }
            Event::End(end) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    if matches!(end, TagEnd::MetadataBlock(_)) {
                        in_metadata = None;
                        current = None;
                        continue;
                    }
                    if let Some((kind, r, level)) = current.take() {
                        if let Some(level) = level {
                            let title = squash_ws(&heading_text);
                            if level == 1 && first_h1.is_none() && !title.is_empty() {
                                first_h1 = Some(title.clone());
                            }
                            headings.push(level, title);
                        }
                        push_block(&text, &mut blocks, kind, r, headings.path(), exact);
                    }
                }
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(kind) = in_metadata {
                    parse_front_matter(&t, kind, &mut metadata);
                } else if current.as_ref().is_some_and(|c| c.2.is_some()) {
                    heading_text.push_str(&t);
                } else if depth == 0 {
                    push_block(
                        &text,
                        &mut blocks,
                        BlockKind::Other,
                        range,
                        headings.path(),
                        exact,
                    );
                }
            }
            Event::Html(_) | Event::InlineHtml(_) | Event::Rule if depth == 0 => {
                push_block(
                    &text,
                    &mut blocks,
                    BlockKind::Other,
                    range,
                    headings.path(),
                    exact,
                );
            }
            Event::SoftBreak | Event::HardBreak
                if current.as_ref().is_some_and(|c| c.2.is_some()) =>
            {
                heading_text.push(' ');
            }
            _ => {}
        }
    }
    let title = metadata.get("title").cloned().or(first_h1);
    Ok(Document {
        id: id.to_string(),
        title,
        format: Format::Markdown,
        metadata,
        text,
        blocks,
        warnings,
        source_len: bytes.len(),
        text_is_source: exact,
    })
}

fn push_block(
    text: &str,
    blocks: &mut Vec<Block>,
    kind: BlockKind,
    r: std::ops::Range<usize>,
    path: Vec<String>,
    exact: bool,
) {
    if let Some(range) = trim_range(text, r) {
        // pulldown-cmark ranges are increasing for top-level elements; guard anyway so ranges never overlap.
        if blocks
            .last()
            .is_some_and(|b: &Block| b.range.end > range.start)
        {
            return;
        }
        blocks.push(Block {
            kind,
            heading_path: path,
            source: exact.then(|| range.clone()),
            range,
            page: None,
        });
    }
}

fn heading_level(l: HeadingLevel) -> u8 {
    match l {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

/// Flat `key: value` (YAML) or `key = value` (TOML) pairs; nested structures are kept as their raw text.
fn parse_front_matter(
    src: &str,
    kind: MetadataBlockKind,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    let sep = match kind {
        MetadataBlockKind::YamlStyle => ':',
        MetadataBlockKind::PlusesStyle => '=',
    };
    for line in src.lines() {
        if line.starts_with([' ', '\t', '#', '-', '[']) {
            continue;
        }
        if let Some((k, v)) = line.split_once(sep) {
            let key = k.trim();
            let value = v.trim().trim_matches(|c| c == '"' || c == '\'');
            if !key.is_empty() && !value.is_empty() {
                out.insert(key.to_string(), squash_ws(value));
            }
        }
    }
}
