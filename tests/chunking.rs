//! Chunking properties (coverage, size, overlap, spans, clean boundaries) checked against the real
//! MiniLM tokenizer re-tokenizing every chunk, plus hand-checked cuts. Runs natively and in wasm.

use crate::common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::{token_counter, Rng};
use lorag::{ingest, Chunk, ChunkConfig, Chunker, Document, Error, IngestOptions, Unit};

fn doc(name: &str, text: &str) -> Document {
    ingest(name, text.as_bytes(), &IngestOptions::default()).unwrap()
}

fn cfg(size: usize, overlap: usize) -> ChunkConfig {
    ChunkConfig {
        size: Some(size),
        overlap: Some(overlap),
        prefix_headings: false,
    }
}

/// Measures like the chunker's unit, but independently: the tokenizer over the whole string, or chars.
fn measure(chunker: &Chunker, s: &str) -> usize {
    match chunker.unit() {
        Unit::Tokens => chunker.tokenizer().unwrap().count(s).unwrap(),
        Unit::Chars => s.chars().count(),
    }
}

/// The properties every chunking must have. `clean` asks that no cut falls inside a word (true whenever
/// no single word is longer than a chunk).
fn check(doc: &Document, chunks: &[Chunk], chunker: &Chunker, clean: bool) {
    let text = doc.text.as_str();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.index as usize, i);
        assert_eq!(
            c.text,
            text[c.span.clone()],
            "chunk {i}: text is not doc.text[span]"
        );
        assert_eq!(
            c.text.trim(),
            c.text,
            "chunk {i} starts or ends with whitespace"
        );
        if doc.text_is_source {
            assert_eq!(c.source_span.as_ref(), Some(&c.span));
        }
        // Size: the chunk's own count and an independent re-count of what the embedder will see.
        assert!(
            c.size as usize <= chunker.size(),
            "chunk {i}: size {} > {}",
            c.size,
            chunker.size()
        );
        let embedded = measure(chunker, &c.embed_text());
        assert!(
            embedded <= chunker.size(),
            "chunk {i}: re-measured {embedded} > {} for {:?}",
            chunker.size(),
            c.embed_text()
        );
        if clean {
            let before_ok =
                c.span.start == 0 || text[..c.span.start].ends_with(char::is_whitespace);
            let after_ok =
                c.span.end == text.len() || text[c.span.end..].starts_with(char::is_whitespace);
            assert!(
                before_ok && after_ok,
                "chunk {i} cuts inside a word: {:?}",
                c.text
            );
        }
        if i > 0 {
            let p = &chunks[i - 1];
            assert!(
                c.span.start > p.span.start && c.span.end > p.span.end,
                "chunk {i} does not move forward"
            );
            if c.span.start < p.span.end {
                let shared = measure(chunker, &text[c.span.start..p.span.end]);
                assert!(
                    shared <= chunker.overlap(),
                    "chunks {} and {i} share {shared} > {}",
                    i - 1,
                    chunker.overlap()
                );
            }
        }
    }
    // Coverage: every non-whitespace character of every block lies in some chunk.
    let mut covered = vec![false; text.len()];
    for c in chunks {
        covered[c.span.clone()].iter_mut().for_each(|x| *x = true);
    }
    for b in &doc.blocks {
        for (off, ch) in text[b.range.clone()].char_indices() {
            let at = b.range.start + off;
            assert!(
                ch.is_whitespace() || covered[at],
                "byte {at} ({ch:?}) is in no chunk"
            );
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "knowledge",
    "base",
    "answers",
    "questions",
    "offline",
    "in",
    "a",
    "browser",
    "tab,",
    "with",
    "café",
    "naïve",
    "résumé",
    "日本語",
    "テキスト",
    "emoji",
    "👍🏽",
    "👩‍👩‍👧",
    "(parenthetical)",
    "\"quoted\"",
    "3.14159",
    "e-mail",
    "co-operate",
    "antidisestablishmentarianism",
    "Ünïcödé",
    "x",
    "z\u{200B}w",
    "mid\u{0}nul",
];

fn random_markdown(rng: &mut Rng, paragraphs: usize) -> String {
    let mut s = String::new();
    for p in 0..paragraphs {
        if rng.below(4) == 0 {
            s.push_str(&"#".repeat(1 + rng.below(3)));
            s.push_str(&format!(" Heading {p}\n\n"));
        }
        let sentences = 1 + rng.below(6);
        for _ in 0..sentences {
            let words = 3 + rng.below(20);
            for w in 0..words {
                if w > 0 {
                    s.push(if rng.below(15) == 0 { '\n' } else { ' ' });
                }
                let w: &&str = rng.pick(WORDS);
                s.push_str(w);
            }
            let end: &&str = rng.pick(&[". ", "! ", "? ", "; "]);
            s.push_str(end);
        }
        s.push_str("\n\n");
    }
    s
}

#[test]
fn properties_hold_on_random_documents_in_tokens() {
    let mut rng = Rng(0x00c0_ffee);
    for round in 0..24 {
        let size = *rng.pick(&[16usize, 24, 40, 64, 128, 254]);
        let overlap = *rng.pick(&[0usize, 2, size * 15 / 100, size / 2]);
        let prefix = round % 3 == 0;
        let chunker = Chunker::new(
            token_counter(),
            ChunkConfig {
                size: Some(size),
                overlap: Some(overlap),
                prefix_headings: prefix,
            },
        )
        .unwrap();
        let n = 3 + rng.below(25);
        let md = random_markdown(&mut rng, n);
        let name = if round % 2 == 0 { "r.md" } else { "r.txt" };
        let d = doc(name, &md);
        let chunks = chunker.chunk(&d).unwrap();
        assert!(!chunks.is_empty());
        check(&d, &chunks, &chunker, true);
    }
}

#[test]
fn properties_hold_on_random_documents_in_chars() {
    let mut rng = Rng(0xbeef);
    for _ in 0..24 {
        let size = *rng.pick(&[40usize, 100, 333, 1000]);
        let overlap = *rng.pick(&[0usize, 7, size * 15 / 100, size / 2]);
        let chunker = Chunker::chars(cfg(size, overlap)).unwrap();
        let n = 3 + rng.below(25);
        let d = doc("r.md", &random_markdown(&mut rng, n));
        let chunks = chunker.chunk(&d).unwrap();
        check(&d, &chunks, &chunker, true);
    }
}

#[test]
fn properties_hold_on_html_and_pdf_text() {
    let chunker = Chunker::new(token_counter(), cfg(32, 6)).unwrap();
    let html = ingest(
        "s.html",
        include_bytes!("../examples/docs/safety.html"),
        &IngestOptions::default(),
    )
    .unwrap();
    check(&html, &chunker.chunk(&html).unwrap(), &chunker, true);
    let pdf = ingest(
        "c.pdf",
        include_bytes!("../examples/docs/courses.pdf"),
        &IngestOptions::default(),
    )
    .unwrap();
    let chunks = chunker.chunk(&pdf).unwrap();
    check(&pdf, &chunks, &chunker, true);
    // Pages follow the blocks: the last chunk is on page 2, the first on page 1.
    assert_eq!(chunks[0].pages, Some((1, 1)));
    assert_eq!(chunks.last().unwrap().pages, Some((2, 2)));
    // HTML chunks point back into the original markup.
    let src = std::str::from_utf8(include_bytes!("../examples/docs/safety.html")).unwrap();
    let first = chunker.chunk(&html).unwrap().remove(0);
    assert!(src[first.source_span.unwrap()].starts_with("Workshop Safety Rules"));
}

#[test]
fn hand_checked_sentence_cuts_and_overlap() {
    let text = "The cat sat. A dog ran. We all ate.";
    let d = doc("s.txt", text);
    let no_overlap = Chunker::new(token_counter(), cfg(8, 0))
        .unwrap()
        .chunk(&d)
        .unwrap();
    let spans: Vec<_> = no_overlap.iter().map(|c| c.span.clone()).collect();
    assert_eq!(spans, [0..23, 24..35]);
    assert_eq!(no_overlap[0].text, "The cat sat. A dog ran.");
    assert_eq!(no_overlap[0].size, 8);
    let overlapping = Chunker::new(token_counter(), cfg(8, 4))
        .unwrap()
        .chunk(&d)
        .unwrap();
    let spans: Vec<_> = overlapping.iter().map(|c| c.span.clone()).collect();
    assert_eq!(spans, [0..23, 13..35]); // the overlap starts at the sentence "A dog ran."
                                        // Characters: 20 fit "The cat sat. A dog" and "A dog ran. We all", but each cut goes back to a sentence end.
    let chars = Chunker::chars(cfg(20, 0)).unwrap().chunk(&d).unwrap();
    assert_eq!(
        chars.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(),
        ["The cat sat.", "A dog ran.", "We all ate."]
    );
}

#[test]
fn sections_are_not_merged_and_not_overlapped() {
    let para = "word ".repeat(40);
    let md = format!("# Alpha\n\n{para}\n\n# Beta\n\n{para}\n");
    let d = doc("s.md", &md);
    let chunks = Chunker::new(token_counter(), ChunkConfig::default()).unwrap();
    let chunks = chunks.chunk(&d).unwrap();
    assert_eq!(chunks.len(), 2);
    assert!(chunks[1].text.starts_with("# Beta"));
    assert_eq!(chunks[0].heading_path, ["Alpha"]);
    assert_eq!(chunks[1].heading_path, ["Beta"]);
    assert!(chunks[0].span.end <= chunks[1].span.start);
    // A heading with almost nothing under it is kept with what follows.
    let d = doc("t.md", &format!("# Title\n\n## Part\n\n{para}"));
    let chunks = Chunker::new(token_counter(), ChunkConfig::default())
        .unwrap()
        .chunk(&d)
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].heading_path, ["Title"]);
}

#[test]
fn defaults_come_from_the_model_config() {
    let chunker = Chunker::new(token_counter(), ChunkConfig::default()).unwrap();
    assert_eq!(chunker.tokenizer().unwrap().max_seq_length(), 256); // sentence_bert_config.json, not the baked-in 128
    assert_eq!(chunker.tokenizer().unwrap().special_tokens(), 2);
    assert_eq!(
        (chunker.size(), chunker.overlap(), chunker.unit()),
        (254, 38, Unit::Tokens)
    );
    let chars = Chunker::chars(ChunkConfig::default()).unwrap();
    assert_eq!(
        (chars.size(), chars.overlap(), chars.unit()),
        (1000, 150, Unit::Chars)
    );
    // Padding/truncation baked into tokenizer.json are off: a 300-word text counts 300+ tokens, not 126.
    let long = "word ".repeat(300);
    assert_eq!(chunker.tokenizer().unwrap().count(&long).unwrap(), 300);
}

#[test]
fn bad_configuration_is_refused() {
    assert!(matches!(
        Chunker::new(token_counter(), cfg(300, 10)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Chunker::chars(cfg(100, 51)),
        Err(Error::Config(_))
    ));
    assert!(matches!(Chunker::chars(cfg(4, 0)), Err(Error::Config(_))));
    assert!(matches!(
        lorag::TokenCounter::from_bytes(b"{not json", None),
        Err(Error::Tokenizer(_))
    ));
    assert!(matches!(
        lorag::TokenCounter::from_bytes(common::TOKENIZER_JSON, Some(b"{\"max_seq_length\": 0}")),
        Err(Error::Config(_))
    ));
}

#[test]
fn content_hashes_change_only_where_the_text_changed() {
    let mut rng = Rng(7);
    let md = random_markdown(&mut rng, 30);
    let chunker = Chunker::new(token_counter(), cfg(64, 8)).unwrap();
    let a = chunker.chunk(&doc("h.md", &md)).unwrap();
    let b = chunker.chunk(&doc("h.md", &md)).unwrap();
    assert_eq!(a, b);
    let edited = format!("{md}\n\nA new closing paragraph.\n");
    let c = chunker.chunk(&doc("h.md", &edited)).unwrap();
    let same = a
        .iter()
        .zip(&c)
        .take_while(|(x, y)| x.hash == y.hash)
        .count();
    assert!(
        same >= a.len() - 1,
        "only the tail may change: {same} of {} kept",
        a.len()
    );
    assert_ne!(a.last().unwrap().hash, c.last().unwrap().hash);
    // The heading prefix is part of what is embedded, so it is part of the hash.
    let prefixed = Chunker::new(
        token_counter(),
        ChunkConfig {
            prefix_headings: true,
            ..cfg(64, 8)
        },
    )
    .unwrap();
    let d = doc("p.md", "# Head\n\nBody text here.\n");
    assert_ne!(
        chunker.chunk(&d).unwrap()[0].hash,
        prefixed.chunk(&d).unwrap()[0].hash
    );
    assert_eq!(
        prefixed.chunk(&d).unwrap()[0].embed_text(),
        "Head\n# Head\n\nBody text here."
    );
}

#[test]
fn ten_megabyte_single_line() {
    let sentence = "Retrieval works offline in the browser, with citations. ";
    let line: String = sentence.repeat((10 << 20) / sentence.len());
    let d = doc("line.txt", &line);
    assert_eq!(d.blocks.len(), 1);
    let chunker = Chunker::new(token_counter(), ChunkConfig::default()).unwrap();
    let chunks = chunker.chunk(&d).unwrap();
    assert!(chunks.len() > 5_000, "{}", chunks.len());
    check(&d, &chunks, &chunker, true);
    // One 10 MB "word": cuts must fall between tokens (never inside a character) and stay bounded.
    let word = "é".repeat(5 << 20);
    let d = doc("word.txt", &word);
    let chunks = chunker.chunk(&d).unwrap();
    check(&d, &chunks, &chunker, false);
    assert!(chunks.iter().all(|c| c.text.chars().count() <= 254 * 100));
}

#[test]
fn control_only_blocks_are_still_covered() {
    let d = doc("z.txt", "\u{200B}\u{200B}\n\nreal words here\n\n\u{0}\u{7}");
    for chunker in [
        Chunker::new(token_counter(), cfg(16, 2)).unwrap(),
        Chunker::chars(cfg(16, 2)).unwrap(),
    ] {
        let chunks = chunker.chunk(&d).unwrap();
        check(&d, &chunks, &chunker, true);
    }
}

#[test]
fn a_lying_document_is_refused_not_sliced() {
    let chunker = Chunker::chars(cfg(100, 10)).unwrap();
    let good = doc("g.txt", "héllo wörld\n\nsecond");
    let mut d = good.clone();
    d.blocks[0].range = 0..2; // inside "é"
    assert!(matches!(chunker.chunk(&d), Err(Error::InvalidDocument(_))));
    let mut d = good.clone();
    d.blocks[1].range = 5..500;
    assert!(matches!(chunker.chunk(&d), Err(Error::InvalidDocument(_))));
    let mut d = good.clone();
    d.blocks.swap(0, 1);
    assert!(matches!(chunker.chunk(&d), Err(Error::InvalidDocument(_))));
    let mut d = good.clone();
    d.blocks[0].source = Some(0..10_000);
    assert!(matches!(chunker.chunk(&d), Err(Error::InvalidDocument(_))));
    let mut d = good;
    d.source_len = 3;
    assert!(matches!(chunker.chunk(&d), Err(Error::InvalidDocument(_))));
}
