//! HTML through html5gum, a WHATWG-compliant tokenizer (with source spans).
//!
//! Only visible text is kept: `script`, `style`, `template`, `noscript`, `svg`, `math`, `iframe`,
//! `object`, `canvas` and `head` content, and elements marked `hidden`, `aria-hidden="true"` or styled
//! `display:none` / `visibility:hidden`, are dropped. Headings and block elements become blocks,
//! inline whitespace is collapsed (kept inside `pre`), entities are decoded by the tokenizer. The
//! walk is iterative with an explicit element stack, so nesting depth cannot overflow the call stack.

use std::collections::BTreeMap;
use std::ops::Range;

use html5gum::{DefaultEmitter, Token, Tokenizer};

use super::{
    decode_utf8, squash_ws, Block, BlockKind, Document, Format, HeadingStack, IngestOptions,
};
use crate::{Limits, Result};

/// Deeper elements are not tracked (they inherit their parent's visibility).
const MAX_TRACKED_DEPTH: usize = 4096;
/// An end tag closes the nearest open element of that name within this many levels.
const END_TAG_SEARCH: usize = 256;

struct Open {
    name: Vec<u8>,
    hidden: bool,
    pre: bool,
}

struct Builder<'a> {
    doc_text: String,
    blocks: Vec<Block>,
    headings: HeadingStack,
    /// Text of the block being read, its source span and kind.
    cur: String,
    cur_src: Option<Range<usize>>,
    cur_kind: BlockKind,
    heading_level: Option<u8>,
    limits: &'a Limits,
}

impl Builder<'_> {
    fn push_text(&mut self, s: &str, span: Range<usize>, pre: bool) -> Result<()> {
        if pre {
            self.cur.push_str(s);
        } else {
            for c in s.chars() {
                if c.is_ascii_whitespace() {
                    if !self.cur.is_empty() && !self.cur.ends_with([' ', '\n']) {
                        self.cur.push(' ');
                    }
                } else {
                    self.cur.push(c);
                }
            }
        }
        if !s.trim().is_empty() {
            let start = self.cur_src.as_ref().map_or(span.start, |r| r.start);
            self.cur_src = Some(start..span.end);
        }
        Limits::check(
            "extracted text bytes",
            self.doc_text.len() + self.cur.len(),
            self.limits.max_text_bytes,
        )
    }

    fn flush(&mut self) {
        let text = self.cur.trim();
        if let (false, Some(src)) = (text.is_empty(), self.cur_src.clone()) {
            if let Some(level) = self.heading_level {
                self.headings.push(level, squash_ws(text));
            }
            if !self.doc_text.is_empty() {
                self.doc_text.push_str("\n\n");
            }
            let start = self.doc_text.len();
            self.doc_text.push_str(text);
            self.blocks.push(Block {
                kind: self.cur_kind,
                heading_path: self.headings.path(),
                range: start..self.doc_text.len(),
                source: Some(src),
                page: None,
            });
        }
        self.cur.clear();
        self.cur_src = None;
        self.heading_level = None;
        self.cur_kind = BlockKind::Paragraph;
    }
}

fn is_hidden_tag(name: &[u8]) -> bool {
    matches!(
        name,
        b"script"
            | b"style"
            | b"template"
            | b"noscript"
            | b"svg"
            | b"math"
            | b"iframe"
            | b"object"
            | b"canvas"
            | b"head"
    )
}

fn is_void(name: &[u8]) -> bool {
    matches!(
        name,
        b"area"
            | b"base"
            | b"br"
            | b"col"
            | b"embed"
            | b"hr"
            | b"img"
            | b"input"
            | b"link"
            | b"meta"
            | b"source"
            | b"track"
            | b"wbr"
    )
}

fn block_kind(name: &[u8]) -> Option<BlockKind> {
    Some(match name {
        b"h1" | b"h2" | b"h3" | b"h4" | b"h5" | b"h6" => BlockKind::Heading,
        b"li" | b"dt" | b"dd" | b"ul" | b"ol" | b"dl" => BlockKind::List,
        b"pre" => BlockKind::Code,
        b"table" | b"tr" | b"caption" | b"thead" | b"tbody" | b"tfoot" => BlockKind::Table,
        b"blockquote" => BlockKind::Quote,
        b"p" | b"div" | b"section" | b"article" | b"main" | b"header" | b"footer" | b"nav"
        | b"aside" | b"figure" | b"figcaption" | b"form" | b"fieldset" | b"address"
        | b"details" | b"summary" | b"body" | b"html" | b"hr" => BlockKind::Paragraph,
        _ => return None,
    })
}

fn attr_hides(
    attrs: &BTreeMap<html5gum::HtmlString, html5gum::Spanned<html5gum::HtmlString, usize>>,
) -> bool {
    let get = |k: &[u8]| {
        attrs
            .get(k)
            .map(|v| String::from_utf8_lossy(&v.value).to_ascii_lowercase())
    };
    if attrs.contains_key(&b"hidden"[..]) {
        return true;
    }
    if get(b"aria-hidden").is_some_and(|v| v.trim() == "true") {
        return true;
    }
    get(b"style").is_some_and(|s| {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        s.contains("display:none") || s.contains("visibility:hidden")
    })
}

pub(super) fn ingest(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    let mut warnings = Vec::new();
    // The tokenizer works on bytes; we insist on UTF-8 up front (or decode lossily when asked) so that
    // every token's bytes are valid text.
    let (source, exact) = decode_utf8(bytes, opts.lossy_utf8, &mut warnings)?;
    let mut emitter = DefaultEmitter::<usize>::new_with_span();
    emitter.naively_switch_states(true);
    let mut b = Builder {
        doc_text: String::new(),
        blocks: Vec::new(),
        headings: HeadingStack::default(),
        cur: String::new(),
        cur_src: None,
        cur_kind: BlockKind::Paragraph,
        heading_level: None,
        limits: &opts.limits,
    };
    let mut stack: Vec<Open> = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut title = String::new();
    let mut in_title = false;
    let mut first_h1: Option<String> = None;

    for token in Tokenizer::new_with_emitter(source.as_str(), emitter) {
        let Ok(token) = token; // the reader over a &str is infallible
        match token {
            Token::StartTag(tag) => {
                let name = tag.name.to_ascii_lowercase();
                let parent_hidden = stack.last().is_some_and(|o| o.hidden);
                let parent_pre = stack.last().is_some_and(|o| o.pre);
                if name == b"title" {
                    in_title = !tag.self_closing;
                    continue;
                }
                if name == b"meta" {
                    let get = |k: &[u8]| {
                        tag.attributes
                            .get(k)
                            .map(|v| squash_ws(&String::from_utf8_lossy(&v.value)))
                    };
                    if let (Some(k), Some(v)) =
                        (get(b"name").or_else(|| get(b"property")), get(b"content"))
                    {
                        if !k.is_empty() && !v.is_empty() {
                            metadata.insert(k.to_ascii_lowercase(), v);
                        }
                    }
                    continue;
                }
                if name == b"html" {
                    if let Some(lang) = tag.attributes.get(&b"lang"[..]) {
                        metadata.insert(
                            "lang".into(),
                            String::from_utf8_lossy(&lang.value).into_owned(),
                        );
                    }
                }
                let hidden = parent_hidden || is_hidden_tag(&name) || attr_hides(&tag.attributes);
                if !hidden {
                    if name == b"br" {
                        b.cur.push('\n');
                    } else if name == b"td" || name == b"th" {
                        if !b.cur.is_empty() && !b.cur.ends_with([' ', '\n']) {
                            b.cur.push(' ');
                        }
                        if !b.cur.trim_end().is_empty() {
                            b.cur.push_str("| ");
                        }
                    } else if let Some(kind) = block_kind(&name) {
                        b.flush();
                        b.cur_kind = kind;
                        if kind == BlockKind::Heading {
                            b.heading_level = Some(name[1] - b'0');
                        }
                    }
                }
                if !is_void(&name) && !tag.self_closing && stack.len() < MAX_TRACKED_DEPTH {
                    stack.push(Open {
                        pre: parent_pre || name == b"pre" || name == b"textarea",
                        name,
                        hidden,
                    });
                }
            }
            Token::EndTag(tag) => {
                let name = tag.name.to_ascii_lowercase();
                if name == b"title" {
                    in_title = false;
                    continue;
                }
                let found = stack
                    .iter()
                    .rev()
                    .take(END_TAG_SEARCH)
                    .position(|o| o.name == name);
                if let Some(k) = found {
                    let open = stack.split_off(stack.len() - 1 - k).into_iter().next();
                    let was_hidden = open.is_some_and(|o| o.hidden);
                    if !was_hidden && block_kind(&name).is_some() {
                        if b.heading_level.is_some() {
                            let t = squash_ws(&b.cur);
                            if b.heading_level == Some(1) && first_h1.is_none() && !t.is_empty() {
                                first_h1 = Some(t);
                            }
                        }
                        b.flush();
                    }
                }
            }
            Token::String(s) => {
                let text = String::from_utf8_lossy(&s.value);
                if in_title {
                    title.push_str(&text);
                    continue;
                }
                let top = stack.last();
                if top.is_some_and(|o| o.hidden) {
                    continue;
                }
                b.push_text(&text, s.span.start..s.span.end, top.is_some_and(|o| o.pre))?;
            }
            Token::Comment(_) | Token::Doctype(_) | Token::Error(_) => {}
        }
    }
    b.flush();
    let title = Some(squash_ws(&title))
        .filter(|t| !t.is_empty())
        .or(first_h1);
    // Spans refer to the decoded source; with lossy decoding they are not byte offsets of the original.
    if !exact {
        for block in &mut b.blocks {
            block.source = None;
        }
    }
    Ok(Document {
        id: id.to_string(),
        title,
        format: Format::Html,
        metadata,
        text: b.doc_text,
        blocks: b.blocks,
        warnings,
        source_len: bytes.len(),
        text_is_source: false,
    })
}
