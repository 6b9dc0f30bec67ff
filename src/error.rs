//! The one error type of the crate. Variants are nouns naming what was wrong with the input.

use std::fmt;

/// Input formats, named in errors and on [`crate::Document`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Plain UTF-8 text.
    Text,
    /// CommonMark / GitHub-flavoured Markdown.
    Markdown,
    /// HTML5.
    Html,
    /// PDF (text layer).
    Pdf,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
        })
    }
}

/// Everything that can go wrong in lorag. Untrusted input never panics: it ends up here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A size or count is over a configured cap (see [`crate::Limits`]); checked before the work starts.
    #[error("{what} is {size} but the limit is {limit}")]
    ResourceLimit {
        /// What was measured ("document bytes", "pdf pages", …).
        what: &'static str,
        /// The measured size.
        size: u64,
        /// The configured cap.
        limit: u64,
    },
    /// The document has no bytes at all.
    #[error("the document is empty")]
    EmptyDocument,
    /// Text that must be UTF-8 is not.
    #[error(
        "invalid UTF-8 at byte offset {offset} (ask for lossy decoding to replace it with U+FFFD)"
    )]
    InvalidUtf8 {
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// The bytes do not parse as the stated format.
    #[error("malformed {format}: {detail}")]
    Malformed {
        /// The format being parsed.
        format: Format,
        /// What the parser said.
        detail: String,
    },
    /// The PDF is encrypted with a password we do not have.
    #[error("the PDF is encrypted and cannot be opened without its password")]
    Encrypted,
    /// The format could not be told from the name or the bytes.
    #[error("cannot tell the document format from {0:?}; name it explicitly")]
    UnknownFormat(String),
    /// A feature that was not compiled in.
    #[error("{0} support is not compiled into this build (cargo feature `{1}`)")]
    FeatureDisabled(&'static str, &'static str),
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model file (ONNX, GGUF, tokenizer or config) is malformed or does not fit the rest of the model.
    #[error("{file}: {detail}")]
    Model {
        /// Which file (`model.onnx`, `config.json`, …).
        file: &'static str,
        /// What is wrong, naming the tensor, input or field.
        detail: String,
    },
    /// A `Document` handed in from outside (JS, a hand-built value) breaks its invariants.
    #[error("invalid document: {0}")]
    InvalidDocument(String),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A knowledge pack (index snapshot) is malformed: bad magic, inconsistent counts, ids out of range…
    #[error("knowledge pack: {0}")]
    Snapshot(String),
    /// A knowledge pack ends before a structure it declares.
    #[error(
        "knowledge pack truncated: {what} needs {needed} bytes but only {available} are there"
    )]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes it needs (from its declared offset).
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A checksum in a knowledge pack does not match its bytes.
    #[error("knowledge pack: checksum mismatch in the {section} section (the file is corrupt)")]
    Checksum {
        /// The section whose bytes changed.
        section: &'static str,
    },
    /// A knowledge pack written by a format version this build cannot read.
    #[error("knowledge pack format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A knowledge pack built with another embedding model than the one in use.
    #[error(
        "the knowledge pack was built with embedder {pack}, but the loaded embedder is {model}"
    )]
    EmbedderMismatch {
        /// The pack's embedder (name, dimension, hash).
        pack: String,
        /// The embedder in use.
        model: String,
    },
    /// A vector handed to the index is unusable (wrong dimension, NaN, infinite, zero norm).
    #[error("invalid vector: {0}")]
    InvalidVector(String),
    /// A search request is inconsistent (k = 0, no query vector for a vector search, …).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// An id that must be unique is already taken.
    #[error("duplicate id: {0}")]
    DuplicateId(String),
    /// No document or chunk has this id.
    #[error("not found: {0}")]
    NotFound(String),
    /// The prompt (or prompt + answer) does not fit the context.
    #[error("{tokens} tokens do not fit in a context of {context}")]
    ContextOverflow {
        /// Tokens that would be needed.
        tokens: usize,
        /// The context size.
        context: usize,
    },
    /// A chat template failed to compile or render (syntax, a raised exception, a fuel or size limit).
    #[error("chat template: {0}")]
    Template(String),
    /// The GPU could not be used: no WebGPU, no adapter, a device that could not be created or was lost, a
    /// kernel that failed to compile, a tensor over the device's limits.
    #[error("GPU: {0}")]
    Device(String),
    /// A LoRA adapter is malformed or does not fit the loaded base model.
    #[error("LoRA adapter: {tensor}: {detail}")]
    Adapter {
        /// The tensor, file or config field at fault.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
}

impl Error {
    /// A stable name for the variant, for callers that branch on the kind of failure (the JS side gets it as
    /// `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::ResourceLimit { .. } => "ResourceLimit",
            Error::EmptyDocument => "EmptyDocument",
            Error::InvalidUtf8 { .. } => "InvalidUtf8",
            Error::Malformed { .. } => "Malformed",
            Error::Encrypted => "Encrypted",
            Error::UnknownFormat(_) => "UnknownFormat",
            Error::FeatureDisabled(..) => "FeatureDisabled",
            Error::Tokenizer(_) => "Tokenizer",
            Error::Model { .. } => "Model",
            Error::InvalidDocument(_) => "InvalidDocument",
            Error::Config(_) => "Config",
            Error::Snapshot(_) => "Snapshot",
            Error::Truncated { .. } => "Truncated",
            Error::Checksum { .. } => "Checksum",
            Error::UnsupportedVersion { .. } => "UnsupportedVersion",
            Error::EmbedderMismatch { .. } => "EmbedderMismatch",
            Error::InvalidVector(_) => "InvalidVector",
            Error::InvalidQuery(_) => "InvalidQuery",
            Error::DuplicateId(_) => "DuplicateId",
            Error::NotFound(_) => "NotFound",
            Error::ContextOverflow { .. } => "ContextOverflow",
            Error::Template(_) => "Template",
            Error::Adapter { .. } => "Adapter",
            Error::Device(_) => "Device",
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
