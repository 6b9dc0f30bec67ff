//! The pipeline: a question → (embed the query → hybrid search → prompt with numbered sources) → the
//! generator with the chosen adapters → a streamed answer with its sources and checked citations.
//!
//! Four modes answer the "RAG or fine-tuning?" question with the user's own data:
//! `base` (neither), `rag` (retrieval, base model), `finetuned` (adapters, no retrieval), `hybrid` (both).
//!
//! Every answer can be turned into a [`LogRecord`] (question, retrieved ids and scores, prompt size, answer,
//! citations, mode, adapters, latency, later feedback) and a logged answer into a chat-format fine-tuning
//! example ([`LogRecord::chat_example`]), so good answers become LoRA training data.

use serde::{Deserialize, Serialize};

use crate::llm::{AdapterUse, GenerateOptions, Generation, Message, Model, StopReason, TokenEvent};
use crate::prompt::{build_prompt, cite, Citation, Prompt, PromptConfig, Source};
use crate::{Embedder, Error, KnowledgeBase, Result, SearchOptions, TextKind};

/// What answers a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The base model alone.
    Base,
    /// Retrieved sources, base model.
    #[default]
    Rag,
    /// The adapters alone, no retrieval.
    Finetuned,
    /// Retrieved sources and the adapters.
    Hybrid,
}

impl Mode {
    /// All four, in the order comparisons print them.
    pub const ALL: [Mode; 4] = [Mode::Base, Mode::Rag, Mode::Finetuned, Mode::Hybrid];

    /// Whether this mode retrieves sources.
    pub fn retrieves(self) -> bool {
        matches!(self, Mode::Rag | Mode::Hybrid)
    }

    /// Whether this mode applies adapters.
    pub fn adapted(self) -> bool {
        matches!(self, Mode::Finetuned | Mode::Hybrid)
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Base => "base",
            Mode::Rag => "rag",
            Mode::Finetuned => "finetuned",
            Mode::Hybrid => "hybrid",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown mode {s:?} (base, rag, finetuned or hybrid)"
                ))
            })
    }
}

/// One question's settings (from JS: camelCase fields, all optional; `search` keeps [`SearchOptions`]' names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AskOptions {
    /// What answers.
    pub mode: Mode,
    /// Retrieval: k, search mode, filters, fusion, MMR (used by `rag` and `hybrid`).
    pub search: SearchOptions,
    /// Adapters for `finetuned` and `hybrid` (by the name they were loaded under).
    pub adapters: Vec<AdapterUse>,
    /// Generation (`max_tokens` also sets the prompt's answer reservation; `adapters` here is ignored).
    pub generate: GenerateOptions,
    /// The prompt's texts and budget.
    pub prompt: PromptConfig,
    /// Earlier turns of the conversation, oldest first (user / assistant).
    pub history: Vec<Message>,
    /// How many earlier user turns are prepended to the retrieval query (follow-ups such as "and on
    /// Saturdays?" need them).
    pub query_turns: usize,
}

impl Default for AskOptions {
    fn default() -> Self {
        AskOptions {
            mode: Mode::Rag,
            search: SearchOptions {
                k: 4,
                ..Default::default()
            },
            adapters: Vec::new(),
            generate: GenerateOptions {
                max_tokens: 128,
                // Greedy, no repetition penalty: the answer should repeat the sources' words (on the bundled
                // QA set a penalty of 1.15 took SmolLM2-135M's token F1 from 18.5 % to 3.7 %).
                sampler: crate::llm::SamplerConfig::greedy(),
                ..Default::default()
            },
            prompt: PromptConfig::default(),
            history: Vec::new(),
            query_turns: 1,
        }
    }
}

/// Milliseconds spent per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Query embedding + search.
    pub retrieval_ms: f64,
    /// Prompt building (rendering and counting tokens).
    pub prompt_ms: f64,
    /// Prompt processing by the generator.
    pub prefill_ms: f64,
    /// Decoding.
    pub decode_ms: f64,
    /// Everything, question to last token.
    pub total_ms: f64,
}

/// A retrieved chunk and its score (given to the prompt or not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retrieved {
    /// The chunk.
    pub chunk_id: String,
    /// Its score.
    pub score: f32,
}

/// An answer with its evidence.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The question.
    pub question: String,
    /// What answered.
    pub mode: Mode,
    /// Adapters applied.
    pub adapters: Vec<AdapterUse>,
    /// The answer text.
    pub text: String,
    /// The query the retriever saw (the question, after earlier turns when `query_turns` > 0).
    pub retrieval_query: String,
    /// Everything retrieved, in rank order.
    pub retrieved: Vec<Retrieved>,
    /// The sources in the prompt, numbered from 1.
    pub sources: Vec<Source>,
    /// Retrieved chunks left out for lack of room.
    pub dropped: Vec<String>,
    /// Citations in the answer, in order; an invalid one names a number no source had.
    pub citations: Vec<Citation>,
    /// The messages the generator saw.
    pub messages: Vec<Message>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub answer_tokens: usize,
    /// The context the prompt was fitted to.
    pub context: usize,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Time per stage.
    pub timings: Timings,
}

impl Answer {
    /// Source numbers cited that were not given (hallucinated citations).
    pub fn invalid_citations(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .citations
            .iter()
            .filter(|c| !c.valid())
            .map(|c| c.number)
            .collect();
        v.dedup();
        v
    }

    /// The distinct sources cited, in order of first citation.
    pub fn cited_sources(&self) -> Vec<&Source> {
        let mut out: Vec<&Source> = Vec::new();
        for c in &self.citations {
            if let Some(s) = self.sources.iter().find(|s| s.number == c.number) {
                if !out.iter().any(|o| o.number == s.number) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// Generated tokens per second (decoding).
    pub fn decode_tok_s(&self) -> f64 {
        self.answer_tokens.saturating_sub(1) as f64 / (self.timings.decode_ms / 1e3)
    }

    /// This answer as a log record with `id`, made at `time_ms` (Unix milliseconds).
    pub fn log_record(&self, id: impl Into<String>, time_ms: f64) -> LogRecord {
        LogRecord {
            id: id.into(),
            time_ms,
            question: self.question.clone(),
            mode: self.mode,
            adapters: self.adapters.clone(),
            retrieval_query: self.retrieval_query.clone(),
            retrieved: self.retrieved.clone(),
            sources: self.sources.iter().map(|s| s.chunk_id.clone()).collect(),
            prompt_tokens: self.prompt_tokens,
            answer: self.text.clone(),
            answer_tokens: self.answer_tokens,
            citations: self.citations.iter().map(|c| c.number).collect(),
            invalid_citations: self.invalid_citations(),
            latency_ms: self.timings.total_ms,
            messages: self.messages.clone(),
            feedback: None,
        }
    }
}

/// A question prepared for the generator: retrieval done, prompt built.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The question.
    pub question: String,
    /// The options it was prepared with.
    pub opts: AskOptions,
    /// The retrieval query.
    pub retrieval_query: String,
    /// Everything retrieved.
    pub retrieved: Vec<Retrieved>,
    /// The prompt.
    pub prompt: Prompt,
    /// The generation options (adapters set from the mode).
    pub generate: GenerateOptions,
    /// Stage times so far.
    pub timings: Timings,
    start_ms: f64,
}

impl Prepared {
    /// The answer, once the generator has run on [`Prepared::prompt`] with [`Prepared::generate`].
    pub fn into_answer(self, g: Generation) -> Answer {
        let p = self;
        let text = g.text.trim().to_string();
        let citations = cite(&text, &p.prompt.sources);
        Answer {
            question: p.question,
            mode: p.opts.mode,
            adapters: p.generate.adapters.clone(),
            retrieval_query: p.retrieval_query,
            retrieved: p.retrieved,
            sources: p.prompt.sources,
            dropped: p.prompt.dropped,
            citations,
            messages: p.prompt.messages,
            prompt_tokens: p.prompt.ids.len(),
            answer_tokens: g.ids.len(),
            context: p.prompt.context,
            stop_reason: g.stop_reason,
            timings: Timings {
                prefill_ms: g.prefill_ms,
                decode_ms: g.decode_ms,
                total_ms: crate::llm::now_ms() - p.start_ms,
                ..p.timings
            },
            text,
        }
    }
}

/// The pipeline over borrowed parts: a generator, and for `rag` / `hybrid` an embedder and a knowledge base.
pub struct Rag<'a> {
    /// The generator (adapters already loaded into it).
    pub model: &'a Model,
    /// The query embedder (must be the knowledge base's).
    pub embedder: Option<&'a Embedder>,
    /// The knowledge base.
    pub kb: Option<&'a KnowledgeBase>,
}

impl<'a> Rag<'a> {
    /// A pipeline that retrieves from `kb` with `embedder`.
    pub fn new(model: &'a Model, embedder: &'a Embedder, kb: &'a KnowledgeBase) -> Rag<'a> {
        Rag {
            model,
            embedder: Some(embedder),
            kb: Some(kb),
        }
    }

    /// Retrieve and build the prompt; nothing generated yet.
    pub fn prepare(&self, question: &str, opts: &AskOptions) -> Result<Prepared> {
        let start_ms = crate::llm::now_ms();
        if question.trim().is_empty() {
            return Err(Error::InvalidQuery("the question is empty".into()));
        }
        match (opts.mode.adapted(), opts.adapters.is_empty()) {
            (true, true) => {
                return Err(Error::Config(format!(
                    "mode {} needs at least one adapter",
                    opts.mode
                )))
            }
            (false, false) => {
                return Err(Error::Config(format!(
                    "mode {} uses the base model; adapters are for finetuned or hybrid",
                    opts.mode
                )))
            }
            _ => {}
        }
        // Adapters are checked before any work.
        self.model.active_adapters(&opts.adapters)?;
        let recent: Vec<&str> = opts
            .history
            .iter()
            .rev()
            .filter(|m| m.role == "user")
            .take(opts.query_turns)
            .map(|m| m.content.as_str())
            .collect();
        let retrieval_query = recent
            .iter()
            .rev()
            .copied()
            .chain(std::iter::once(question))
            .collect::<Vec<_>>()
            .join("\n");
        let mut candidates = Vec::new();
        let mut retrieved = Vec::new();
        if opts.mode.retrieves() {
            let kb = self.kb.ok_or_else(|| {
                Error::Config(format!("mode {} needs a knowledge base", opts.mode))
            })?;
            let vector = if opts.search.mode == crate::SearchMode::Bm25 {
                None
            } else {
                let embedder = self.embedder.ok_or_else(|| {
                    Error::Config(format!("mode {} needs an embedder", opts.mode))
                })?;
                Some(
                    embedder
                        .embed(&[retrieval_query.as_str()], TextKind::Query)?
                        .remove(0)
                        .vector,
                )
            };
            let hits = kb.search(vector.as_deref(), Some(&retrieval_query), &opts.search)?;
            for h in &hits {
                let title = kb.document(&h.chunk.doc_id).and_then(|d| d.title.clone());
                candidates.push(Source::from_hit(h, title));
                retrieved.push(Retrieved {
                    chunk_id: h.chunk.id.clone(),
                    score: h.score,
                });
            }
        }
        let t1 = crate::llm::now_ms();
        let mut pcfg = opts.prompt.clone();
        pcfg.answer_tokens = opts.generate.max_tokens;
        let prompt = build_prompt(self.model, &pcfg, &opts.history, question, &candidates)?;
        let t2 = crate::llm::now_ms();
        let mut generate = opts.generate.clone();
        generate.adapters = if opts.mode.adapted() {
            opts.adapters.clone()
        } else {
            Vec::new()
        };
        if generate.context == 0 {
            generate.context = prompt.context;
        }
        Ok(Prepared {
            question: question.to_string(),
            opts: opts.clone(),
            retrieval_query,
            retrieved,
            prompt,
            generate,
            timings: Timings {
                retrieval_ms: t1 - start_ms,
                prompt_ms: t2 - t1,
                ..Default::default()
            },
            start_ms,
        })
    }

    /// The answer from a prepared question and its generation.
    pub fn finish(&self, p: Prepared, g: Generation) -> Answer {
        p.into_answer(g)
    }

    /// Answer `question` on the CPU; `on_token` sees the answer as it streams and returns `false` to stop.
    pub fn ask(
        &self,
        question: &str,
        opts: &AskOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Answer> {
        let p = self.prepare(question, opts)?;
        let g = self.model.generate(&p.prompt.ids, &p.generate, on_token)?;
        Ok(self.finish(p, g))
    }

    /// Answer `question` where the model runs (its GPU when one is attached, else the CPU).
    pub async fn ask_async(
        &self,
        question: &str,
        opts: &AskOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Answer> {
        let p = self.prepare(question, opts)?;
        let g = self
            .model
            .generate_async(&p.prompt.ids, &p.generate, on_token)
            .await?;
        Ok(self.finish(p, g))
    }
}

/// A user's judgement of a logged answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rating {
    /// Good: worth training on.
    Good,
    /// Bad.
    Bad,
}

impl std::str::FromStr for Rating {
    type Err = Error;
    fn from_str(s: &str) -> Result<Rating> {
        match s {
            "good" | "up" | "+" => Ok(Rating::Good),
            "bad" | "down" | "-" => Ok(Rating::Bad),
            _ => Err(Error::Config(format!("rating {s:?}: good or bad"))),
        }
    }
}

/// Feedback added to a logged answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    /// Good or bad.
    pub rating: Rating,
    /// A corrected answer to train on instead of the logged one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One logged interaction (one line of the JSONL interaction log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogRecord {
    /// Unique within the log.
    pub id: String,
    /// When, Unix milliseconds.
    pub time_ms: f64,
    /// The question.
    pub question: String,
    /// The mode.
    pub mode: Mode,
    /// Adapters applied.
    pub adapters: Vec<AdapterUse>,
    /// The retrieval query.
    pub retrieval_query: String,
    /// Retrieved chunk ids and scores, in rank order.
    pub retrieved: Vec<Retrieved>,
    /// Chunk ids given to the prompt, in source-number order.
    pub sources: Vec<String>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The answer.
    pub answer: String,
    /// Answer tokens.
    pub answer_tokens: usize,
    /// Source numbers cited, in order.
    pub citations: Vec<usize>,
    /// Cited numbers no source had.
    pub invalid_citations: Vec<usize>,
    /// Question to last token, milliseconds.
    pub latency_ms: f64,
    /// The messages the generator saw.
    pub messages: Vec<Message>,
    /// The user's judgement, added later.
    #[serde(default)]
    pub feedback: Option<Feedback>,
}

impl LogRecord {
    /// A chat-format fine-tuning example, `{"messages": [...]}`: the messages the generator saw (with the
    /// sources, to train the `hybrid` behaviour) or, with `question_only`, the system turn without sources,
    /// the earlier turns and the bare question (to train `finetuned`); then the answer (or the feedback's
    /// correction) as the assistant turn.
    pub fn chat_example(&self, question_only: bool) -> serde_json::Value {
        let mut messages = if question_only {
            let cfg = PromptConfig::default();
            let mut m: Vec<Message> = self
                .messages
                .iter()
                .take(self.messages.len().saturating_sub(1))
                .cloned()
                .collect();
            if let Some(first) = m.first_mut().filter(|m| m.role == "system") {
                first.content = cfg.system_no_sources;
            }
            m.push(Message {
                role: "user".into(),
                content: self.question.clone(),
            });
            m
        } else {
            self.messages.clone()
        };
        let answer = self
            .feedback
            .as_ref()
            .and_then(|f| f.correction.clone())
            .unwrap_or_else(|| self.answer.clone());
        messages.push(Message {
            role: "assistant".into(),
            content: answer,
        });
        serde_json::json!({ "messages": messages })
    }
}
