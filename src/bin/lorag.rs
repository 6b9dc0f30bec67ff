//! The lorag command-line tool.
//!
//! `lorag demo` runs the main job on the bundled example documents; `lorag chunk FILE…` ingests and
//! chunks files and prints the chunks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lorag::{ingest, Chunk, ChunkConfig, Chunker, Document, IngestOptions, Limits, TokenCounter};

#[derive(Parser)]
#[command(
    name = "lorag",
    version,
    about = "Client-side RAG + LoRA: ingest, chunk, embed, index, retrieve, answer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ChunkArgs {
    /// Model folder holding tokenizer.json (and sentence_bert_config.json); sizes then count its tokens.
    /// Without it, sizes count characters.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Chunk size (tokens, or characters without --tokenizer). Default: the model's max_seq_length minus
    /// special tokens; 1000 characters.
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// Overlap between consecutive chunks (same unit). Default: 15 % of the size.
    #[arg(long, value_name = "N")]
    overlap: Option<usize>,
    /// Prefix the embedding text with the heading path (counts toward the size).
    #[arg(long)]
    prefix_headings: bool,
    /// Largest document accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_doc_bytes)]
    max_doc_bytes: usize,
    /// Replace invalid UTF-8 with U+FFFD instead of refusing the file.
    #[arg(long)]
    lossy: bool,
    /// Print JSON (one array of chunks) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest and chunk files, print the chunks (id, span, page, heading path, size, text).
    Chunk {
        /// Files to read: .txt, .md, .html, .pdf (format told from the name, then the bytes).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        args: ChunkArgs,
    },
    /// The main job on the bundled example documents (an in-memory knowledge base).
    Demo {
        #[command(flatten)]
        args: ChunkArgs,
    },
    /// Embed texts with a sentence-transformers model folder; print token ids and vectors.
    Embed {
        /// Model folder (model.onnx, tokenizer.json, config files).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Embed as queries (query prefix) rather than passages.
        #[arg(long)]
        query: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Evaluate retrieval.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// A BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv): nDCG@10, recall@10/100, MRR@10, MAP@100.
    Beir {
        /// The BEIR dataset folder.
        dir: PathBuf,
        /// Model folder.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Search mode (exact: brute-force cosine; the index issue adds hnsw, bm25, hybrid).
        #[arg(long, default_value = "exact")]
        search: String,
        /// Texts per forward pass.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn load_embedder(dir: &Path, batch_size: Option<usize>) -> Result<lorag::Embedder, String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}/{name}: {e}", dir.display()))
    };
    let opt = |name: &str| std::fs::read(dir.join(name)).ok();
    let (onnx, tok) = (read("model.onnx")?, read("tokenizer.json")?);
    let (config, pooling, sbert, modules) = (
        opt("config.json"),
        opt("1_Pooling/config.json"),
        opt("sentence_bert_config.json"),
        opt("modules.json"),
    );
    let files = lorag::EmbedderFiles {
        model_onnx: &onnx,
        tokenizer_json: &tok,
        config_json: config.as_deref(),
        pooling_config_json: pooling.as_deref(),
        sentence_bert_config_json: sbert.as_deref(),
        modules_json: modules.as_deref(),
    };
    let config = lorag::EmbedderConfig {
        batch_size,
        ..Default::default()
    };
    lorag::Embedder::from_bytes(files, config, &Limits::default()).map_err(|e| e.to_string())
}

fn run_embed(model: &Path, query: bool, json: bool, texts: &[String]) -> Result<(), String> {
    let embedder = load_embedder(model, None)?;
    let kind = if query {
        lorag::TextKind::Query
    } else {
        lorag::TextKind::Passage
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = embedder.embed(&refs, kind).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (text, e) in texts.iter().zip(&out) {
        let ids = embedder.token_ids(text, kind).map_err(|e| e.to_string())?.0;
        if json {
            rows.push(serde_json::json!({"text": text, "ids": ids, "tokens": e.tokens, "truncated": e.truncated, "vector": e.vector}));
        } else {
            let head: Vec<String> = e
                .vector
                .iter()
                .take(8)
                .map(|x| format!("{x:+.5}"))
                .collect();
            println!(
                "{text:?}\n  ids {ids:?}{}\n  vector[{}] [{} …]",
                if e.truncated { " (truncated)" } else { "" },
                e.vector.len(),
                head.join(", ")
            );
        }
    }
    if json {
        let doc = serde_json::json!({"model": model.display().to_string(), "identity": embedder.identity(), "dim": embedder.dim(), "normalized": embedder.normalizes(), "embeddings": rows});
        println!(
            "{}",
            serde_json::to_string(&doc).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

fn run_eval_beir(
    dir: &Path,
    model: &Path,
    search: &str,
    batch_size: usize,
    json: bool,
) -> Result<(), String> {
    if search != "exact" {
        return Err(format!(
            "search mode {search:?} is not available yet (exact only)"
        ));
    }
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}/{name}: {e}", dir.display()))
    };
    let beir = lorag::eval::Beir::from_bytes(
        &read("corpus.jsonl")?,
        &read("queries.jsonl")?,
        &read("qrels/test.tsv")?,
    )
    .map_err(|e| e.to_string())?;
    let embedder = load_embedder(model, Some(batch_size))?;
    let t0 = std::time::Instant::now();
    let mut base = Vec::with_capacity(beir.corpus.len());
    let step = 256;
    for (i, part) in beir.corpus.chunks(step).enumerate() {
        let texts: Vec<&str> = part.iter().map(|(_, t)| t.as_str()).collect();
        base.extend(
            embedder
                .embed(&texts, lorag::TextKind::Passage)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|e| e.vector),
        );
        eprint!(
            "\rembedding corpus: {}/{} ({:.1} docs/s)",
            (i * step + part.len()),
            beir.corpus.len(),
            base.len() as f64 / t0.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    let corpus_secs = t0.elapsed().as_secs_f64();
    let texts: Vec<&str> = beir.queries.iter().map(|(_, t)| t.as_str()).collect();
    let t1 = std::time::Instant::now();
    let queries = embedder
        .embed(&texts, lorag::TextKind::Query)
        .map_err(|e| e.to_string())?;
    let query_secs = t1.elapsed().as_secs_f64();
    let mut results = std::collections::HashMap::new();
    for ((qid, _), q) in beir.queries.iter().zip(&queries) {
        let top = lorag::eval::exact_top_k(&base, &q.vector, 101);
        results.insert(
            qid.clone(),
            top.into_iter()
                .map(|(i, _)| beir.corpus[i].0.clone())
                .collect::<Vec<_>>(),
        );
    }
    let m = lorag::eval::evaluate(&results, &beir.qrels);
    if json {
        let doc = serde_json::json!({
            "dataset": dir.display().to_string(), "model": model.display().to_string(), "identity": embedder.identity(),
            "search": search, "documents": beir.corpus.len(), "metrics": m,
            "corpus_docs_per_s": beir.corpus.len() as f64 / corpus_secs, "queries_per_s": queries.len() as f64 / query_secs,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "{}: {} documents, {} queries, search {search}\n  nDCG@10 {:.4}  recall@10 {:.4}  recall@100 {:.4}  MRR@10 {:.4}  MAP@100 {:.4}\n  corpus {:.1} docs/s, queries {:.1}/s",
            dir.display(), beir.corpus.len(), m.queries, m.ndcg_at_10, m.recall_at_10, m.recall_at_100, m.mrr_at_10, m.map_at_100,
            beir.corpus.len() as f64 / corpus_secs, queries.len() as f64 / query_secs
        );
    }
    Ok(())
}

/// The bundled example corpus, compiled into the binary.
const EXAMPLES: &[(&str, &[u8])] = &[
    (
        "handbook.md",
        include_bytes!("../../examples/docs/handbook.md"),
    ),
    (
        "safety.html",
        include_bytes!("../../examples/docs/safety.html"),
    ),
    ("faq.txt", include_bytes!("../../examples/docs/faq.txt")),
    (
        "courses.pdf",
        include_bytes!("../../examples/docs/courses.pdf"),
    ),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chunk { files, args } => {
            let inputs = files
                .iter()
                .map(|p| {
                    let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    // Refuse before reading: a 500 MB file must not be loaded to be rejected.
                    if meta.len() > args.max_doc_bytes as u64 {
                        return Err(format!(
                            "{}: {}",
                            p.display(),
                            lorag::Error::ResourceLimit {
                                what: "document bytes",
                                size: meta.len(),
                                limit: args.max_doc_bytes as u64
                            }
                        ));
                    }
                    let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    Ok((p.display().to_string(), bytes))
                })
                .collect::<Result<Vec<_>, String>>();
            inputs.and_then(|inputs| run_chunk(&inputs, &args))
        }
        Command::Demo { mut args } => {
            if args.tokenizer.is_none() {
                let default =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2-int8");
                if default.join("tokenizer.json").exists() {
                    args.tokenizer = Some(default);
                } else {
                    eprintln!(
                        "note: {} not found (run scripts/fetch-models); counting characters",
                        default.display()
                    );
                }
            }
            let inputs: Vec<(String, Vec<u8>)> = EXAMPLES
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_vec()))
                .collect();
            eprintln!(
                "lorag {}: ingesting and chunking {} bundled example documents",
                lorag::VERSION,
                inputs.len()
            );
            run_chunk(&inputs, &args)
        }
        Command::Embed {
            model,
            query,
            json,
            texts,
        } => run_embed(&model, query, json, &texts),
        Command::Eval(EvalCommand::Beir {
            dir,
            model,
            search,
            batch_size,
            json,
        }) => run_eval_beir(&dir, &model, &search, batch_size, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn make_chunker(args: &ChunkArgs) -> Result<Chunker, String> {
    let config = ChunkConfig {
        size: args.size,
        overlap: args.overlap,
        prefix_headings: args.prefix_headings,
    };
    match &args.tokenizer {
        Some(dir) => {
            let tok = std::fs::read(dir.join("tokenizer.json"))
                .map_err(|e| format!("{}/tokenizer.json: {e}", dir.display()))?;
            let sbert = std::fs::read(dir.join("sentence_bert_config.json")).ok();
            let counter =
                TokenCounter::from_bytes(&tok, sbert.as_deref()).map_err(|e| e.to_string())?;
            Chunker::new(counter, config).map_err(|e| e.to_string())
        }
        None => Chunker::chars(config).map_err(|e| e.to_string()),
    }
}

fn run_chunk(inputs: &[(String, Vec<u8>)], args: &ChunkArgs) -> Result<(), String> {
    let chunker = make_chunker(args)?;
    let opts = IngestOptions {
        lossy_utf8: args.lossy,
        limits: Limits {
            max_doc_bytes: args.max_doc_bytes,
            ..Limits::default()
        },
        ..Default::default()
    };
    let mut all: Vec<Chunk> = Vec::new();
    let mut failed = 0;
    for (name, bytes) in inputs {
        let doc: Document = match ingest(name, bytes, &opts) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{name}: {e}");
                failed += 1;
                continue;
            }
        };
        for w in &doc.warnings {
            eprintln!(
                "{name}: warning: {}",
                serde_json::to_string(w).unwrap_or_default()
            );
        }
        let chunks = chunker.chunk(&doc).map_err(|e| format!("{name}: {e}"))?;
        if !args.json {
            println!(
                "\n{name} ({}, {} bytes, title {:?}): {} blocks, {} chunks",
                doc.format,
                bytes.len(),
                doc.title.as_deref().unwrap_or(""),
                doc.blocks.len(),
                chunks.len()
            );
            print_table(&chunks, chunker.unit());
        }
        all.extend(chunks);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "\n{} chunks from {} documents (size {} {}, overlap {})",
            all.len(),
            inputs.len() - failed,
            chunker.size(),
            match chunker.unit() {
                lorag::Unit::Tokens => "tokens",
                lorag::Unit::Chars => "chars",
            },
            chunker.overlap()
        );
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {} documents could not be read",
            inputs.len()
        ));
    }
    Ok(())
}

fn print_table(chunks: &[Chunk], unit: lorag::Unit) {
    let unit = match unit {
        lorag::Unit::Tokens => "tok",
        lorag::Unit::Chars => "chr",
    };
    println!(
        "{:<16} {:>13} {:>5} {:>5}  {:<30} text",
        "id", "span", "page", unit, "heading path"
    );
    for c in chunks {
        let span = format!("{}..{}", c.span.start, c.span.end);
        let page = c
            .pages
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .unwrap_or_default();
        let path = truncate(&c.heading_path.join(" > "), 30);
        let text = truncate(&c.text.split_whitespace().collect::<Vec<_>>().join(" "), 60);
        println!(
            "{:<16} {:>13} {:>5} {:>5}  {:<30} {}",
            truncate(&c.id, 16),
            span,
            page,
            c.size,
            path,
            text
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
