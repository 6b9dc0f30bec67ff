//! The pipeline commands: `ask`, `eval qa`, `compare`, `log feedback`, `log export`.

use std::io::Write;
use std::path::{Path, PathBuf};

use lorag::eval::{QaItem, QaScore, QaSummary};
use lorag::llm::{AdapterUse, Model};
use lorag::{Answer, AskOptions, KnowledgeBase, LogRecord, Mode, Rag};

use super::{
    default_generator, default_model, index_inputs, load_adapter_path, load_embedder, model_name,
    parse_adapter_arg, parse_fusion, token_chunker, truncate, EXAMPLES,
};

/// Models, retrieval and generation settings shared by `ask`, `eval qa` and `compare`.
#[derive(clap::Args, Clone)]
pub struct RagArgs {
    /// Embedder model folder (the one the knowledge pack was built with).
    #[arg(long, value_name = "DIR")]
    embedder: Option<PathBuf>,
    /// The GGUF generator.
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// A LoRA adapter (PEFT folder or GGUF-LoRA file), optionally with a weight; repeat for a mix. Used by
    /// the finetuned and hybrid modes.
    #[arg(long = "adapter", value_name = "PATH[:WEIGHT]")]
    adapters: Vec<String>,
    /// Sources retrieved per question.
    #[arg(short, long, default_value_t = 4)]
    k: usize,
    /// Retrieval: hybrid, exact, hnsw or bm25.
    #[arg(long, default_value = "hybrid")]
    search: String,
    /// Metadata filter as JSON, e.g. '{"eq": {"key": "format", "value": "pdf"}}'.
    #[arg(long, value_name = "JSON")]
    filter: Option<String>,
    /// Hybrid fusion: rrf or weighted:ALPHA.
    #[arg(long, default_value = "rrf")]
    fusion: String,
    /// MMR diversity re-ranking with this lambda.
    #[arg(long, value_name = "LAMBDA")]
    mmr: Option<f32>,
    /// Most answer tokens (also reserved in the context).
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// Context size in tokens (0: the model's, at most 2048).
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Prompt texts and budget as JSON (fields of lorag::prompt::PromptConfig: system, systemNoSources,
    /// sourceFormat, userFormat, userFormatNoSources, context, historyTokens, minSourceTokens).
    #[arg(long, value_name = "FILE")]
    prompt_config: Option<PathBuf>,
    /// Repetition penalty over the last 64 tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Where the generator runs: auto, gpu or cpu.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Where the knowledge base comes from.
#[derive(clap::Args, Clone)]
pub struct KbArgs {
    /// A knowledge pack built by `lorag index`.
    #[arg(long, value_name = "FILE")]
    pack: Option<PathBuf>,
    /// Documents to index in memory (default: the `docs` folder beside the QA file, else the bundled examples).
    #[arg(long, value_name = "DIR")]
    docs: Option<PathBuf>,
}

/// Everything a question needs, loaded.
pub struct Loaded {
    pub model: Model,
    pub embedder: lorag::Embedder,
    pub kb: KnowledgeBase,
    pub adapters: Vec<AdapterUse>,
    pub device: lorag::kernels::DeviceReport,
}

impl Loaded {
    pub fn rag(&self) -> Rag<'_> {
        Rag::new(&self.model, &self.embedder, &self.kb)
    }
}

pub enum KbFrom<'a> {
    Pack(&'a Path),
    Docs(&'a Path),
    Bundled,
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Load the embedder, the knowledge base, the generator (on its device) and the adapters.
pub fn load(args: &RagArgs, from: KbFrom, quiet: bool) -> Result<Loaded, String> {
    let emb_dir = args.embedder.clone().unwrap_or_else(default_model);
    let embedder = load_embedder(&emb_dir, None)?;
    let id = lorag::EmbedderId::of(&embedder, model_name(&emb_dir));
    let kb = match from {
        KbFrom::Pack(p) => KnowledgeBase::from_bytes(&read(p)?, Some(&id))
            .map_err(|e| format!("{}: {e}", p.display()))?,
        KbFrom::Docs(_) | KbFrom::Bundled => {
            let inputs: Vec<(String, Vec<u8>)> = match from {
                KbFrom::Docs(d) => super::collect_files(&[d.to_path_buf()])?
                    .into_iter()
                    .map(|p| Ok((p.display().to_string(), read(&p)?)))
                    .collect::<Result<_, String>>()?,
                _ => EXAMPLES
                    .iter()
                    .map(|(n, b)| (n.to_string(), b.to_vec()))
                    .collect(),
            };
            let chunker = token_chunker(&emb_dir, lorag::ChunkConfig::default())?;
            let mut kb =
                KnowledgeBase::new(id, lorag::IndexConfig::default()).map_err(|e| e.to_string())?;
            let (_, failed) = index_inputs(&mut kb, &inputs, &chunker, &embedder, quiet)?;
            if failed > 0 {
                return Err(format!("{failed} documents could not be read"));
            }
            kb
        }
    };
    let gen_path = args.model.clone().unwrap_or_else(default_generator);
    let mut model =
        Model::from_bytes(read(&gen_path)?).map_err(|e| format!("{}: {e}", gen_path.display()))?;
    let pref: lorag::kernels::DevicePref = args
        .device
        .parse()
        .map_err(|e: lorag::Error| e.to_string())?;
    let device = lorag::kernels::block_on(model.use_device(pref)).map_err(|e| e.to_string())?;
    let mut adapters = Vec::new();
    for arg in &args.adapters {
        let (p, weight) = parse_adapter_arg(arg);
        let name = p.display().to_string();
        load_adapter_path(&mut model, &name, &p)?;
        adapters.push(AdapterUse { name, weight });
    }
    if !quiet {
        let dev = match (&device.name, &device.notice) {
            (Some(n), _) => format!("GPU {n}"),
            (None, Some(why)) => format!("CPU ({why})"),
            (None, None) => "CPU".into(),
        };
        eprintln!(
            "[{} documents, {} chunks; generator {} on {dev}{}]",
            kb.documents().count(),
            kb.len(),
            model.name.as_deref().unwrap_or("?"),
            if adapters.is_empty() {
                String::new()
            } else {
                format!(
                    "; adapters {}",
                    adapters
                        .iter()
                        .map(|a| format!("{}:{}", a.name, a.weight))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    Ok(Loaded {
        model,
        embedder,
        kb,
        adapters,
        device,
    })
}

/// The ask options for `mode` from the arguments.
pub fn ask_options(
    args: &RagArgs,
    mode: Mode,
    adapters: &[AdapterUse],
) -> Result<AskOptions, String> {
    let mut o = AskOptions {
        mode,
        ..Default::default()
    };
    o.search.k = args.k;
    o.search.mode = args
        .search
        .parse()
        .map_err(|e: lorag::Error| e.to_string())?;
    o.search.filter = args
        .filter
        .as_ref()
        .map(|f| serde_json::from_str(f).map_err(|e| format!("--filter: {e}")))
        .transpose()?;
    o.search.fusion = parse_fusion(&args.fusion)?;
    o.search.mmr_lambda = args.mmr;
    if let Some(p) = &args.prompt_config {
        o.prompt =
            serde_json::from_slice(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    o.generate.max_tokens = args.max_tokens;
    o.generate.sampler.repeat_penalty = args.repeat_penalty;
    if args.context > 0 {
        o.prompt.context = args.context;
    }
    if mode.adapted() {
        if adapters.is_empty() {
            return Err(format!("mode {mode} needs --adapter"));
        }
        o.adapters = adapters.to_vec();
    }
    Ok(o)
}

fn ask_blocking(
    l: &Loaded,
    q: &str,
    opts: &AskOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Answer, String> {
    lorag::kernels::block_on(l.rag().ask_async(q, opts, &mut |ev| {
        on_text(ev.text);
        true
    }))
    .map_err(|e| e.to_string())
}

/// The sources of an answer, cited ones marked, then any invalid citation.
pub fn print_sources(a: &Answer) {
    let cited: Vec<usize> = a.cited_sources().iter().map(|s| s.number).collect();
    println!("Sources:");
    for s in &a.sources {
        let (title, heading, page) = s.label();
        println!(
            "  {} [{}] {title}{heading} ({}{page}, bytes {}..{}{})",
            if cited.contains(&s.number) { "*" } else { " " },
            s.number,
            s.doc_id,
            s.span.start,
            s.span.end,
            if s.trimmed { ", trimmed to fit" } else { "" }
        );
        println!(
            "        {}",
            truncate(
                &s.text.split_whitespace().collect::<Vec<_>>().join(" "),
                160
            )
        );
    }
    if !a.dropped.is_empty() {
        println!("  ({} more left out for lack of room)", a.dropped.len());
    }
    let bad = a.invalid_citations();
    if !bad.is_empty() {
        println!(
            "  warning: the answer cites {} that no source has",
            bad.iter()
                .map(|n| format!("[{n}]"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !a.sources.is_empty() && cited.is_empty() {
        println!("  (the answer cites none of them)");
    }
}

fn timing_line(a: &Answer) -> String {
    format!(
        "[{} mode; {} prompt tokens, {} answer tokens; retrieval {:.0} ms, prompt {:.0} ms, prefill {:.0} ms, decode {:.1} tok/s; total {:.2} s]",
        a.mode,
        a.prompt_tokens,
        a.answer_tokens,
        a.timings.retrieval_ms,
        a.timings.prompt_ms,
        a.timings.prefill_ms,
        a.decode_tok_s(),
        a.timings.total_ms / 1e3
    )
}

/// One question answered and printed (streamed), as `demo` and `ask` do.
pub fn ask_and_print(l: &Loaded, q: &str, opts: &AskOptions) -> Result<Answer, String> {
    println!("Q: {q}");
    print!("A: ");
    let _ = std::io::stdout().flush();
    let a = ask_blocking(l, q, opts, &mut |t| {
        print!("{t}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    if opts.mode.retrieves() {
        print_sources(&a);
    }
    eprintln!("   {}", timing_line(&a));
    Ok(a)
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Append `a` to the JSONL interaction log at `path`; returns the record's id.
pub fn log_answer(path: &Path, a: &Answer) -> Result<String, String> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let n = existing.lines().filter(|l| !l.trim().is_empty()).count();
    let t = unix_ms();
    let id = format!("{}-{}", t as u64, n + 1);
    let rec = a.log_record(&id, t);
    let mut line = serde_json::to_string(&rec).map_err(|e| e.to_string())?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // One write of one whole line: readers never see half a record.
    f.write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(id)
}

pub fn run_ask(
    pack: &Path,
    question: &str,
    mode: &str,
    args: &RagArgs,
    log: Option<&Path>,
) -> Result<(), String> {
    let mode: Mode = mode.parse().map_err(|e: lorag::Error| e.to_string())?;
    // Validate the pack before loading anything else.
    KnowledgeBase::from_bytes(&read(pack)?, None)
        .map_err(|e| format!("{}: {e}", pack.display()))?;
    let l = load(args, KbFrom::Pack(pack), args.json)?;
    let opts = ask_options(args, mode, &l.adapters)?;
    let a = if args.json {
        ask_blocking(&l, question, &opts, &mut |_| {})?
    } else {
        ask_and_print(&l, question, &opts)?
    };
    let id = log.map(|p| log_answer(p, &a)).transpose()?;
    if args.json {
        let mut v = serde_json::to_value(&a).map_err(|e| e.to_string())?;
        v["device"] = serde_json::to_value(&l.device).map_err(|e| e.to_string())?;
        v["logId"] = serde_json::json!(id);
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else if let Some(id) = id {
        eprintln!("   [logged as {id} in {}]", log.unwrap().display());
    }
    Ok(())
}

/// Score one answer against its item.
pub fn score(item: &QaItem, a: &Answer, kb: &KnowledgeBase) -> QaScore {
    let gold = |chunk_id: &str, doc_id: &str| {
        kb.chunk(chunk_id)
            .is_some_and(|c| item.is_gold(doc_id, &c.text))
    };
    let cited = a.cited_sources();
    QaScore {
        source_hit: a
            .mode
            .retrieves()
            .then(|| a.sources.iter().any(|s| gold(&s.chunk_id, &s.doc_id))),
        cites: !cited.is_empty(),
        cites_gold: cited.iter().any(|s| gold(&s.chunk_id, &s.doc_id)),
        invalid_citations: a.invalid_citations().len(),
        latency_ms: a.timings.total_ms,
        answer_tokens: a.answer_tokens,
        decode_ms: a.timings.decode_ms,
        ..QaScore::text(item, &a.text)
    }
}

fn load_qa(file: &Path) -> Result<Vec<QaItem>, String> {
    lorag::eval::parse_qa(&read(file)?).map_err(|e| format!("{}: {e}", file.display()))
}

fn kb_from<'a>(file: &Path, kb: &'a KbArgs, docs_beside: &'a mut PathBuf) -> KbFrom<'a> {
    if let Some(p) = &kb.pack {
        return KbFrom::Pack(p);
    }
    if let Some(d) = &kb.docs {
        return KbFrom::Docs(d);
    }
    *docs_beside = file.parent().unwrap_or(Path::new(".")).join("docs");
    if docs_beside.is_dir() {
        KbFrom::Docs(docs_beside)
    } else {
        KbFrom::Bundled
    }
}

/// Warn about items whose evidence no chunk of their gold documents contains (a QA set that does not fit the
/// documents measures nothing).
fn check_evidence(items: &[QaItem], kb: &KnowledgeBase) {
    for it in items {
        let found = kb.documents().any(|d| {
            kb.document_chunks(&d.id)
                .iter()
                .any(|c| it.is_gold(&d.id, &c.text))
        });
        if !found {
            eprintln!(
                "warning: {}: no chunk of {:?} contains its evidence",
                it.id, it.sources
            );
        }
    }
}

/// Answer every item in `mode`; per-item lines on stderr unless quiet.
pub fn run_set(
    l: &Loaded,
    items: &[QaItem],
    opts: &AskOptions,
    quiet: bool,
) -> Result<Vec<(Answer, QaScore)>, String> {
    let mut out = Vec::new();
    for it in items {
        let a = ask_blocking(l, &it.question, opts, &mut |_| {})?;
        let s = score(it, &a, &l.kb);
        if !quiet {
            eprintln!(
                "  {:<8} {:<18} f1 {:.2} contains {} source {} cites {}: {}",
                opts.mode.as_str(),
                it.id,
                s.f1,
                s.contains as u8,
                s.source_hit.map_or("-".into(), |h| (h as u8).to_string()),
                if s.cites_gold {
                    "gold"
                } else if s.cites {
                    "other"
                } else {
                    "none"
                },
                truncate(&a.text.replace('\n', " "), 90)
            );
        }
        out.push((a, s));
    }
    Ok(out)
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

fn print_table(rows: &[(Mode, QaSummary)]) {
    println!(
        "{:<10} {:>4} {:>6} {:>6} {:>8} {:>9} {:>8} {:>9} {:>10} {:>7} {:>10} {:>8}",
        "mode",
        "n",
        "EM %",
        "F1 %",
        "ROUGE-L",
        "contains",
        "source@k",
        "cites %",
        "cites gold",
        "invalid",
        "latency s",
        "tok/s"
    );
    for (m, s) in rows {
        println!(
            "{:<10} {:>4} {:>6} {:>6} {:>8} {:>9} {:>8} {:>9} {:>10} {:>7} {:>10.2} {:>8.1}",
            m.as_str(),
            s.questions,
            pct(s.em),
            pct(s.f1),
            pct(s.rouge_l),
            pct(s.contains),
            s.source_recall.map_or("-".into(), pct),
            pct(s.citation_rate),
            pct(s.cites_gold),
            s.invalid_citations,
            s.latency_ms / 1e3,
            s.decode_tok_s
        );
    }
}

fn results_json(mode: Mode, items: &[QaItem], res: &[(Answer, QaScore)]) -> serde_json::Value {
    let per: Vec<serde_json::Value> = items
        .iter()
        .zip(res)
        .map(|(it, (a, s))| {
            serde_json::json!({
                "id": it.id, "question": it.question, "gold": it.answers, "answer": a.text,
                "sources": a.sources.iter().map(|s| &s.chunk_id).collect::<Vec<_>>(),
                "citations": a.citations.iter().map(|c| c.number).collect::<Vec<_>>(),
                "score": s,
            })
        })
        .collect();
    let summary = QaSummary::of(&res.iter().map(|r| r.1.clone()).collect::<Vec<_>>());
    serde_json::json!({"mode": mode, "summary": summary, "questions": per})
}

pub fn run_eval_qa(file: &Path, kb: &KbArgs, mode: &str, args: &RagArgs) -> Result<(), String> {
    let mode: Mode = mode.parse().map_err(|e: lorag::Error| e.to_string())?;
    let items = load_qa(file)?;
    let mut beside = PathBuf::new();
    let l = load(args, kb_from(file, kb, &mut beside), args.json)?;
    check_evidence(&items, &l.kb);
    let opts = ask_options(args, mode, &l.adapters)?;
    let res = run_set(&l, &items, &opts, args.json)?;
    if args.json {
        let v = results_json(mode, &items, &res);
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        let summary = QaSummary::of(&res.iter().map(|r| r.1.clone()).collect::<Vec<_>>());
        print_table(&[(mode, summary)]);
    }
    Ok(())
}

pub fn run_compare(
    file: &Path,
    kb: &KbArgs,
    args: &RagArgs,
    out: Option<&Path>,
) -> Result<(), String> {
    let items = load_qa(file)?;
    let mut beside = PathBuf::new();
    let l = load(args, kb_from(file, kb, &mut beside), args.json)?;
    check_evidence(&items, &l.kb);
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for mode in Mode::ALL {
        if mode.adapted() && l.adapters.is_empty() {
            eprintln!("  {mode}: skipped (no --adapter given)");
            continue;
        }
        let opts = ask_options(args, mode, &l.adapters)?;
        let res = run_set(&l, &items, &opts, args.json)?;
        rows.push((
            mode,
            QaSummary::of(&res.iter().map(|r| r.1.clone()).collect::<Vec<_>>()),
        ));
        json.push(results_json(mode, &items, &res));
    }
    let v = serde_json::json!({
        "qaSet": file.display().to_string(),
        "generator": l.model.name,
        "adapters": l.adapters,
        "device": l.device,
        "k": args.k,
        "modes": json,
    });
    let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    if let Some(p) = out {
        std::fs::write(p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("[results written to {}]", p.display());
    }
    if args.json {
        println!("{text}");
    } else {
        println!();
        print_table(&rows);
    }
    Ok(())
}

fn read_log(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}: line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

pub fn run_log_feedback(
    path: &Path,
    id: &str,
    rating: &str,
    correction: Option<String>,
    note: Option<String>,
) -> Result<(), String> {
    let rating: lorag::pipeline::Rating =
        rating.parse().map_err(|e: lorag::Error| e.to_string())?;
    let mut records = read_log(path)?;
    let rec = records
        .iter_mut()
        .find(|r| r["id"] == id)
        .ok_or_else(|| format!("{}: no record with id {id}", path.display()))?;
    rec["feedback"] = serde_json::to_value(lorag::pipeline::Feedback {
        rating,
        correction,
        note,
    })
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    // Temp file + rename: an interrupted update leaves the previous log intact.
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("{id}: {rating:?}");
    Ok(())
}

pub fn run_log_export(
    path: &Path,
    out: Option<&Path>,
    all: bool,
    question_only: bool,
) -> Result<(), String> {
    let mut lines = String::new();
    let (mut n, mut skipped) = (0, 0);
    for (i, v) in read_log(path)?.into_iter().enumerate() {
        let rec: LogRecord = serde_json::from_value(v)
            .map_err(|e| format!("{}: record {}: {e}", path.display(), i + 1))?;
        let rating = rec.feedback.as_ref().map(|f| f.rating);
        let keep = match rating {
            Some(lorag::pipeline::Rating::Good) => true,
            Some(lorag::pipeline::Rating::Bad) => false,
            None => all,
        };
        if !keep {
            skipped += 1;
            continue;
        }
        lines.push_str(
            &serde_json::to_string(&rec.chat_example(question_only)).map_err(|e| e.to_string())?,
        );
        lines.push('\n');
        n += 1;
    }
    match out {
        Some(p) => {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, &lines).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, p).map_err(|e| format!("{}: {e}", p.display()))?;
            eprintln!(
                "{n} examples written to {} ({skipped} left out: rated bad{})",
                p.display(),
                if all {
                    ""
                } else {
                    " or unrated; --all keeps unrated"
                }
            );
        }
        None => print!("{lines}"),
    }
    Ok(())
}
