//! # lorag
//!
//! Client-side retrieval-augmented generation: ingest documents, chunk them, embed, index, retrieve and
//! answer with a small quantized model shaped by LoRA adapters, in WebAssembly or natively.
//!
//! This is the facade: the public API is what is re-exported here. The pipeline so far:
//!
//! - [`ingest`]: bytes of a text, Markdown, HTML or PDF file → [`Document`] (text, [`Block`]s with
//!   heading paths, spans and pages, metadata).
//! - [`Chunker`]: [`Document`] → [`Chunk`]s sized in tokens of the embedder's tokenizer
//!   ([`TokenCounter`]) or in characters, with overlap, spans and content hashes.
//! - [`Embedder`]: texts → unit vectors (a sentence-transformers ONNX model run by tract).
//! - [`KnowledgeBase`]: chunks + vectors → an updatable hybrid index (HNSW segments + exact tail + BM25),
//!   searched with filters, fusion and MMR, saved as one validated knowledge pack.
//! - [`llm`]: a quantized GGUF language model (llama family, Qwen2) with its tokenizer and chat template, run on
//!   the CPU or a GPU; greedy or sampled generation, streamed; LoRA adapters.
//! - [`prompt`]: retrieved chunks → numbered sources in the chat template, fitted to a token budget;
//!   citations in the answer mapped back to them.
//! - [`pipeline`]: the whole path, `Rag::ask`: query → hybrid search → prompt → generator (with adapters) →
//!   answer with sources and checked citations, in four modes (base, rag, finetuned, hybrid); interaction log
//!   records that export as chat-format fine-tuning data.
//!
//! Untrusted input never panics: every failure is an [`Error`], and sizes are checked against
//! [`Limits`] before work starts.

pub mod chunk;
#[cfg(any(feature = "embed", feature = "llm"))]
mod clock;
#[cfg(feature = "embed")]
pub mod embed;
mod error;
pub mod eval;
#[cfg(feature = "index")]
pub mod index;
pub mod ingest;
pub mod kernels;
mod limits;
#[cfg(feature = "llm")]
pub mod llm;
#[cfg(all(feature = "embed", feature = "index", feature = "llm"))]
pub mod pipeline;
pub mod prompt;
#[cfg(feature = "tokenizer")]
mod wordpiece;

#[cfg(target_arch = "wasm32")]
pub mod wasm;

#[cfg(feature = "tokenizer")]
pub use chunk::TokenCounter;
pub use chunk::{Chunk, ChunkConfig, Chunker, Unit};
#[cfg(feature = "embed")]
pub use embed::{Embedder, EmbedderConfig, EmbedderFiles, Embedding, Engine, Pooling, TextKind};
pub use error::{Error, Format, Result};
#[cfg(feature = "index")]
pub use index::{
    DocInfo, EmbedderId, Filter, Fusion, Hit, IndexConfig, KnowledgeBase, SearchMode, SearchOptions,
};
pub use ingest::{detect_format, ingest, Block, BlockKind, Document, IngestOptions, Warning};
pub use limits::Limits;
#[cfg(all(feature = "embed", feature = "index", feature = "llm"))]
pub use pipeline::{Answer, AskOptions, LogRecord, Mode, Rag};

/// The crate version, for the CLI and the JS side.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
