//! Ingestion of text, Markdown, HTML and PDF, and bad input of every kind. Runs natively and, through
//! wasm-bindgen-test, in Node.

use crate::common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::make_pdf;
use lorag::{detect_format, ingest, BlockKind, Error, Format, IngestOptions, Limits, Warning};

fn opts() -> IngestOptions {
    IngestOptions::default()
}

fn texts(doc: &lorag::Document) -> Vec<&str> {
    doc.blocks.iter().map(|b| doc.block_text(b)).collect()
}

// ---------------------------------------------------------------- plain text

#[test]
fn text_paragraphs_and_exact_spans() {
    let src = "First line of the title\ncontinues here.\n\n\n  Second paragraph.  \n\nThird\n";
    let doc = ingest("notes.txt", src.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.format, Format::Text);
    assert!(doc.text_is_source);
    assert_eq!(
        texts(&doc),
        [
            "First line of the title\ncontinues here.",
            "Second paragraph.",
            "Third"
        ]
    );
    for b in &doc.blocks {
        assert_eq!(&src[b.source.clone().unwrap()], doc.block_text(b));
    }
    assert_eq!(doc.title.as_deref(), Some("First line of the title"));
}

#[test]
fn invalid_utf8_names_the_offset_or_is_replaced_when_asked() {
    let mut bytes = b"good text \xff\xfe more".to_vec();
    assert_eq!(
        ingest("a.txt", &bytes, &opts()).unwrap_err(),
        Error::InvalidUtf8 { offset: 10 }
    );
    let lossy = IngestOptions {
        lossy_utf8: true,
        ..opts()
    };
    let doc = ingest("a.txt", &bytes, &lossy).unwrap();
    assert_eq!(doc.text, "good text \u{fffd}\u{fffd} more");
    assert!(doc.warnings.contains(&Warning::LossyUtf8 { replaced: 2 }));
    assert!(!doc.text_is_source);
    // Markdown and HTML refuse it the same way.
    bytes.splice(0..0, b"# T\n\n".iter().copied());
    assert_eq!(
        ingest("a.md", &bytes, &opts()).unwrap_err(),
        Error::InvalidUtf8 { offset: 15 }
    );
    assert_eq!(
        ingest("a.html", &bytes, &opts()).unwrap_err(),
        Error::InvalidUtf8 { offset: 15 }
    );
}

#[test]
fn empty_and_blank_documents() {
    for name in ["a.txt", "a.md", "a.html", "a.pdf"] {
        assert_eq!(
            ingest(name, b"", &opts()).unwrap_err(),
            Error::EmptyDocument,
            "{name}"
        );
    }
    for name in ["a.txt", "a.md", "a.html"] {
        let doc = ingest(name, b" \n\t\n  ", &opts()).unwrap();
        assert!(doc.blocks.is_empty(), "{name}");
        assert_eq!(doc.warnings, vec![Warning::NoText], "{name}");
    }
}

#[test]
fn oversized_input_is_refused_before_any_work() {
    // 500 MB natively (calloc'd, never touched); in wasm a 2 MB input against a 1 MB cap.
    #[cfg(not(target_arch = "wasm32"))]
    let (size, limit) = (500usize << 20, Limits::default().max_doc_bytes);
    #[cfg(target_arch = "wasm32")]
    let (size, limit) = (2usize << 20, 1usize << 20);
    let big = vec![0u8; size];
    let o = IngestOptions {
        limits: Limits {
            max_doc_bytes: limit,
            ..Limits::default()
        },
        ..opts()
    };
    for name in ["big.txt", "big.pdf", "big.html", "big.md"] {
        assert_eq!(
            ingest(name, &big, &o).unwrap_err(),
            Error::ResourceLimit {
                what: "document bytes",
                size: size as u64,
                limit: limit as u64
            }
        );
    }
}

#[test]
fn nul_bidi_and_zero_width_characters_are_kept_and_flagged() {
    let src =
        "Access\u{0} granted\u{200B}here. \u{202E}txt.exe\u{202C} and \u{2066}isolate\u{2069}.";
    let doc = ingest("t.txt", src.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.text, src);
    assert_eq!(doc.blocks.len(), 1);
    assert!(doc.warnings.contains(&Warning::BidiControls { count: 4 }));
}

#[test]
fn format_detection() {
    assert_eq!(detect_format("x.MD", b"").unwrap(), Format::Markdown);
    assert_eq!(detect_format("x.htm", b"").unwrap(), Format::Html);
    assert_eq!(detect_format("blob", b"%PDF-1.4 ...").unwrap(), Format::Pdf);
    assert_eq!(
        detect_format("blob", b"\xef\xbb\xbf  <!DOCTYPE html><p>x").unwrap(),
        Format::Html
    );
    assert_eq!(detect_format("blob", b"just words").unwrap(), Format::Text);
    assert!(matches!(
        detect_format("x.bin", b"\x00\xff\xfe"),
        Err(Error::UnknownFormat(_))
    ));
}

// ---------------------------------------------------------------- markdown

const MD: &str = "---\ntitle: \"Front matter title\"\nauthor: Ada\ntags:\n  - a\n---\n\n# Guide\n\nIntro *text* with `code`.\n\n## Install `lorag`\n\n- one\n- two\n  continued\n\n```rust\nfn main() {}\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted\n\n### Deeper\n\nLast para.\n\n# Second\n\nTail.\n";

#[test]
fn markdown_blocks_headings_and_front_matter() {
    let doc = ingest("guide.md", MD.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.title.as_deref(), Some("Front matter title"));
    assert_eq!(doc.metadata.get("author").map(String::as_str), Some("Ada"));
    let kinds: Vec<BlockKind> = doc.blocks.iter().map(|b| b.kind).collect();
    use BlockKind::*;
    assert_eq!(
        kinds,
        [
            Heading, Paragraph, Heading, List, Code, Table, Quote, Heading, Paragraph, Heading,
            Paragraph
        ]
    );
    assert_eq!(
        texts(&doc),
        [
            "# Guide",
            "Intro *text* with `code`.",
            "## Install `lorag`",
            "- one\n- two\n  continued",
            "```rust\nfn main() {}\n```",
            "| a | b |\n|---|---|\n| 1 | 2 |",
            "> quoted",
            "### Deeper",
            "Last para.",
            "# Second",
            "Tail."
        ]
    );
    let path = |i: usize| doc.blocks[i].heading_path.join(" > ");
    assert_eq!(path(1), "Guide");
    assert_eq!(path(3), "Guide > Install lorag");
    assert_eq!(path(8), "Guide > Install lorag > Deeper");
    assert_eq!(path(10), "Second");
    // The text is the source: every block's span reproduces the file.
    assert!(doc.text_is_source);
    for b in &doc.blocks {
        assert_eq!(&MD[b.source.clone().unwrap()], doc.block_text(b));
    }
    // Front matter is metadata, not content.
    assert!(doc
        .blocks
        .iter()
        .all(|b| !doc.block_text(b).contains("author")));
}

#[test]
fn markdown_deep_nesting_does_not_overflow_the_stack() {
    let quotes = format!("{} deep\n", ">".repeat(50_000));
    let doc = ingest("q.md", quotes.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.blocks.len(), 1);
    let mut lists = String::new();
    for i in 0..5_000 {
        lists.push_str(&" ".repeat(i * 2));
        lists.push_str("- item\n");
    }
    let doc = ingest("l.md", lists.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.blocks[0].kind, BlockKind::List);
}

// ---------------------------------------------------------------- html

const HTML: &str = r#"<!DOCTYPE html><html lang="fr"><head><title> Page &amp; title </title>
<meta name="description" content="A  test page"><style>p { color: red }</style>
<script>var secret = "<p>not text</p>";</script></head>
<body><nav aria-hidden="true">skip me</nav>
<h1>Caf&eacute; &lt;guide&gt;</h1>
<p>First   paragraph
 with <b>bold</b>text and a&nbsp;nbsp &#x27;quote&#39;.</p>
<div hidden><p>hidden paragraph</p></div><div style="display: none">also hidden</div>
<h2>Steps</h2><ul><li>one</li><li>two<br>lines</li></ul>
<pre>  keep   spacing
   here</pre>
<table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>
<noscript>enable js</noscript><template><p>tpl</p></template>
<p>Unclosed paragraph<p>Next one</body></html>"#;

#[test]
fn html_visible_text_structure_and_spans() {
    let doc = ingest("page.html", HTML.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.title.as_deref(), Some("Page & title"));
    assert_eq!(
        doc.metadata.get("description").map(String::as_str),
        Some("A test page")
    );
    assert_eq!(doc.metadata.get("lang").map(String::as_str), Some("fr"));
    assert_eq!(
        texts(&doc),
        [
            "Café <guide>",
            "First paragraph with boldtext and a\u{a0}nbsp 'quote'.",
            "Steps",
            "one",
            "two\nlines",
            "keep   spacing\n   here", // blocks are trimmed; inner spacing of <pre> is kept
            "k | v",
            "a | 1",
            "Unclosed paragraph",
            "Next one"
        ]
    );
    assert_eq!(doc.blocks[3].heading_path, ["Café <guide>", "Steps"]);
    assert_eq!(doc.blocks[3].kind, BlockKind::List);
    assert_eq!(doc.blocks[5].kind, BlockKind::Code);
    // Each block's source span starts at its first text and ends at its last, in the original HTML.
    let src = |i: usize| &HTML[doc.blocks[i].source.clone().unwrap()];
    assert_eq!(src(0), "Caf&eacute; &lt;guide&gt;");
    assert_eq!(
        src(1),
        "First   paragraph\n with <b>bold</b>text and a&nbsp;nbsp &#x27;quote&#39;."
    );
    assert_eq!(src(4), "two<br>lines");
    for hidden in ["secret", "skip me", "hidden", "enable js", "tpl", "color"] {
        assert!(!doc.text.contains(hidden), "{hidden} leaked into the text");
    }
}

#[test]
fn html_malformed_and_truncated_never_panics() {
    let cases: &[&str] = &[
        "<p>unterminated <b>bold",
        "<div class=\"x",
        "<<<>>> </p></p></div> text </html><html>",
        "<!-- never closed comment <p>x</p>",
        "<script>never closed",
        "<p>a &unknown; &#xFFFFFFFF; &#0; b</p>",
        "<svg><p>inside svg</p></svg><p>after</p>",
        "\0<p>\0nul\0</p>",
    ];
    for c in cases {
        let r = ingest("m.html", c.as_bytes(), &opts());
        assert!(r.is_ok(), "{c:?}: {r:?}");
    }
    let doc = ingest(
        "m.html",
        b"<svg><p>inside svg</p></svg><p>after</p>",
        &opts(),
    )
    .unwrap();
    assert_eq!(doc.text, "after");
    // Every prefix of a real page.
    for cut in (0..HTML.len()).step_by(7) {
        if HTML.is_char_boundary(cut) && cut > 0 {
            ingest("t.html", &HTML.as_bytes()[..cut], &opts()).unwrap();
        }
    }
}

#[test]
fn html_deep_nesting_does_not_overflow_the_stack() {
    let depth = 200_000;
    let html = format!(
        "{}deep text{}",
        "<div><span>".repeat(depth),
        "</span></div>".repeat(depth)
    );
    let doc = ingest("deep.html", html.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.text, "deep text");
    let hidden = format!(
        "{}<p>x</p>{}<p>visible</p>",
        "<div hidden>".repeat(50_000),
        "</div>".repeat(50_000)
    );
    let doc = ingest("deep.html", hidden.as_bytes(), &opts()).unwrap();
    assert_eq!(doc.text, "visible");
}

// ---------------------------------------------------------------- pdf

const COURSES_PDF: &[u8] = include_bytes!("../examples/docs/courses.pdf");

#[test]
fn pdf_from_chromium_pages_and_text() {
    let doc = ingest("courses.pdf", COURSES_PDF, &opts()).unwrap();
    assert_eq!(doc.format, Format::Pdf);
    assert_eq!(doc.title.as_deref(), Some("Course Programme Autumn 2026"));
    // Sentences of tests/fixtures/courses.html, as printed (line breaks where the page wrapped them).
    let flat = doc.text.split_whitespace().collect::<Vec<_>>().join(" ");
    for sentence in [
        "Course Programme Autumn 2026",
        "All courses take place at Harbor Lane Makerspace.",
        "A four-evening course on MIG welding of mild steel, starting on 6 October.",
        "Soldering, reading schematics and building a small audio amplifier in two Saturday sessions, 11 and 18 October.",
        "Threading, tension and straight seams on the club's industrial sewing machines.",
        "Café crème and naïve résumé test: accents survive.",
    ] {
        assert!(flat.contains(sentence), "missing {sentence:?} in {flat:?}");
    }
    // Headings are paragraphs of their own; the page break falls before "Sewing Machine Basics".
    let on_page = |needle: &str| {
        doc.blocks
            .iter()
            .find(|b| doc.block_text(b).contains(needle))
            .and_then(|b| b.page)
    };
    assert_eq!(on_page("Introduction to Welding"), Some(1));
    assert_eq!(on_page("Electronics for Beginners"), Some(1));
    assert_eq!(on_page("Sewing Machine Basics"), Some(2));
    assert_eq!(on_page("To cancel a booking"), Some(2));
    assert!(doc
        .blocks
        .iter()
        .any(|b| doc.block_text(b) == "Introduction to Welding"));
    assert!(doc.blocks.iter().all(|b| b.source.is_none()));
}

#[test]
fn pdf_hand_written_operators() {
    let page1: &[u8] =
        b"BT /F1 12 Tf 72 720 Td (Hello, PDF world.) Tj 0 -14 Td (Caf\\351 \\(paren\\)) Tj ET\n\
        BT /F1 12 Tf 72 600 Td [(Kerned) -50 (Text) -400 (after) ( gap)] TJ ET";
    let page2: &[u8] = b"BT /F1 10 Tf 14 TL 72 700 Td (Line A) Tj T* (Line B) Tj (Line C) ' ET";
    for compress in [false, true] {
        let pdf = make_pdf(&[page1, page2], Some("Hand made"), compress);
        let doc = ingest("hand.pdf", &pdf, &opts()).unwrap();
        assert_eq!(doc.title.as_deref(), Some("Hand made"));
        assert_eq!(
            doc.metadata.get("producer").map(String::as_str),
            Some("lorag tests")
        );
        assert_eq!(
            texts(&doc),
            [
                "Hello, PDF world.\nCafé (paren)",
                "KernedText after gap",
                "Line A\nLine B\nLine C"
            ]
        );
        let pages: Vec<_> = doc.blocks.iter().map(|b| b.page.unwrap()).collect();
        assert_eq!(pages, [1, 1, 2]);
    }
}

#[test]
fn pdf_without_text_layer_warns() {
    let pdf = make_pdf(&[b"q 0 0 1 rg 72 72 200 200 re f Q"], None, false);
    let doc = ingest("scan.pdf", &pdf, &opts()).unwrap();
    assert!(doc.blocks.is_empty());
    assert_eq!(doc.warnings, vec![Warning::NoText]);
}

#[test]
fn pdf_encrypted_needs_password_or_opens_with_empty_one() {
    let locked = include_bytes!("fixtures/encrypted-aes256.pdf");
    assert_eq!(
        ingest("locked.pdf", locked, &opts()).unwrap_err(),
        Error::Encrypted
    );
    let open = include_bytes!("fixtures/encrypted-empty-user-password.pdf");
    let doc = ingest("open.pdf", open, &opts()).unwrap();
    assert!(doc.text.contains("Introduction to Welding"), "{}", doc.text);
}

#[test]
fn pdf_decompression_bomb_is_bounded() {
    // 8 MB of text operators deflate to a few KB; with a 1 MB cap the page is refused, not inflated.
    let mut content = Vec::new();
    while content.len() < 8 << 20 {
        content
            .extend_from_slice(b"BT /F1 12 Tf 72 720 Td (bomb bomb bomb bomb bomb bomb) Tj ET\n");
    }
    let pdf = make_pdf(
        &[&content, b"BT /F1 12 Tf 72 720 Td (Small page.) Tj ET"],
        None,
        true,
    );
    assert!(pdf.len() < 200_000, "{}", pdf.len());
    let o = IngestOptions {
        limits: Limits {
            max_pdf_stream_bytes: 1 << 20,
            ..Limits::default()
        },
        ..opts()
    };
    let doc = ingest("bomb.pdf", &pdf, &o).unwrap();
    assert_eq!(doc.text, "Small page.");
    assert!(matches!(&doc.warnings[0], Warning::PdfPagesSkipped { pages, .. } if pages == &[1]));
    let pdf = make_pdf(&[&content], None, true);
    assert!(matches!(
        ingest("bomb.pdf", &pdf, &o),
        Err(Error::Malformed {
            format: Format::Pdf,
            ..
        })
    ));
}

#[test]
fn pdf_page_cap() {
    let page: &[u8] = b"BT /F1 12 Tf 72 720 Td (p) Tj ET";
    let pdf = make_pdf(&[page, page, page], None, false);
    let o = IngestOptions {
        limits: Limits {
            max_pdf_pages: 2,
            ..Limits::default()
        },
        ..opts()
    };
    assert_eq!(
        ingest("p.pdf", &pdf, &o).unwrap_err(),
        Error::ResourceLimit {
            what: "pdf pages",
            size: 3,
            limit: 2
        }
    );
}

#[test]
fn pdf_truncated_and_corrupted_never_panic() {
    let small = make_pdf(&[b"BT /F1 12 Tf 72 720 Td (Hello) Tj ET"], Some("t"), true);
    for source in [&small[..], COURSES_PDF] {
        let step = (source.len() / 300).max(1);
        for cut in (1..source.len()).step_by(step) {
            match ingest("cut.pdf", &source[..cut], &opts()) {
                Ok(_) | Err(Error::Malformed { .. }) | Err(Error::EmptyDocument) => {}
                Err(e) => panic!("cut at {cut}: unexpected {e:?}"),
            }
        }
        let mut rng = common::Rng(0x5eed);
        for _ in 0..300 {
            let mut bytes = source.to_vec();
            for _ in 0..4 {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            let _ = ingest("corrupt.pdf", &bytes, &opts());
        }
    }
    assert!(matches!(
        ingest("x.pdf", b"not a pdf at all", &opts()),
        Err(Error::Malformed {
            format: Format::Pdf,
            ..
        })
    ));
}

#[test]
fn pdf_deeply_nested_objects_do_not_overflow_the_stack() {
    // Nested arrays and dictionaries in a content stream and in the object graph (lopdf caps nesting at 100).
    let nested_content = format!(
        "{}{} BT /F1 12 Tf 72 720 Td (after) Tj ET",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let pdf = make_pdf(&[nested_content.as_bytes()], None, true);
    let _ = ingest("n.pdf", &pdf, &opts());
    let mut pdf = make_pdf(&[b"BT /F1 12 Tf 72 720 Td (x) Tj ET"], None, false);
    let deep = format!(
        "99 0 obj\n{}{}\nendobj\n",
        "<< /A [".repeat(50_000),
        "] >>".repeat(50_000)
    );
    let at = pdf.len() - 60;
    pdf.splice(at..at, deep.bytes());
    let _ = ingest("n.pdf", &pdf, &opts());
    let strings = format!(
        "BT /F1 12 Tf 72 720 Td {}x{} Tj ET",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    let pdf = make_pdf(&[strings.as_bytes()], None, false);
    let _ = ingest("n.pdf", &pdf, &opts());
}
