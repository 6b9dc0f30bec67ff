//! Chunking throughput on plain prose (SciFact abstracts, ~7 MB) with the MiniLM tokenizer.
//!
//! `cargo bench --bench chunking` (needs `scripts/fetch-models`; reads ../shared/data/scifact/corpus.jsonl,
//! or the file named by LORAG_BENCH_CORPUS, a BEIR corpus.jsonl). Goal: ≥ 10 MB/s natively.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorag::{ingest, ChunkConfig, Chunker, IngestOptions, TokenCounter};

/// Abstracts as paragraphs separated by blank lines.
pub fn prose() -> String {
    let path = std::env::var("LORAG_BENCH_CORPUS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/scifact/corpus.jsonl"
        )
        .to_string()
    });
    let raw = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (set LORAG_BENCH_CORPUS)"));
    let mut out = String::new();
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("corpus.jsonl line");
        out.push_str(v["title"].as_str().unwrap_or(""));
        out.push('\n');
        out.push_str(v["text"].as_str().unwrap_or(""));
        out.push_str("\n\n");
    }
    out
}

fn bench(c: &mut Criterion) {
    let text = prose();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2-int8");
    let tok = std::fs::read(format!("{dir}/tokenizer.json")).expect("run scripts/fetch-models");
    let sbert = std::fs::read(format!("{dir}/sentence_bert_config.json")).ok();
    let chunker = Chunker::new(
        TokenCounter::from_bytes(&tok, sbert.as_deref()).unwrap(),
        ChunkConfig::default(),
    )
    .unwrap();
    let chars = Chunker::chars(ChunkConfig::default()).unwrap();
    let opts = IngestOptions::default();

    let mut g = c.benchmark_group("chunking");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("ingest+chunk tokens (MiniLM)", |b| {
        b.iter(|| {
            let doc = ingest("prose.txt", black_box(text.as_bytes()), &opts).unwrap();
            black_box(chunker.chunk(&doc).unwrap().len())
        })
    });
    g.bench_function("tokenize only (baseline)", |b| {
        let t = chunker.tokenizer().unwrap();
        b.iter(|| {
            text.split("\n\n")
                .map(|p| t.offsets(black_box(p)).unwrap().len())
                .sum::<usize>()
        })
    });
    g.bench_function("ingest+chunk chars", |b| {
        b.iter(|| {
            let doc = ingest("prose.txt", black_box(text.as_bytes()), &opts).unwrap();
            black_box(chars.chunk(&doc).unwrap().len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
