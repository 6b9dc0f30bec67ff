//! The lorag command-line tool.
//!
//! `lorag demo` runs the main job on the bundled example documents; `lorag chunk FILE…` ingests and
//! chunks files and prints the chunks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[path = "lorag/rag.rs"]
mod rag;
#[path = "lorag/train.rs"]
mod train;
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

/// Chunk sizes, shared by every command that chunks.
#[derive(clap::Args, Clone)]
struct SizeArgs {
    /// Chunk size (tokens, or characters without a tokenizer). Default: the model's max_seq_length minus
    /// special tokens; 1000 characters.
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// Overlap between consecutive chunks (same unit). Default: 15 % of the size.
    #[arg(long, value_name = "N")]
    overlap: Option<usize>,
    /// Prefix the embedding text with the heading path (counts toward the size).
    #[arg(long)]
    prefix_headings: bool,
}

impl SizeArgs {
    fn config(&self) -> ChunkConfig {
        ChunkConfig {
            size: self.size,
            overlap: self.overlap,
            prefix_headings: self.prefix_headings,
        }
    }
}

#[derive(clap::Args, Clone)]
struct ChunkArgs {
    /// Model folder holding tokenizer.json (and sentence_bert_config.json); sizes then count its tokens.
    /// Without it, sizes count characters.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sizes: SizeArgs,
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
    /// The main job on the bundled example documents: an in-memory knowledge base (ingest, chunk, embed,
    /// index), then each question answered by the generator (SmolLM2-135M) from its numbered sources.
    Demo {
        #[command(flatten)]
        args: ChunkArgs,
        /// Questions to ask (default: three about the example documents).
        #[arg(short, long = "question", value_name = "TEXT")]
        questions: Vec<String>,
        /// Sources per question.
        #[arg(short, long, default_value_t = 3)]
        k: usize,
        /// Print the chunk table instead.
        #[arg(long)]
        chunks: bool,
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
        #[command(flatten)]
        engine: EngineArg,
        /// Texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Build or update a knowledge pack from files and folders (.txt, .md, .html, .pdf): ingest, chunk,
    /// embed, index, save atomically. An existing pack is updated: unchanged chunks are not re-embedded.
    Index {
        /// Files or folders (walked recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The knowledge pack to write (updated in place when it exists).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Embedder model folder.
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        #[command(flatten)]
        sizes: SizeArgs,
        /// Delete documents from the pack that are not among the inputs.
        #[arg(long)]
        prune: bool,
    },
    /// Search a knowledge pack.
    Search {
        /// The knowledge pack.
        pack: PathBuf,
        /// The question or keywords.
        query: String,
        /// Embedder model folder (must be the one the pack was built with).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Results.
        #[arg(short, long, default_value_t = 5)]
        k: usize,
        /// exact, hnsw, bm25 or hybrid.
        #[arg(long, default_value = "hybrid")]
        mode: String,
        /// HNSW candidate list size for this query.
        #[arg(long)]
        ef: Option<usize>,
        /// Metadata filter as JSON, e.g. '{"eq": {"key": "format", "value": "pdf"}}'.
        #[arg(long, value_name = "JSON")]
        filter: Option<String>,
        /// Hybrid fusion: rrf (default) or weighted:ALPHA (weight of the vector score).
        #[arg(long, default_value = "rrf")]
        fusion: String,
        /// MMR diversity re-ranking with this lambda (1 = plain relevance).
        #[arg(long, value_name = "LAMBDA")]
        mmr: Option<f32>,
        /// Drop results scoring below this.
        #[arg(long)]
        min_score: Option<f32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Answer a question from a knowledge pack: retrieve, build the cited prompt, generate (streamed), print
    /// the sources with the cited ones marked.
    Ask {
        /// The knowledge pack.
        pack: PathBuf,
        /// The question.
        question: String,
        /// base (model alone), rag (sources, base model), finetuned (adapters, no sources) or hybrid (both).
        #[arg(long, default_value = "rag")]
        mode: String,
        #[command(flatten)]
        args: rag::RagArgs,
        /// Append the interaction to this JSONL log (see `lorag log`).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// Run a QA set (JSONL: id, question, answers, sources, evidence) through base, rag, finetuned and hybrid
    /// (the last two need --adapter) and print one table: answer quality, sources, citations, speed.
    Compare {
        /// The QA set.
        file: PathBuf,
        #[command(flatten)]
        kb: rag::KbArgs,
        #[command(flatten)]
        args: rag::RagArgs,
        /// Also write every answer and score as JSON to this file.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Evaluate retrieval (BEIR) or answers (QA set).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// The interaction log: feedback on answers, export as chat-format fine-tuning data.
    #[command(subcommand)]
    Log(LogCommand),
    /// Generate text with a GGUF language model (streamed to stdout, timings to stderr).
    Generate(GenerateArgs),
    /// Train a LoRA adapter on chat or prompt/response examples (the base stays frozen and quantized) and write
    /// it in PEFT format, usable at once by `generate --adapter`, `ask --adapter` and `compare --adapter`.
    Train(train::TrainArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The GGUF model file.
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// The prompt (with --chat: the user message).
    #[arg(short, long)]
    prompt: String,
    /// Apply the model's chat template (a user turn, the assistant turn opened).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// Greedy decoding (argmax).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Min-p.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Stop strings.
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Context size in tokens (0: prompt + max tokens).
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Treat control tokens written in a raw prompt (<|im_start|>) as those tokens.
    #[arg(long)]
    parse_special: bool,
    /// Do not stop at end-of-sequence tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print JSON: prompt ids, the first step's top-5, generated ids and text, timings.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter to apply: a PEFT folder (adapter_config.json + adapter_model.safetensors) or a
    /// GGUF-LoRA file, optionally with a weight (default 1). Repeat for a weighted mix.
    #[arg(long = "adapter", value_name = "PATH[:WEIGHT]")]
    adapters: Vec<String>,
    /// Where to run: auto (a hardware GPU when one answers, else the CPU, with a notice), gpu (any GPU adapter,
    /// software ones included, or an error), cpu.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// `PATH[:WEIGHT]`: the weight is the part after the last `:` when it parses as a number.
fn parse_adapter_arg(s: &str) -> (PathBuf, f32) {
    if let Some((p, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            return (PathBuf::from(p), w);
        }
    }
    (PathBuf::from(s), 1.0)
}

/// Load the adapter at `path` (PEFT folder or GGUF-LoRA file) into `model` under `name`.
fn load_adapter_path(
    model: &mut lorag::llm::Model,
    name: &str,
    path: &Path,
) -> Result<lorag::llm::AdapterInfo, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let adapter = if path.is_dir() {
        let config = read(&path.join("adapter_config.json"))?;
        let weights = read(&path.join("adapter_model.safetensors"))?;
        model.adapter_from_peft(&config, &weights)
    } else {
        model.adapter_from_gguf(&read(path)?)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    model
        .add_adapter(name, adapter)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Subcommand)]
enum LogCommand {
    /// Rate a logged answer (good / bad), optionally with a corrected answer to train on.
    Feedback {
        /// The log (written by `lorag ask --log`).
        log: PathBuf,
        /// The record's id.
        id: String,
        /// good or bad.
        rating: String,
        /// The answer it should have given (exported instead of the logged one).
        #[arg(long)]
        correction: Option<String>,
        /// A note.
        #[arg(long)]
        note: Option<String>,
    },
    /// Export answers rated good as chat-format JSONL ({"messages": [...]}) for LoRA training.
    Export {
        /// The log.
        log: PathBuf,
        /// Output file (default: stdout).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Keep unrated answers too (bad ones are always left out).
        #[arg(long)]
        all: bool,
        /// The question without its sources as the user turn (to train the finetuned mode), instead of the
        /// prompt the generator saw.
        #[arg(long)]
        question_only: bool,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// A QA set (JSONL: id, question, answers, sources, evidence) answered in one mode: EM, F1, ROUGE-L,
    /// answer-contains-gold, gold source retrieved, citation rates, latency.
    Qa {
        /// The QA set.
        file: PathBuf,
        /// base, rag, finetuned or hybrid.
        #[arg(long, default_value = "rag")]
        mode: String,
        #[command(flatten)]
        kb: rag::KbArgs,
        #[command(flatten)]
        args: Box<rag::RagArgs>,
    },
    /// A BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv): nDCG@10, recall@10/100, MRR@10, MAP@100.
    Beir {
        /// The BEIR dataset folder.
        dir: PathBuf,
        /// Model folder.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Search modes, comma-separated: exact (brute-force cosine), hnsw, bm25, hybrid; or all.
        #[arg(long, default_value = "exact")]
        search: String,
        /// Cache the embedded corpus as a knowledge pack in FILE: reused when it exists and was built
        /// with the same model from the same corpus, written otherwise.
        #[arg(long, value_name = "FILE")]
        pack: Option<PathBuf>,
        /// HNSW candidate list size.
        #[arg(long)]
        ef: Option<usize>,
        /// Texts per forward pass.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[command(flatten)]
        engine: EngineArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--engine`: what runs the embedder's graph.
#[derive(clap::Args, Debug, Clone, Default)]
struct EngineArg {
    /// What runs the embedding model: native (lorag's BERT encoder) or tract. Default: native when the
    /// graph is a BERT it recognizes, else tract.
    #[arg(long, value_parser = ["native", "tract"])]
    engine: Option<String>,
}

impl EngineArg {
    fn get(&self) -> Option<lorag::Engine> {
        self.engine.as_deref().map(|e| match e {
            "tract" => lorag::Engine::Tract,
            _ => lorag::Engine::Native,
        })
    }
}

fn load_embedder(dir: &Path, batch_size: Option<usize>) -> Result<lorag::Embedder, String> {
    load_embedder_on(dir, batch_size, None)
}

fn load_embedder_on(
    dir: &Path,
    batch_size: Option<usize>,
    engine: Option<lorag::Engine>,
) -> Result<lorag::Embedder, String> {
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
        engine,
        ..Default::default()
    };
    lorag::Embedder::from_bytes(files, config, &Limits::default()).map_err(|e| e.to_string())
}

fn run_embed(
    model: &Path,
    query: bool,
    json: bool,
    engine: Option<lorag::Engine>,
    texts: &[String],
) -> Result<(), String> {
    let embedder = load_embedder_on(model, None, engine)?;
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
        let doc = serde_json::json!({"model": model.display().to_string(), "identity": embedder.identity(), "engine": embedder.engine(), "weight_bytes": embedder.weight_bytes(), "dim": embedder.dim(), "normalized": embedder.normalizes(), "embeddings": rows});
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
    pack: Option<&Path>,
    ef: Option<usize>,
    (batch_size, engine): (usize, Option<lorag::Engine>),
    json: bool,
) -> Result<(), String> {
    let modes: Vec<lorag::SearchMode> = if search == "all" {
        "exact,hnsw,bm25,hybrid"
    } else {
        search
    }
    .split(',')
    .map(|m| m.trim().parse().map_err(|e: lorag::Error| e.to_string()))
    .collect::<Result<_, _>>()?;
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}/{name}: {e}", dir.display()))
    };
    let corpus_bytes = read("corpus.jsonl")?;
    let beir = lorag::eval::Beir::from_bytes(
        &corpus_bytes,
        &read("queries.jsonl")?,
        &read("qrels/test.tsv")?,
    )
    .map_err(|e| e.to_string())?;
    let embedder = load_embedder_on(model, Some(batch_size), engine)?;
    let id = lorag::EmbedderId::of(&embedder, model_name(model));
    // The corpus's identity: a cached pack is reused only for the same corpus and model.
    let corpus_hash = hex16(&corpus_bytes);
    let mut corpus_secs = None;
    let cached = pack.filter(|p| p.exists()).and_then(|p| {
        let kb = std::fs::read(p).map_err(|e| e.to_string()).and_then(|b| {
            lorag::KnowledgeBase::from_bytes(&b, Some(&id)).map_err(|e| e.to_string())
        });
        match kb {
            Ok(kb)
                if kb
                    .document("__corpus__")
                    .is_some_and(|d| d.metadata.get("sha256") == Some(&corpus_hash)) =>
            {
                eprintln!("using the embedded corpus in {}", p.display());
                Some(kb)
            }
            Ok(_) => {
                eprintln!("{}: built from another corpus; rebuilding", p.display());
                None
            }
            Err(e) => {
                eprintln!("{}: {e}; rebuilding", p.display());
                None
            }
        }
    });
    let kb = match cached {
        Some(kb) => kb,
        None => {
            let t0 = std::time::Instant::now();
            let mut kb = lorag::KnowledgeBase::new(id.clone(), lorag::IndexConfig::default())
                .map_err(|e| e.to_string())?;
            let step = 256;
            let mut done = 0;
            for part in beir.corpus.chunks(step) {
                let texts: Vec<&str> = part.iter().map(|(_, t)| t.as_str()).collect();
                let vectors = embedder
                    .embed(&texts, lorag::TextKind::Passage)
                    .map_err(|e| e.to_string())?;
                for ((doc_id, text), e) in part.iter().zip(vectors) {
                    kb.add_document(
                        lorag::DocInfo {
                            id: doc_id.clone(),
                            ..Default::default()
                        },
                        vec![whole_chunk(doc_id, text)],
                        vec![e.vector],
                    )
                    .map_err(|e| e.to_string())?;
                }
                done += part.len();
                eprint!(
                    "\rembedding corpus: {done}/{} ({:.1} docs/s)",
                    beir.corpus.len(),
                    done as f64 / t0.elapsed().as_secs_f64()
                );
            }
            eprintln!();
            corpus_secs = Some(t0.elapsed().as_secs_f64());
            // A marker document records which corpus the pack holds (for --pack reuse).
            let marker = lorag::DocInfo {
                id: "__corpus__".into(),
                title: None,
                metadata: [("sha256".to_string(), corpus_hash.clone())].into(),
            };
            kb.add_document(marker, Vec::new(), Vec::new())
                .map_err(|e| e.to_string())?;
            let t1 = std::time::Instant::now();
            kb.compact();
            eprintln!(
                "indexed {} chunks (HNSW + BM25) in {:.1} s",
                kb.len(),
                t1.elapsed().as_secs_f64()
            );
            if let Some(p) = pack {
                kb.save(p).map_err(|e| format!("{}: {e}", p.display()))?;
                eprintln!("saved {}", p.display());
            }
            kb
        }
    };
    let texts: Vec<&str> = beir.queries.iter().map(|(_, t)| t.as_str()).collect();
    let t1 = std::time::Instant::now();
    let queries = embedder
        .embed(&texts, lorag::TextKind::Query)
        .map_err(|e| e.to_string())?;
    let query_secs = t1.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for mode in modes {
        let opts = lorag::SearchOptions {
            k: 101,
            mode,
            ef,
            ..Default::default()
        };
        let mut results = std::collections::HashMap::new();
        let t = std::time::Instant::now();
        for ((qid, text), q) in beir.queries.iter().zip(&queries) {
            let hits = kb
                .search(Some(&q.vector), Some(text), &opts)
                .map_err(|e| e.to_string())?;
            results.insert(
                qid.clone(),
                hits.iter()
                    .map(|h| h.chunk.doc_id.clone())
                    .collect::<Vec<_>>(),
            );
        }
        let search_qps = beir.queries.len() as f64 / t.elapsed().as_secs_f64();
        let m = lorag::eval::evaluate(&results, &beir.qrels);
        rows.push((mode, m, search_qps));
    }
    let mem = kb.memory();
    if json {
        let doc = serde_json::json!({
            "dataset": dir.display().to_string(), "model": model.display().to_string(), "identity": embedder.identity(),
            "engine": embedder.engine(), "weight_bytes": embedder.weight_bytes(), "documents": beir.corpus.len(), "queries": beir.queries.len(),
            "results": rows.iter().map(|(mode, m, qps)| serde_json::json!({"search": mode, "metrics": m, "search_qps_k100": qps})).collect::<Vec<_>>(),
            "corpus_docs_per_s": corpus_secs.map(|s| beir.corpus.len() as f64 / s), "queries_per_s": queries.len() as f64 / query_secs,
            "memory": mem,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "{}: {} documents, {} queries",
            dir.display(),
            beir.corpus.len(),
            beir.queries.len()
        );
        println!(
            "  {:<7} {:>8} {:>9} {:>10} {:>11} {:>7} {:>8} {:>9}",
            "search",
            "nDCG@10",
            "recall@1",
            "recall@10",
            "recall@100",
            "MRR@10",
            "MAP@100",
            "q/s k=100"
        );
        for (mode, m, qps) in &rows {
            println!(
                "  {:<7} {:>8.4} {:>9.4} {:>10.4} {:>11.4} {:>7.4} {:>8.4} {:>9.0}",
                format!("{mode:?}").to_lowercase(),
                m.ndcg_at_10,
                m.recall_at_1,
                m.recall_at_10,
                m.recall_at_100,
                m.mrr_at_10,
                m.map_at_100,
                qps
            );
        }
        if let Some(s) = corpus_secs {
            println!(
                "  corpus embedded at {:.1} docs/s",
                beir.corpus.len() as f64 / s
            );
        }
        println!(
            "  queries embedded at {:.1}/s",
            queries.len() as f64 / query_secs
        );
    }
    Ok(())
}

/// Questions the bundled example documents answer.
const DEMO_QUESTIONS: &[&str] = &[
    "What do I need before I can use the laser cutter?",
    "Can I bring a guest to the makerspace?",
    "What should I do if there is a fire?",
];

fn run_demo(
    inputs: &[(String, Vec<u8>)],
    model: &Path,
    args: &ChunkArgs,
    questions: &[String],
    k: usize,
) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let embedder = load_embedder(model, None)?;
    let chunker = token_chunker(model, args.sizes.config())?;
    let mut kb = lorag::KnowledgeBase::new(
        lorag::EmbedderId::of(&embedder, model_name(model)),
        lorag::IndexConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    eprintln!(
        "lorag {}: indexing {} bundled example documents with {}",
        lorag::VERSION,
        inputs.len(),
        model.display()
    );
    let (_, failed) = index_inputs(&mut kb, inputs, &chunker, &embedder, false)?;
    if failed > 0 {
        return Err(format!("{failed} example documents could not be read"));
    }
    eprintln!(
        "knowledge base: {} documents, {} chunks, built in {:.1} s\n",
        kb.documents().count(),
        kb.len(),
        t0.elapsed().as_secs_f64()
    );
    let questions: Vec<String> = if questions.is_empty() {
        DEMO_QUESTIONS.iter().map(|q| q.to_string()).collect()
    } else {
        questions.to_vec()
    };
    let gen_path = default_generator();
    let bytes = std::fs::read(&gen_path)
        .map_err(|e| format!("{}: {e} (run scripts/fetch-models)", gen_path.display()))?;
    let mut generator =
        lorag::llm::Model::from_bytes(bytes).map_err(|e| format!("{}: {e}", gen_path.display()))?;
    let device = lorag::kernels::block_on(generator.use_device(lorag::kernels::DevicePref::Auto))
        .map_err(|e| e.to_string())?;
    let l = rag::Loaded {
        model: generator,
        embedder,
        kb,
        adapters: Vec::new(),
        device,
    };
    let mut opts = lorag::AskOptions::default();
    opts.search.k = k;
    for q in &questions {
        rag::ask_and_print(&l, q, &opts)?;
        println!();
    }
    Ok(())
}

/// `(", page N", " › A › B")` for a chunk; a heading path that starts with `title` skips it.
fn citation(c: &Chunk, title: Option<&str>) -> (String, String) {
    let page = match c.pages {
        Some((a, b)) if a == b => format!(", page {a}"),
        Some((a, b)) => format!(", pages {a}-{b}"),
        None => String::new(),
    };
    let heading = c
        .heading_path
        .iter()
        .skip_while(|h| Some(h.as_str()) == title)
        .map(|h| format!(" › {h}"))
        .collect();
    (page, heading)
}

fn model_name(model: &Path) -> String {
    model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Hex SHA-256 (first 128 bits).
fn hex16(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A whole BEIR document as one chunk (BEIR's convention: the embedder truncates long ones).
fn whole_chunk(doc_id: &str, text: &str) -> Chunk {
    Chunk {
        id: format!("{doc_id}#0"),
        doc_id: doc_id.to_string(),
        index: 0,
        span: 0..text.len(),
        source_span: None,
        pages: None,
        heading_path: Vec::new(),
        size: text.chars().count() as u32,
        text: text.to_string(),
        hash: hex16(text.as_bytes()),
        prefix_headings: false,
    }
}

/// The embedder used when none is named: `models/all-MiniLM-L6-v2-int8` here, else beside the sources.
fn default_model() -> PathBuf {
    let here = PathBuf::from("models/all-MiniLM-L6-v2-int8");
    if here.join("model.onnx").exists() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2-int8")
    }
}

fn parse_fusion(s: &str) -> Result<lorag::Fusion, String> {
    match s.split_once(':') {
        None if s == "rrf" => Ok(lorag::Fusion::Rrf { k: 60.0 }),
        Some(("rrf", k)) => Ok(lorag::Fusion::Rrf {
            k: k.parse().map_err(|e| format!("--fusion: {e}"))?,
        }),
        Some(("weighted", a)) => Ok(lorag::Fusion::Weighted {
            alpha: a.parse().map_err(|e| format!("--fusion: {e}"))?,
        }),
        None if s == "weighted" => Ok(lorag::Fusion::Weighted { alpha: 0.5 }),
        _ => Err(format!(
            "--fusion: expected rrf, rrf:K, weighted or weighted:ALPHA, not {s:?}"
        )),
    }
}

/// Documents under `paths`: files as given, folders walked (sorted) for known extensions.
fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = paths.iter().rev().cloned().collect();
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| {
                    !e.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            entries.sort();
            for e in entries.into_iter().rev() {
                let known = e.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(
                        x.to_ascii_lowercase().as_str(),
                        "txt" | "md" | "markdown" | "html" | "htm" | "pdf"
                    )
                });
                if e.is_dir() || known {
                    stack.push(e);
                }
            }
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

fn run_index(
    paths: &[PathBuf],
    output: &Path,
    model: &Path,
    config: ChunkConfig,
    prune: bool,
) -> Result<(), String> {
    let embedder = load_embedder(model, None)?;
    let id = lorag::EmbedderId::of(&embedder, model_name(model));
    let mut kb = if output.exists() {
        let bytes = std::fs::read(output).map_err(|e| format!("{}: {e}", output.display()))?;
        let kb = lorag::KnowledgeBase::from_bytes(&bytes, Some(&id))
            .map_err(|e| format!("{}: {e}", output.display()))?;
        eprintln!(
            "updating {} ({} documents, {} chunks)",
            output.display(),
            kb.documents().count(),
            kb.len()
        );
        kb
    } else {
        lorag::KnowledgeBase::new(id, lorag::IndexConfig::default()).map_err(|e| e.to_string())?
    };
    let chunker = token_chunker(model, config)?;
    let files = collect_files(paths)?;
    let inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            Ok((
                p.display().to_string(),
                std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let t0 = std::time::Instant::now();
    let (stats, failed) = index_inputs(&mut kb, &inputs, &chunker, &embedder, false)?;
    let mut pruned = 0;
    if prune {
        let keep: std::collections::HashSet<&str> =
            inputs.iter().map(|(n, _)| n.as_str()).collect();
        let gone: Vec<String> = kb
            .documents()
            .map(|d| d.id.clone())
            .filter(|d| !keep.contains(d.as_str()))
            .collect();
        for d in gone {
            kb.delete_document(&d).map_err(|e| e.to_string())?;
            pruned += 1;
        }
    }
    kb.compact();
    kb.save(output)
        .map_err(|e| format!("{}: {e}", output.display()))?;
    let mem = kb.memory();
    eprintln!(
        "{}: {} documents, {} chunks ({} embedded, {} unchanged, {} removed, {pruned} documents pruned) in {:.1} s; {:.1} KiB per chunk in memory",
        output.display(), kb.documents().count(), kb.len(), stats.embedded, stats.kept, stats.removed,
        t0.elapsed().as_secs_f64(),
        (mem.vector_bytes + mem.graph_bytes + mem.text_bytes + mem.postings_bytes) as f64 / 1024.0 / kb.len().max(1) as f64
    );
    if failed > 0 {
        return Err(format!(
            "{failed} of {} documents could not be read",
            inputs.len()
        ));
    }
    Ok(())
}

/// Ingest, chunk and upsert every input; returns the summed stats and the number of unreadable inputs.
fn index_inputs(
    kb: &mut lorag::KnowledgeBase,
    inputs: &[(String, Vec<u8>)],
    chunker: &Chunker,
    embedder: &lorag::Embedder,
    quiet: bool,
) -> Result<(lorag::index::UpsertStats, usize), String> {
    let mut total = lorag::index::UpsertStats::default();
    let mut failed = 0;
    let t0 = std::time::Instant::now();
    for (i, (name, bytes)) in inputs.iter().enumerate() {
        let doc = match ingest(name, bytes, &IngestOptions::default()) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{name}: {e}");
                failed += 1;
                continue;
            }
        };
        let chunks = chunker.chunk(&doc).map_err(|e| format!("{name}: {e}"))?;
        let n = chunks.len();
        let stats = kb
            .upsert_document(lorag::DocInfo::from(&doc), chunks, &mut |fresh| {
                let texts: Vec<String> = fresh.iter().map(|c| c.embed_text()).collect();
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                Ok(embedder
                    .embed(&refs, lorag::TextKind::Passage)?
                    .into_iter()
                    .map(|e| e.vector)
                    .collect())
            })
            .map_err(|e| format!("{name}: {e}"))?;
        if !quiet {
            // A progress line per file: position, count, elapsed time and a simple estimate of what is left.
            let done = i + 1;
            let secs = t0.elapsed().as_secs_f64();
            let left = secs / done as f64 * (inputs.len() - done) as f64;
            eprintln!(
                "  [{done}/{}, {secs:.1} s, ~{left:.0} s left] {name}: {n} chunks ({} embedded, {} unchanged)",
                inputs.len(),
                stats.embedded,
                stats.kept
            );
        }
        total.kept += stats.kept;
        total.embedded += stats.embedded;
        total.removed += stats.removed;
    }
    Ok((total, failed))
}

fn run_search(
    pack: &Path,
    query: &str,
    model: &Path,
    opts: &lorag::SearchOptions,
    json: bool,
) -> Result<(), String> {
    let bytes = std::fs::read(pack).map_err(|e| format!("{}: {e}", pack.display()))?;
    // Validate the pack before loading the model: a corrupt pack is reported at once.
    let kb = lorag::KnowledgeBase::from_bytes(&bytes, None)
        .map_err(|e| format!("{}: {e}", pack.display()))?;
    let vector = if opts.mode == lorag::SearchMode::Bm25 {
        None
    } else {
        let embedder = load_embedder(model, None)?;
        let id = lorag::EmbedderId::of(&embedder, model_name(model));
        if !kb.embedder().matches(&id) {
            return Err(lorag::Error::EmbedderMismatch {
                pack: kb.embedder().to_string(),
                model: id.to_string(),
            }
            .to_string());
        }
        Some(
            embedder
                .embed(&[query], lorag::TextKind::Query)
                .map_err(|e| e.to_string())?
                .remove(0)
                .vector,
        )
    };
    let t = std::time::Instant::now();
    let hits = kb
        .search(vector.as_deref(), Some(query), opts)
        .map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"query": query, "search_ms": ms, "hits": hits})
            )
            .map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{} results for {query:?} ({:?}, {ms:.2} ms over {} chunks)",
        hits.len(),
        opts.mode,
        kb.len()
    );
    for (i, h) in hits.iter().enumerate() {
        let c = h.chunk;
        let (page, heading) = citation(c, None);
        println!(
            "[{}] {:.4}  {}{page}{heading}  (bytes {}..{}; vector {}, bm25 {})",
            i + 1,
            h.score,
            c.doc_id,
            c.span.start,
            c.span.end,
            h.vector_score.map_or("-".into(), |x| format!("{x:.3}")),
            h.keyword_score.map_or("-".into(), |x| format!("{x:.2}"))
        );
        println!(
            "    {}",
            truncate(
                &c.text.split_whitespace().collect::<Vec<_>>().join(" "),
                160
            )
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
        Command::Demo {
            mut args,
            questions,
            k,
            chunks,
        } => {
            let model = default_model();
            let inputs: Vec<(String, Vec<u8>)> = EXAMPLES
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_vec()))
                .collect();
            if chunks || !model.join("model.onnx").exists() {
                if !model.join("model.onnx").exists() {
                    eprintln!(
                        "note: {} not found (run scripts/fetch-models); printing the chunk table only",
                        model.display()
                    );
                }
                if args.tokenizer.is_none() && model.join("tokenizer.json").exists() {
                    args.tokenizer = Some(model);
                }
                run_chunk(&inputs, &args)
            } else {
                run_demo(&inputs, &model, &args, &questions, k)
            }
        }
        Command::Embed {
            model,
            query,
            json,
            engine,
            texts,
        } => run_embed(&model, query, json, engine.get(), &texts),
        Command::Eval(EvalCommand::Beir {
            dir,
            model,
            search,
            pack,
            ef,
            batch_size,
            json,
            engine,
        }) => run_eval_beir(
            &dir,
            &model,
            &search,
            pack.as_deref(),
            ef,
            (batch_size, engine.get()),
            json,
        ),
        Command::Index {
            paths,
            output,
            model,
            sizes,
            prune,
        } => run_index(
            &paths,
            &output,
            &model.unwrap_or_else(default_model),
            sizes.config(),
            prune,
        ),
        Command::Search {
            pack,
            query,
            model,
            k,
            mode,
            ef,
            filter,
            fusion,
            mmr,
            min_score,
            json,
        } => (|| {
            let opts = lorag::SearchOptions {
                k,
                mode: mode.parse().map_err(|e: lorag::Error| e.to_string())?,
                ef,
                min_score,
                filter: filter
                    .map(|f| serde_json::from_str(&f).map_err(|e| format!("--filter: {e}")))
                    .transpose()?,
                fusion: parse_fusion(&fusion)?,
                candidates: None,
                mmr_lambda: mmr,
            };
            run_search(
                &pack,
                &query,
                &model.unwrap_or_else(default_model),
                &opts,
                json,
            )
        })(),
        Command::Generate(args) => run_generate(&args),
        Command::Train(args) => train::run_train(&args),
        Command::Ask {
            pack,
            question,
            mode,
            args,
            log,
        } => rag::run_ask(&pack, &question, &mode, &args, log.as_deref()),
        Command::Compare {
            file,
            kb,
            args,
            output,
        } => rag::run_compare(&file, &kb, &args, output.as_deref()),
        Command::Eval(EvalCommand::Qa {
            file,
            mode,
            kb,
            args,
        }) => rag::run_eval_qa(&file, &kb, &mode, &args),
        Command::Log(LogCommand::Feedback {
            log,
            id,
            rating,
            correction,
            note,
        }) => rag::run_log_feedback(&log, &id, &rating, correction, note),
        Command::Log(LogCommand::Export {
            log,
            output,
            all,
            question_only,
        }) => rag::run_log_export(&log, output.as_deref(), all, question_only),
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
    let config = args.sizes.config();
    match &args.tokenizer {
        Some(dir) => token_chunker(dir, config),
        None => Chunker::chars(config).map_err(|e| e.to_string()),
    }
}

/// A chunker counting tokens of the model folder's tokenizer.json (and its sentence_bert_config.json).
fn token_chunker(dir: &Path, config: ChunkConfig) -> Result<Chunker, String> {
    let tok = std::fs::read(dir.join("tokenizer.json"))
        .map_err(|e| format!("{}/tokenizer.json: {e}", dir.display()))?;
    let sbert = std::fs::read(dir.join("sentence_bert_config.json")).ok();
    let counter = TokenCounter::from_bytes(&tok, sbert.as_deref()).map_err(|e| e.to_string())?;
    Chunker::new(counter, config).map_err(|e| e.to_string())
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

fn default_generator() -> PathBuf {
    PathBuf::from("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn run_generate(a: &GenerateArgs) -> Result<(), String> {
    use lorag::llm::{AdapterUse, GenerateOptions, Message, Model, SamplerConfig};
    use std::io::Write;
    let path = a.model.clone().unwrap_or_else(default_generator);
    let t0 = std::time::Instant::now();
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut model = Model::from_bytes(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let device = choose_device(&mut model, &a.device, !a.json, "")?;
    let mut uses = Vec::new();
    let mut adapter_info = Vec::new();
    for (i, arg) in a.adapters.iter().enumerate() {
        let (p, weight) = parse_adapter_arg(arg);
        let name = format!("{i}:{}", p.display());
        let info = load_adapter_path(&mut model, &name, &p)?;
        if !a.json {
            eprintln!(
                "[adapter {} ({:?}, rank {}..{}, {} layers, {:.1} MiB) weight {weight}]",
                p.display(),
                info.format,
                info.rank.0,
                info.rank.1,
                info.layers,
                info.bytes as f64 / (1 << 20) as f64
            );
        }
        adapter_info.push(
            serde_json::json!({"path": p.display().to_string(), "weight": weight, "info": info}),
        );
        uses.push(AdapterUse { name, weight });
    }
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        model.chat_prompt(&msgs)
    } else {
        model.encode(&a.prompt, a.parse_special)
    }
    .map_err(|e| e.to_string())?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        context: a.context,
        sampler: SamplerConfig {
            greedy: a.greedy,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..Default::default()
        },
        stop: a.stop.clone(),
        top_logits: 5,
        ignore_eos: a.ignore_eos,
        adapters: uses,
        ..Default::default()
    };
    let json = a.json;
    let out = lorag::kernels::block_on(model.generate_async(&prompt, &opts, &mut |ev| {
        if !json {
            print!("{}", ev.text);
            let _ = std::io::stdout().flush();
        }
        true
    }))
    .map_err(|e| e.to_string())?;
    let tok = &model.tokenizer;
    if json {
        let top: Vec<_> = out
            .top_logits
            .iter()
            .map(|&(id, logit)| serde_json::json!({"id": id, "token": tok.token_str(id), "logit": logit}))
            .collect();
        let v = serde_json::json!({
            "model": path.display().to_string(),
            "adapters": adapter_info,
            "device": device,
            "prompt_ids": out.prompt_ids,
            "top5_next": top,
            "generated_ids": out.ids,
            "text": out.text,
            "stop_reason": out.stop_reason,
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
            "load_ms": load_ms,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s; load {:.0} ms; stop: {:?}]",
            out.prompt_ids.len(),
            out.ids.len(),
            out.prefill_tok_s(),
            out.decode_tok_s(),
            load_ms,
            out.stop_reason
        );
    }
    Ok(())
}

/// Put `model` on the device `pref` names (auto, gpu, cpu) and, when `say`, print the choice to stderr (`what`:
/// what runs there, after the device's name).
fn choose_device(
    model: &mut lorag::llm::Model,
    pref: &str,
    say: bool,
    what: &str,
) -> Result<lorag::kernels::DeviceReport, String> {
    let pref: lorag::kernels::DevicePref = pref.parse().map_err(|e: lorag::Error| e.to_string())?;
    let device = lorag::kernels::block_on(model.use_device(pref)).map_err(|e| e.to_string())?;
    if say {
        match (&device.name, &device.notice) {
            (Some(n), _) => eprintln!(
                "[device: GPU {n} ({}){what}]",
                device.backend.as_deref().unwrap_or("?")
            ),
            (None, Some(why)) => eprintln!("[device: CPU — {why}]"),
            (None, None) => eprintln!("[device: CPU]"),
        }
    }
    Ok(device)
}
