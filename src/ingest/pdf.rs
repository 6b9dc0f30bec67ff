//! PDF text layer: lopdf parses the object graph (bounded decompression), and this module walks each
//! page's content stream itself so that line and paragraph breaks follow the text positioning operators
//! (`Td`, `TD`, `Tm`, `T*`, `'`, `"`) and wide `TJ` gaps become spaces. Fonts are decoded through their
//! `/ToUnicode` map or simple encoding (lopdf's `Encoding`). Image-only PDFs give a `NoText` warning;
//! encrypted PDFs that need a password give [`Error::Encrypted`].

use std::collections::BTreeMap;

use lopdf::content::Content;
use lopdf::{Encoding, LoadOptions, Object};

use super::{squash_ws, trim_range, Block, BlockKind, Document, Format, IngestOptions, Warning};
use crate::{Error, Limits, Result};

fn malformed(e: impl std::fmt::Display) -> Error {
    Error::Malformed {
        format: Format::Pdf,
        detail: e.to_string(),
    }
}

fn map_load_error(e: lopdf::Error) -> Error {
    match e {
        lopdf::Error::Decryption(_) | lopdf::Error::InvalidPassword => Error::Encrypted,
        lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded { .. }) => {
            malformed("a stream inflates past the configured limit (Limits::max_pdf_stream_bytes)")
        }
        other => malformed(other),
    }
}

pub(super) fn ingest(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    if !bytes.starts_with(b"%PDF-")
        && !bytes[..bytes.len().min(1024)]
            .windows(5)
            .any(|w| w == b"%PDF-")
    {
        return Err(malformed("no %PDF- header"));
    }
    // lopdf is not written for hostile input everywhere; natively a panic inside it becomes an error.
    #[cfg(not(target_arch = "wasm32"))]
    {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ingest_inner(id, bytes, opts)
        })) {
            Ok(r) => r,
            Err(_) => Err(malformed("the PDF parser gave up on this file")),
        }
    }
    #[cfg(target_arch = "wasm32")]
    ingest_inner(id, bytes, opts)
}

fn ingest_inner(id: &str, bytes: &[u8], opts: &IngestOptions) -> Result<Document> {
    let limits = &opts.limits;
    let load = LoadOptions {
        max_decompressed_size: Some(limits.max_pdf_stream_bytes),
        ..LoadOptions::default()
    };
    let pdf = lopdf::Document::load_mem_with_options(bytes, load).map_err(map_load_error)?;
    if pdf.is_encrypted() {
        // lopdf decrypts with the empty user password when it can; still encrypted means we cannot read it.
        return Err(Error::Encrypted);
    }
    let pages = pdf.get_pages();
    Limits::check("pdf pages", pages.len(), limits.max_pdf_pages)?;

    let mut text = String::new();
    let mut blocks = Vec::new();
    let mut skipped = Vec::new();
    let mut first_reason = None;
    for (&number, &page_id) in &pages {
        match page_text(&pdf, page_id, limits) {
            Ok(page) => {
                for para in super::text::paragraphs(&page, 0..page.len()) {
                    let para_text = &page[para];
                    if !text.is_empty() {
                        text.push_str("\n\n");
                    }
                    let start = text.len();
                    text.push_str(para_text);
                    Limits::check("extracted text bytes", text.len(), limits.max_text_bytes)?;
                    if let Some(range) = trim_range(&text, start..text.len()) {
                        blocks.push(Block {
                            kind: BlockKind::Paragraph,
                            heading_path: vec![],
                            range,
                            source: None,
                            page: Some(number),
                        });
                    }
                }
            }
            Err(e) => {
                skipped.push(number);
                first_reason.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let mut warnings = Vec::new();
    if !skipped.is_empty() {
        if skipped.len() == pages.len() {
            return Err(malformed(first_reason.unwrap_or_default()));
        }
        warnings.push(Warning::PdfPagesSkipped {
            pages: skipped,
            reason: first_reason.unwrap_or_default(),
        });
    }
    let metadata = info_metadata(&pdf);
    let title = metadata.get("title").cloned().or_else(|| {
        blocks
            .first()
            .map(|b: &Block| squash_ws(text[b.range.clone()].lines().next().unwrap_or("")))
    });
    Ok(Document {
        id: id.to_string(),
        title,
        format: Format::Pdf,
        metadata,
        text,
        blocks,
        warnings,
        source_len: bytes.len(),
        text_is_source: false,
    })
}

/// What the walker needs of a font: how to decode its strings and how far each glyph advances.
struct FontInfo<'a> {
    encoding: Option<Encoding<'a>>,
    /// Composite (Type0) fonts use 2-byte codes here (Identity-H, as browsers and office suites write them).
    two_byte: bool,
    widths: BTreeMap<u32, f32>,
    default_width: f32,
}

impl FontInfo<'_> {
    /// Advance of a string, in thousandths of an em.
    fn advance(&self, bytes: &[u8]) -> f32 {
        let w = |code: u32| *self.widths.get(&code).unwrap_or(&self.default_width);
        if self.two_byte {
            bytes
                .chunks(2)
                .map(|c| w(u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))))
                .sum()
        } else {
            bytes.iter().map(|&b| w(u32::from(b))).sum()
        }
    }
}

fn font_info<'a>(
    pdf: &'a lopdf::Document,
    font: &'a lopdf::Dictionary,
    limits: &Limits,
) -> FontInfo<'a> {
    let deref = |o: &'a Object| pdf.dereference(o).map(|(_, o)| o).ok();
    let num = |o: &'a Object| {
        deref(o).and_then(|o| {
            o.as_float()
                .ok()
                .or_else(|| o.as_i64().ok().map(|v| v as f32))
        })
    };
    let encoding = font
        .get_font_encoding_with_limit(pdf, limits.max_pdf_stream_bytes)
        .ok();
    let two_byte =
        font.get(b"Subtype").ok().and_then(|o| o.as_name().ok()) == Some(b"Type0".as_slice());
    let mut widths = BTreeMap::new();
    let mut default_width = 500.0;
    if two_byte {
        let descendant = font
            .get(b"DescendantFonts")
            .ok()
            .and_then(deref)
            .and_then(|o| o.as_array().ok())
            .and_then(|a| a.first())
            .and_then(deref)
            .and_then(|o| o.as_dict().ok());
        if let Some(d) = descendant {
            default_width = d.get(b"DW").ok().and_then(num).unwrap_or(1000.0);
            if let Some(w) = d
                .get(b"W")
                .ok()
                .and_then(deref)
                .and_then(|o| o.as_array().ok())
            {
                // [c [w1 w2 …]] or [c_first c_last w]
                let mut i = 0;
                while i + 1 < w.len() && widths.len() < 65_536 {
                    let Some(first) = num(&w[i]) else { break };
                    let first = first as u32;
                    if let Some(list) = deref(&w[i + 1]).and_then(|o| o.as_array().ok()) {
                        for (k, v) in list.iter().enumerate().take(65_536) {
                            widths.insert(first + k as u32, num(v).unwrap_or(default_width));
                        }
                        i += 2;
                    } else if i + 2 < w.len() {
                        let (last, v) = (
                            num(&w[i + 1]).unwrap_or(0.0) as u32,
                            num(&w[i + 2]).unwrap_or(default_width),
                        );
                        for c in first..=last.min(first.saturating_add(65_535)) {
                            widths.insert(c, v);
                        }
                        i += 3;
                    } else {
                        break;
                    }
                }
            }
        }
    } else if let Some(list) = font
        .get(b"Widths")
        .ok()
        .and_then(deref)
        .and_then(|o| o.as_array().ok())
    {
        let first = font.get(b"FirstChar").ok().and_then(num).unwrap_or(0.0) as u32;
        for (k, v) in list.iter().enumerate().take(256) {
            if let Some(v) = num(v) {
                widths.insert(first + k as u32, v);
            }
        }
        default_width = font
            .get(b"FontDescriptor")
            .ok()
            .and_then(deref)
            .and_then(|o| o.as_dict().ok())
            .and_then(|d| d.get(b"MissingWidth").ok())
            .and_then(num)
            .unwrap_or(500.0);
    }
    FontInfo {
        encoding,
        two_byte,
        widths,
        default_width,
    }
}

/// Text state of the page walker: where the pen is, so that line breaks, paragraph gaps and word gaps can
/// be told from positioning operators.
struct Pen {
    out: String,
    size: f32,
    /// Horizontal scale of the text matrix (text space → user space).
    scale: f32,
    /// Start of the current line and the pen's x after the last glyph, in text-line units.
    line_x: f32,
    line_y: f32,
    pen_x: f32,
    last_y: Option<f32>,
}

impl Pen {
    fn em(&self) -> f32 {
        (self.size * self.scale).abs().max(0.1)
    }
    fn space(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with([' ', '\n']) {
            self.out.push(' ');
        }
    }
    fn newline(&mut self, dy: f32) {
        if self.out.is_empty() {
            return;
        }
        let keep = self.out.trim_end_matches(' ').len();
        self.out.truncate(keep);
        let paragraph = dy.abs() > 1.6 * self.em();
        let want = if paragraph { "\n\n" } else { "\n" };
        if !self.out.ends_with(want) {
            self.out.push_str(if paragraph && self.out.ends_with('\n') {
                "\n"
            } else {
                want
            });
        }
    }
    /// The text line now starts at (x, y) (user-space units): a new line when y moved, a word gap when x
    /// jumped past the end of the last glyph by more than a fifth of an em.
    fn move_to(&mut self, x: f32, y: f32) {
        match self.last_y {
            Some(prev) if (prev - y).abs() > 0.3 * self.em() => self.newline(prev - y),
            Some(_) if x - self.pen_x > 0.2 * self.em() => self.space(),
            _ => {}
        }
        self.last_y = Some(y);
        self.line_x = x;
        self.pen_x = x;
        self.line_y = y;
    }
    fn show(&mut self, font: &FontInfo, bytes: &[u8]) {
        if let Some(enc) = &font.encoding {
            push_decoded(&mut self.out, enc, bytes);
        }
        self.pen_x += font.advance(bytes) / 1000.0 * self.size * self.scale;
    }
}

/// Walks one page's content stream and returns its text with `\n` between lines and `\n\n` between paragraphs.
fn page_text(pdf: &lopdf::Document, page_id: lopdf::ObjectId, limits: &Limits) -> Result<String> {
    let fonts = pdf.get_page_fonts(page_id).map_err(malformed)?;
    let fonts: BTreeMap<Vec<u8>, FontInfo> = fonts
        .into_iter()
        .map(|(name, f)| (name, font_info(pdf, f, limits)))
        .collect();
    let data = pdf
        .get_page_content_with_limit(page_id, limits.max_pdf_stream_bytes)
        .map_err(map_load_error)?;
    let content = Content::decode(&data).map_err(malformed)?;

    let num = |o: &Object| {
        o.as_float()
            .ok()
            .or_else(|| o.as_i64().ok().map(|v| v as f32))
            .unwrap_or(0.0)
    };
    let mut pen = Pen {
        out: String::new(),
        size: 10.0,
        scale: 1.0,
        line_x: 0.0,
        line_y: 0.0,
        pen_x: 0.0,
        last_y: None,
    };
    let mut font: Option<&FontInfo> = None;
    for op in &content.operations {
        let args = &op.operands;
        match op.operator.as_str() {
            "Tf" => {
                font = args
                    .first()
                    .and_then(|o| o.as_name().ok())
                    .and_then(|n| fonts.get(n));
                pen.size = args.get(1).map(num).unwrap_or(pen.size).abs();
            }
            "BT" => {
                pen.line_x = 0.0;
                pen.line_y = 0.0;
                pen.scale = 1.0;
            }
            "Tm" if args.len() == 6 => {
                pen.scale = num(&args[0]).hypot(num(&args[1])).max(1e-3);
                pen.move_to(num(&args[4]), num(&args[5]));
            }
            "Td" | "TD" if args.len() == 2 => {
                let (tx, ty) = (num(&args[0]) * pen.scale, num(&args[1]) * pen.scale);
                pen.move_to(pen.line_x + tx, pen.line_y + ty);
            }
            "T*" => {
                let em = pen.em();
                pen.newline(em);
            }
            "Tj" | "'" | "\"" => {
                if op.operator != "Tj" {
                    let em = pen.em();
                    pen.newline(em);
                }
                let s = if op.operator == "\"" {
                    args.get(2)
                } else {
                    args.first()
                };
                if let (Some(f), Some(Object::String(bytes, _))) = (font, s) {
                    pen.show(f, bytes);
                }
            }
            "TJ" => {
                if let (Some(f), Some(Object::Array(items))) = (font, args.first()) {
                    for item in items {
                        match item {
                            Object::String(bytes, _) => pen.show(f, bytes),
                            // Adjustments are thousandths of an em, subtracted from the advance; a wide
                            // negative one is a word gap.
                            other => {
                                let adj = num(other);
                                if adj < -200.0 {
                                    pen.space();
                                }
                                pen.pen_x -= adj / 1000.0 * pen.size * pen.scale;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        Limits::check("extracted text bytes", pen.out.len(), limits.max_text_bytes)?;
    }
    Ok(pen.out)
}

fn push_decoded(out: &mut String, enc: &Encoding, bytes: &[u8]) {
    if let Ok(s) = lopdf::Document::decode_text(enc, bytes) {
        for c in s.chars() {
            match c {
                '\0' => {}
                c if c.is_whitespace() => {
                    if !out.is_empty() && !out.ends_with([' ', '\n']) {
                        out.push(' ');
                    }
                }
                // Typographic ligatures (ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ) as the letters they stand for, so tokenizers see words.
                '\u{FB00}' => out.push_str("ff"),
                '\u{FB01}' => out.push_str("fi"),
                '\u{FB02}' => out.push_str("fl"),
                '\u{FB03}' => out.push_str("ffi"),
                '\u{FB04}' => out.push_str("ffl"),
                '\u{FB05}' | '\u{FB06}' => out.push_str("st"),
                c => out.push(c),
            }
        }
    }
}

/// Title, Author, Subject, Keywords, Creator, Producer from the trailer's Info dictionary.
fn info_metadata(pdf: &lopdf::Document) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let info = match pdf.trailer.get(b"Info") {
        Ok(Object::Reference(id)) => pdf.get_dictionary(*id).ok(),
        Ok(Object::Dictionary(d)) => Some(d),
        _ => None,
    };
    if let Some(info) = info {
        for key in [
            "Title", "Author", "Subject", "Keywords", "Creator", "Producer",
        ] {
            if let Ok(Object::String(bytes, _)) = info.get(key.as_bytes()) {
                let value = squash_ws(&pdf_text_string(bytes));
                if !value.is_empty() {
                    out.insert(key.to_ascii_lowercase(), value);
                }
            }
        }
    }
    out
}

/// A PDF text string: UTF-16BE with a byte-order mark, UTF-8 with one (PDF 2.0), else PDFDocEncoding
/// (read as Latin-1, which agrees with it on the printable range).
fn pdf_text_string(bytes: &[u8]) -> String {
    if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        let units: Vec<u16> = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        return String::from_utf16_lossy(&units);
    }
    if let Some(rest) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        return String::from_utf8_lossy(rest).into_owned();
    }
    bytes.iter().map(|&b| b as char).collect()
}
