//! The `#[wasm_bindgen]` surface: thin wrappers that move bytes and plain objects across the boundary.
//! Nothing else in the crate touches JS types.
//!
//! Errors reach JS as `Error` objects with `name = "LoragError"` and `code` set to [`Error::code`].

use wasm_bindgen::prelude::*;

use crate::{ingest, ChunkConfig, Chunker, Document, Error, IngestOptions};

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

fn js_error(e: Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name("LoragError");
    let _ = js_sys::Reflect::set(&err, &"code".into(), &e.code().into());
    err.into()
}

fn from_js<T: serde::de::DeserializeOwned + Default>(v: JsValue) -> Result<T, JsValue> {
    if v.is_undefined() || v.is_null() {
        return Ok(T::default());
    }
    serde_wasm_bindgen::from_value(v).map_err(|e| js_error(Error::Config(e.to_string())))
}

fn to_js<T: serde::Serialize>(v: &T) -> Result<JsValue, JsValue> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| js_error(Error::Config(e.to_string())))
}

/// Panics, which traps the wasm instance as a bug would: for testing the JS layer's restart. Not part of the
/// API.
#[doc(hidden)]
#[wasm_bindgen(js_name = __loragTrap)]
pub fn lorag_trap() {
    panic!("deliberate trap (testing the restart after a trap)");
}

/// Bytes of wasm linear memory in use by this instance (it only grows).
#[wasm_bindgen(js_name = wasmMemoryBytes)]
pub fn wasm_memory_bytes() -> f64 {
    (core::arch::wasm32::memory_size(0) * 65536) as f64
}

/// The crate version.
#[wasm_bindgen]
pub fn version() -> String {
    crate::VERSION.to_string()
}

/// Ingest one document: `id` (a file name picks the format by extension), the bytes, and options
/// (`{ format, lossy_utf8, limits: { max_doc_bytes, … } }`). Returns the `Document` as a plain object.
#[wasm_bindgen(js_name = ingest)]
pub fn ingest_js(id: &str, bytes: &[u8], options: JsValue) -> Result<JsValue, JsValue> {
    let opts: IngestOptions = from_js(options)?;
    to_js(&ingest(id, bytes, &opts).map_err(js_error)?)
}

/// A chunker: built once (with the embedder's `tokenizer.json` bytes, or none to count characters),
/// then used for every document.
#[wasm_bindgen(js_name = Chunker)]
pub struct JsChunker {
    inner: Chunker,
}

#[wasm_bindgen(js_class = Chunker)]
impl JsChunker {
    /// `new Chunker(tokenizerJson?: Uint8Array, sentenceBertConfig?: Uint8Array, config?: { size, overlap, prefix_headings })`
    #[wasm_bindgen(constructor)]
    pub fn new(
        tokenizer_json: Option<Vec<u8>>,
        sentence_bert_config: Option<Vec<u8>>,
        config: JsValue,
    ) -> Result<JsChunker, JsValue> {
        let config: ChunkConfig = from_js(config)?;
        let inner = match tokenizer_json {
            #[cfg(feature = "tokenizer")]
            Some(json) => {
                let counter =
                    crate::TokenCounter::from_bytes(&json, sentence_bert_config.as_deref())
                        .map_err(js_error)?;
                Chunker::new(counter, config)
            }
            #[cfg(not(feature = "tokenizer"))]
            Some(_) => {
                let _ = sentence_bert_config;
                Err(Error::FeatureDisabled("tokenizer.json", "tokenizer"))
            }
            None => Chunker::chars(config),
        }
        .map_err(js_error)?;
        Ok(JsChunker { inner })
    }

    /// Chunk size, in the chunker's unit.
    #[wasm_bindgen(getter)]
    pub fn size(&self) -> usize {
        self.inner.size()
    }

    /// Overlap bound, in the chunker's unit.
    #[wasm_bindgen(getter)]
    pub fn overlap(&self) -> usize {
        self.inner.overlap()
    }

    /// `"tokens"` or `"chars"`.
    #[wasm_bindgen(getter)]
    pub fn unit(&self) -> String {
        match self.inner.unit() {
            crate::Unit::Tokens => "tokens".into(),
            crate::Unit::Chars => "chars".into(),
        }
    }

    /// Chunk a `Document` object (as returned by `ingest`).
    pub fn chunk(&self, document: JsValue) -> Result<JsValue, JsValue> {
        let doc: Document = serde_wasm_bindgen::from_value(document)
            .map_err(|e| js_error(Error::Config(e.to_string())))?;
        to_js(&self.inner.chunk(&doc).map_err(js_error)?)
    }

    /// Ingest and chunk in one call, without passing the document through JS.
    #[wasm_bindgen(js_name = chunkBytes)]
    pub fn chunk_bytes(
        &self,
        id: &str,
        bytes: &[u8],
        options: JsValue,
    ) -> Result<JsValue, JsValue> {
        let opts: IngestOptions = from_js(options)?;
        let doc = ingest(id, bytes, &opts).map_err(js_error)?;
        to_js(&self.inner.chunk(&doc).map_err(js_error)?)
    }
}

/// A sentence embedder built from model files passed in as bytes (fetched, cached and read by the JS side).
#[cfg(feature = "embed")]
#[wasm_bindgen(js_name = Embedder)]
pub struct JsEmbedder {
    inner: crate::Embedder,
}

#[cfg(feature = "embed")]
#[wasm_bindgen(js_class = Embedder)]
impl JsEmbedder {
    /// `new Embedder({ model_onnx, tokenizer_json, config_json?, pooling_config_json?, sentence_bert_config_json?,
    /// modules_json? }, config?: { normalize, query_prefix, passage_prefix, batch_size, max_seq_length })`.
    /// Each file is a `Uint8Array`.
    #[wasm_bindgen(constructor)]
    pub fn new(files: JsValue, config: JsValue) -> Result<JsEmbedder, JsValue> {
        let get = |name: &str| -> Result<Option<Vec<u8>>, JsValue> {
            let v = js_sys::Reflect::get(&files, &name.into()).unwrap_or(JsValue::UNDEFINED);
            if v.is_undefined() || v.is_null() {
                return Ok(None);
            }
            if !v.is_instance_of::<js_sys::Uint8Array>() {
                return Err(js_error(Error::Config(format!(
                    "files.{name} must be a Uint8Array"
                ))));
            }
            Ok(Some(js_sys::Uint8Array::new(&v).to_vec()))
        };
        let required = |name: &str| {
            get(name)?.ok_or_else(|| js_error(Error::Config(format!("files.{name} is required"))))
        };
        let (onnx, tok) = (required("model_onnx")?, required("tokenizer_json")?);
        let (cfg, pooling, sbert, modules) = (
            get("config_json")?,
            get("pooling_config_json")?,
            get("sentence_bert_config_json")?,
            get("modules_json")?,
        );
        let files = crate::EmbedderFiles {
            model_onnx: &onnx,
            tokenizer_json: &tok,
            config_json: cfg.as_deref(),
            pooling_config_json: pooling.as_deref(),
            sentence_bert_config_json: sbert.as_deref(),
            modules_json: modules.as_deref(),
        };
        let config: crate::EmbedderConfig = from_js(config)?;
        let inner = crate::Embedder::from_bytes(files, config, &crate::Limits::default())
            .map_err(js_error)?;
        Ok(JsEmbedder { inner })
    }

    /// Vector dimension.
    #[wasm_bindgen(getter)]
    pub fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Hex SHA-256 prefix of model.onnx.
    #[wasm_bindgen(getter)]
    pub fn identity(&self) -> String {
        self.inner.identity().to_string()
    }

    /// What runs the graph: `"native"` (lorag's BERT encoder) or `"tract"`.
    #[wasm_bindgen(getter)]
    pub fn engine(&self) -> String {
        match self.inner.engine() {
            crate::Engine::Native => "native".into(),
            crate::Engine::Tract => "tract".into(),
        }
    }

    /// Embed texts; returns one `Float32Array` per text, concatenated into one array of `texts.length * dim`.
    /// `kind` is `"query"` or `"passage"` (default).
    pub fn embed(
        &self,
        texts: Vec<String>,
        kind: Option<String>,
    ) -> Result<js_sys::Float32Array, JsValue> {
        let kind = match kind.as_deref() {
            Some("query") => crate::TextKind::Query,
            None | Some("passage") => crate::TextKind::Passage,
            Some(other) => {
                return Err(js_error(Error::Config(format!(
                    "kind must be \"query\" or \"passage\", not {other:?}"
                ))))
            }
        };
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let out = self.inner.embed(&refs, kind).map_err(js_error)?;
        let flat: Vec<f32> = out.into_iter().flat_map(|e| e.vector).collect();
        Ok(js_sys::Float32Array::from(flat.as_slice()))
    }

    /// Embed pre-tokenized inputs (special tokens included): `ids` holds all sequences back to back and
    /// `lengths` their lengths. For benchmarks against runtimes that take token ids.
    #[wasm_bindgen(js_name = embedIds)]
    pub fn embed_ids(
        &self,
        ids: Vec<u32>,
        lengths: Vec<u32>,
    ) -> Result<js_sys::Float32Array, JsValue> {
        let total: u64 = lengths.iter().map(|&l| l as u64).sum();
        if total != ids.len() as u64 {
            return Err(js_error(Error::Config(format!(
                "lengths add up to {total} but {} ids were given",
                ids.len()
            ))));
        }
        let mut seqs = Vec::with_capacity(lengths.len());
        let mut at = 0usize;
        for &l in &lengths {
            seqs.push(ids[at..at + l as usize].to_vec());
            at += l as usize;
        }
        let out = self.inner.embed_ids(&seqs).map_err(js_error)?;
        let flat: Vec<f32> = out.into_iter().flatten().collect();
        Ok(js_sys::Float32Array::from(flat.as_slice()))
    }

    /// Per-operator milliseconds of one forward pass over the given batch (same arguments as `embedIds`):
    /// `[[op, ms, nodes], …]`, most expensive first. For profiles.
    #[wasm_bindgen(js_name = profileIds)]
    pub fn profile_ids(&self, ids: Vec<u32>, lengths: Vec<u32>) -> Result<JsValue, JsValue> {
        let mut seqs = Vec::with_capacity(lengths.len());
        let mut at = 0usize;
        for &l in &lengths {
            let end = at.checked_add(l as usize).filter(|&e| e <= ids.len());
            let end =
                end.ok_or_else(|| js_error(Error::Config("lengths exceed the ids given".into())))?;
            seqs.push(ids[at..end].to_vec());
            at = end;
        }
        to_js(&self.inner.profile_ids(&seqs).map_err(js_error)?)
    }

    /// Token ids the model reads for `text` (special tokens included, truncated).
    #[wasm_bindgen(js_name = tokenIds)]
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        Ok(self
            .inner
            .token_ids(text, crate::TextKind::Passage)
            .map_err(js_error)?
            .0)
    }
}

/// A knowledge base (HNSW + BM25 over chunks), built from chunks and their vectors, saved and loaded as
/// knowledge-pack bytes (`toBytes` / `KnowledgeBase.fromBytes`; where the bytes go — OPFS, IndexedDB, a
/// file — is the caller's choice).
#[cfg(feature = "index")]
#[wasm_bindgen(js_name = KnowledgeBase)]
pub struct JsKnowledgeBase {
    inner: crate::KnowledgeBase,
}

#[cfg(feature = "index")]
fn vectors_from(flat: &[f32], n: usize, dim: usize) -> Result<Vec<Vec<f32>>, JsValue> {
    if Some(flat.len()) != n.checked_mul(dim) {
        return Err(js_error(Error::InvalidVector(format!(
            "{} floats for {n} chunks of dimension {dim}",
            flat.len()
        ))));
    }
    Ok(flat.chunks(dim.max(1)).map(<[f32]>::to_vec).collect())
}

#[cfg(feature = "index")]
#[wasm_bindgen(js_class = KnowledgeBase)]
impl JsKnowledgeBase {
    /// `new KnowledgeBase({ name, dim, hash }, config?)`: `hash` is the embedder's `identity`.
    #[wasm_bindgen(constructor)]
    pub fn new(embedder: JsValue, config: JsValue) -> Result<JsKnowledgeBase, JsValue> {
        let id: crate::EmbedderId = serde_wasm_bindgen::from_value(embedder)
            .map_err(|e| js_error(Error::Config(format!("embedder: {e}"))))?;
        let config: crate::IndexConfig = from_js(config)?;
        Ok(JsKnowledgeBase {
            inner: crate::KnowledgeBase::new(id, config).map_err(js_error)?,
        })
    }

    /// Load and validate a knowledge pack; with `expect` (`{ name, dim, hash }`) it must come from that
    /// embedder.
    #[wasm_bindgen(js_name = fromBytes)]
    pub fn from_bytes(bytes: &[u8], expect: JsValue) -> Result<JsKnowledgeBase, JsValue> {
        let expect: Option<crate::EmbedderId> = if expect.is_undefined() || expect.is_null() {
            None
        } else {
            Some(
                serde_wasm_bindgen::from_value(expect)
                    .map_err(|e| js_error(Error::Config(format!("expect: {e}"))))?,
            )
        };
        Ok(JsKnowledgeBase {
            inner: crate::KnowledgeBase::from_bytes(bytes, expect.as_ref()).map_err(js_error)?,
        })
    }

    /// The knowledge pack bytes.
    #[wasm_bindgen(js_name = toBytes)]
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }

    /// Live chunks.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> usize {
        self.inner.len()
    }

    /// The embedder identity `{ name, dim, hash }`.
    #[wasm_bindgen(getter)]
    pub fn embedder(&self) -> Result<JsValue, JsValue> {
        to_js(self.inner.embedder())
    }

    /// Add a new document: `doc` (`{ id, title, metadata }`, or a whole ingested `Document`), its chunks
    /// (from `Chunker.chunk`) and their vectors back to back in one `Float32Array`.
    #[wasm_bindgen(js_name = addDocument)]
    pub fn add_document(
        &mut self,
        doc: JsValue,
        chunks: JsValue,
        vectors: &[f32],
    ) -> Result<(), JsValue> {
        let info: crate::DocInfo = doc_info(doc)?;
        let chunks: Vec<crate::Chunk> = serde_wasm_bindgen::from_value(chunks)
            .map_err(|e| js_error(Error::InvalidDocument(format!("chunks: {e}"))))?;
        let vectors = vectors_from(vectors, chunks.len(), self.inner.dim())?;
        self.inner
            .add_document(info, chunks, vectors)
            .map_err(js_error)
    }

    /// Add or replace a document; `embed(texts: string[]) → Float32Array` is called once with the texts of
    /// the chunks that are new or changed (unchanged chunks keep their vectors). Returns
    /// `{ kept, embedded, removed }`.
    #[wasm_bindgen(js_name = upsertDocument)]
    pub fn upsert_document(
        &mut self,
        doc: JsValue,
        chunks: JsValue,
        embed: &js_sys::Function,
    ) -> Result<JsValue, JsValue> {
        let info: crate::DocInfo = doc_info(doc)?;
        let chunks: Vec<crate::Chunk> = serde_wasm_bindgen::from_value(chunks)
            .map_err(|e| js_error(Error::InvalidDocument(format!("chunks: {e}"))))?;
        let dim = self.inner.dim();
        let stats = self
            .inner
            .upsert_document(info, chunks, &mut |fresh| {
                let texts = js_sys::Array::new();
                for c in fresh {
                    texts.push(&JsValue::from_str(&c.embed_text()));
                }
                let out = embed.call1(&JsValue::NULL, &texts).map_err(|e| {
                    Error::Config(format!(
                        "the embed callback threw: {}",
                        e.as_string()
                            .or_else(|| js_sys::Error::from(e).message().as_string())
                            .unwrap_or_default()
                    ))
                })?;
                if !out.is_instance_of::<js_sys::Float32Array>() {
                    return Err(Error::InvalidVector(
                        "the embed callback must return a Float32Array".into(),
                    ));
                }
                let flat = js_sys::Float32Array::new(&out).to_vec();
                if Some(flat.len()) != fresh.len().checked_mul(dim) {
                    return Err(Error::InvalidVector(format!(
                        "the embed callback returned {} floats for {} chunks of dimension {dim}",
                        flat.len(),
                        fresh.len()
                    )));
                }
                Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
            })
            .map_err(js_error)?;
        to_js(&stats)
    }

    /// Delete a document; returns how many chunks went.
    #[wasm_bindgen(js_name = deleteDocument)]
    pub fn delete_document(&mut self, id: &str) -> Result<usize, JsValue> {
        self.inner.delete_document(id).map_err(js_error)
    }

    /// Delete one chunk.
    #[wasm_bindgen(js_name = deleteChunk)]
    pub fn delete_chunk(&mut self, id: &str) -> Result<(), JsValue> {
        self.inner.delete_chunk(id).map_err(js_error)
    }

    /// Drop deleted chunks and rebuild one HNSW segment and BM25.
    pub fn compact(&mut self) {
        self.inner.compact()
    }

    /// Search: `vector` (the query's embedding; not needed for `mode: "bm25"`), `text` (needed for bm25
    /// and hybrid) and options `{ k, mode, ef, min_score, filter, fusion, candidates, mmr_lambda }`.
    /// Returns `[{ chunk, score, vector_score, keyword_score }]`, best first.
    pub fn search(
        &self,
        vector: Option<Vec<f32>>,
        text: Option<String>,
        options: JsValue,
    ) -> Result<JsValue, JsValue> {
        let opts: crate::SearchOptions = from_js(options)?;
        let hits = self
            .inner
            .search(vector.as_deref(), text.as_deref(), &opts)
            .map_err(js_error)?;
        to_js(&hits)
    }

    /// Search, then the prompt for a model that is not loaded here (`{ messages, sources, sourceChars,
    /// dropped }`): what an edge worker without a generator returns from `/ask`. `options` as for `search`,
    /// `prompt` a `PromptConfig` (camelCase fields; missing ones default), `max_source_chars` caps the
    /// sources' text (0: no cap).
    #[wasm_bindgen(js_name = plainPrompt)]
    pub fn plain_prompt(
        &self,
        vector: Option<Vec<f32>>,
        question: &str,
        options: JsValue,
        prompt: JsValue,
        max_source_chars: usize,
    ) -> Result<JsValue, JsValue> {
        let opts: crate::SearchOptions = from_js(options)?;
        let cfg: crate::prompt::PromptConfig = from_js(prompt)?;
        let hits = self
            .inner
            .search(vector.as_deref(), Some(question), &opts)
            .map_err(js_error)?;
        let candidates: Vec<crate::prompt::Source> = hits
            .iter()
            .map(|h| {
                let title = self
                    .inner
                    .document(&h.chunk.doc_id)
                    .and_then(|d| d.title.clone());
                crate::prompt::Source::from_hit(h, title)
            })
            .collect();
        to_js(&crate::prompt::plain_prompt(
            &cfg,
            question,
            &candidates,
            max_source_chars,
        ))
    }

    /// Like `search`, returning only the chunk ids (for benchmarks and callers that keep their own text).
    #[wasm_bindgen(js_name = searchIds)]
    pub fn search_ids(
        &self,
        vector: Option<Vec<f32>>,
        text: Option<String>,
        options: JsValue,
    ) -> Result<Vec<String>, JsValue> {
        let opts: crate::SearchOptions = from_js(options)?;
        let hits = self
            .inner
            .search(vector.as_deref(), text.as_deref(), &opts)
            .map_err(js_error)?;
        Ok(hits.into_iter().map(|h| h.chunk.id.clone()).collect())
    }

    /// A chunk by id, or `undefined`.
    pub fn chunk(&self, id: &str) -> Result<JsValue, JsValue> {
        match self.inner.chunk(id) {
            Some(c) => to_js(c),
            None => Ok(JsValue::UNDEFINED),
        }
    }

    /// The documents: `[{ id, title, metadata }]`.
    pub fn documents(&self) -> Result<JsValue, JsValue> {
        to_js(&self.inner.documents().collect::<Vec<_>>())
    }

    /// Bytes held by vectors, graph, text and postings.
    pub fn memory(&self) -> Result<JsValue, JsValue> {
        to_js(&self.inner.memory())
    }
}

/// `{ id, title, metadata }` or a whole `Document` (its format joins the metadata).
#[cfg(feature = "index")]
fn doc_info(doc: JsValue) -> Result<crate::DocInfo, JsValue> {
    if let Ok(d) = serde_wasm_bindgen::from_value::<Document>(doc.clone()) {
        return Ok(crate::DocInfo::from(&d));
    }
    serde_wasm_bindgen::from_value(doc)
        .map_err(|e| js_error(Error::InvalidDocument(format!("document: {e}"))))
}

/// A GGUF language model (the generator).
#[cfg(feature = "llm")]
#[wasm_bindgen(js_name = Generator)]
pub struct JsGenerator {
    // Shared with the promises of `generateAsync` / `useDevice`; a call while one of those holds it mutably (or,
    // for changes, while a generation runs) is refused with a typed error instead of a panic.
    inner: std::rc::Rc<std::cell::RefCell<crate::llm::Model>>,
}

#[cfg(feature = "llm")]
fn busy() -> JsValue {
    js_error(Error::Config(
        "the generator is busy (a generateAsync or useDevice call has not finished)".into(),
    ))
}

/// The `onToken` callback as the generator's, remembering what it throws.
#[cfg(feature = "llm")]
fn token_callback<'a>(
    on_token: &'a Option<js_sys::Function>,
    thrown: &'a mut Option<JsValue>,
) -> impl FnMut(&crate::llm::TokenEvent) -> bool + 'a {
    move |ev| {
        let Some(f) = on_token else { return true };
        let o = js_sys::Object::new();
        let id = ev.id.map_or(JsValue::NULL, JsValue::from);
        let _ = js_sys::Reflect::set(&o, &"id".into(), &id);
        let _ = js_sys::Reflect::set(&o, &"text".into(), &ev.text.into());
        let _ = js_sys::Reflect::set(&o, &"index".into(), &(ev.index as u32).into());
        match f.call1(&JsValue::NULL, &o) {
            Ok(v) => v.as_bool() != Some(false),
            Err(e) => {
                *thrown = Some(e);
                false
            }
        }
    }
}

#[cfg(feature = "llm")]
#[wasm_bindgen(js_class = Generator)]
impl JsGenerator {
    /// Load a GGUF model. The bytes are copied once into wasm memory and the weights read from there in place
    /// (the caller's copy can be dropped).
    #[wasm_bindgen(constructor)]
    pub fn new(bytes: Vec<u8>) -> Result<JsGenerator, JsValue> {
        crate::llm::Model::from_bytes(bytes)
            .map(|m| JsGenerator {
                inner: std::rc::Rc::new(std::cell::RefCell::new(m)),
            })
            .map_err(js_error)
    }

    /// Configuration (architecture, layers, heads, vocabulary, …) and name.
    #[wasm_bindgen(getter)]
    pub fn info(&self) -> Result<JsValue, JsValue> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        to_js(&serde_json::json!({
            "name": m.name,
            "config": m.config(),
            "fileBytes": m.file_bytes(),
            "templateFromFile": m.template_from_file,
            "device": m.device(),
        }))
    }

    /// Token ids of `text` (BOS first when the model wants it); `parseSpecial` turns `<|im_start|>` written in
    /// the text into its control token.
    pub fn encode(&self, text: &str, parse_special: Option<bool>) -> Result<Vec<u32>, JsValue> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        m.encode(text, parse_special.unwrap_or(false))
            .map_err(js_error)
    }

    /// Text of token ids.
    pub fn decode(&self, ids: Vec<u32>) -> Result<String, JsValue> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        Ok(m.tokenizer.decode(&ids))
    }

    /// The chat template applied to `[{role, content}, …]` with the assistant turn opened, as token ids.
    #[wasm_bindgen(js_name = chatPrompt)]
    pub fn chat_prompt(&self, messages: JsValue) -> Result<Vec<u32>, JsValue> {
        let msgs: Vec<crate::llm::Message> = serde_wasm_bindgen::from_value(messages)
            .map_err(|e| js_error(Error::Config(format!("messages: {e}"))))?;
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        m.chat_prompt(&msgs).map_err(js_error)
    }

    /// Load a LoRA adapter and keep it resident under `name` (replacing one of that name): a GGUF-LoRA file's
    /// bytes with no `config`, or PEFT's `adapter_model.safetensors` bytes with the text of its
    /// `adapter_config.json`. It is checked against this model first; on any error nothing changes. Returns
    /// `{format, targets, layers, rank: [min, max], params, bytes}`.
    #[wasm_bindgen(js_name = loadAdapter)]
    pub fn load_adapter(
        &mut self,
        name: &str,
        bytes: &[u8],
        config: Option<String>,
    ) -> Result<JsValue, JsValue> {
        let mut m = self.inner.try_borrow_mut().map_err(|_| busy())?;
        let a = m
            .adapter_from_bytes(bytes, config.as_deref().map(str::as_bytes))
            .map_err(js_error)?;
        let info = m.add_adapter(name, a).map_err(js_error)?;
        to_js(&info)
    }

    /// Drop the adapter called `name`; `false` if there was none.
    #[wasm_bindgen(js_name = removeAdapter)]
    pub fn remove_adapter(&mut self, name: &str) -> Result<bool, JsValue> {
        let mut m = self.inner.try_borrow_mut().map_err(|_| busy())?;
        Ok(m.remove_adapter(name))
    }

    /// The resident adapters: `[{name, format, targets, layers, rank, params, bytes}]`.
    #[wasm_bindgen(getter)]
    pub fn adapters(&self) -> Result<JsValue, JsValue> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        let list: Vec<serde_json::Value> = m
            .adapters()
            .map(|(name, a)| {
                let mut v = serde_json::to_value(a.info()).unwrap_or_default();
                v["name"] = name.into();
                v
            })
            .collect();
        to_js(&list)
    }

    /// Generate from prompt ids. `options`: `{maxTokens, context, sampler: {greedy, temperature, topK, topP, minP,
    /// repeatPenalty, presencePenalty, frequencyPenalty, repeatLastN, seed}, stop, batch, topLogits, adapters:
    /// [{name, weight}]}` (adapters loaded with `loadAdapter`; weight defaults to 1).
    /// `onToken({id, text, index})` is called for each token; returning `false` stops generation.
    /// Returns `{promptIds, ids, text, stopReason, topLogits, prefillMs, decodeMs}`.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        options: JsValue,
        on_token: Option<js_sys::Function>,
    ) -> Result<JsValue, JsValue> {
        let opts: crate::llm::GenerateOptions = from_js(options)?;
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        let mut thrown = None;
        let out = m
            .generate(&prompt, &opts, &mut token_callback(&on_token, &mut thrown))
            .map_err(js_error)?;
        if let Some(e) = thrown {
            return Err(e);
        }
        to_js(&out)
    }

    /// `generate` on the device chosen with `useDevice` (the CPU until then), as a Promise: on WebGPU each step
    /// is one submission and the logits are read back asynchronously, so the page stays responsive.
    #[wasm_bindgen(js_name = generateAsync)]
    pub fn generate_async(
        &self,
        prompt: Vec<u32>,
        options: JsValue,
        on_token: Option<js_sys::Function>,
    ) -> Result<js_sys::Promise, JsValue> {
        let opts: crate::llm::GenerateOptions = from_js(options)?;
        let inner = self.inner.clone();
        // Held across the awaits on purpose: every other access uses try_borrow(_mut) and gets `busy`, never a
        // panic.
        #[allow(clippy::await_holding_refcell_ref)]
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let m = inner.try_borrow().map_err(|_| busy())?;
            let mut thrown = None;
            let out = m
                .generate_async(&prompt, &opts, &mut token_callback(&on_token, &mut thrown))
                .await
                .map_err(js_error)?;
            if let Some(e) = thrown {
                return Err(e);
            }
            to_js(&out)
        }))
    }

    /// Choose where the model runs: `"auto"` (a hardware WebGPU adapter when there is one, else the CPU, with the
    /// reason in `notice`), `"gpu"` (any WebGPU adapter, or an error) or `"cpu"`. Resolves to `{kind, name,
    /// backend, software, subgroups, notice}`. Where there is no `navigator.gpu` (Node, workers, older browsers)
    /// `auto` resolves to the CPU and `gpu` rejects with `code: "Device"`.
    #[wasm_bindgen(js_name = useDevice)]
    pub fn use_device(&self, device: Option<String>) -> js_sys::Promise {
        let inner = self.inner.clone();
        // Held across the await on purpose (see generateAsync).
        #[allow(clippy::await_holding_refcell_ref)]
        wasm_bindgen_futures::future_to_promise(async move {
            let pref: crate::kernels::DevicePref = device
                .as_deref()
                .unwrap_or("auto")
                .parse()
                .map_err(js_error)?;
            let mut m = inner.try_borrow_mut().map_err(|_| busy())?;
            let report = m.use_device(pref).await.map_err(js_error)?;
            to_js(&report)
        })
    }

    /// Answer `question` from the knowledge base (the pipeline: embed the query with `embedder`, hybrid search in
    /// `kb`, a cited prompt fitted to the context, generation on the CPU). `options`: `{mode: "base" | "rag" |
    /// "finetuned" | "hybrid", search: {k, mode, filter, fusion, mmr_lambda, …}, adapters: [{name, weight}],
    /// generate: {maxTokens, sampler, stop, …}, prompt: {system, sourceFormat, userFormat, context, …},
    /// history: [{role, content}], queryTurns}`. `onToken({id, text, index})` streams the answer (return `false`
    /// to stop). Returns `{question, mode, text, sources: [{number, chunkId, docId, title, headingPath, pages,
    /// span, score, text, trimmed}], citations: [{number, at, chunkId, docId, span, pages}] (chunkId null: a
    /// number that was not a source), dropped, retrieved, messages, promptTokens, answerTokens, timings, …}`.
    #[cfg(all(feature = "embed", feature = "index"))]
    pub fn ask(
        &self,
        embedder: &JsEmbedder,
        kb: &JsKnowledgeBase,
        question: &str,
        options: JsValue,
        on_token: Option<js_sys::Function>,
    ) -> Result<JsValue, JsValue> {
        let opts: crate::AskOptions = from_js(options)?;
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        let rag = crate::Rag::new(&m, &embedder.inner, &kb.inner);
        let mut thrown = None;
        let answer = rag
            .ask(question, &opts, &mut token_callback(&on_token, &mut thrown))
            .map_err(js_error)?;
        if let Some(e) = thrown {
            return Err(e);
        }
        to_js(&answer)
    }

    /// `ask` with generation on the device chosen with `useDevice`, as a Promise. Retrieval and the prompt are
    /// done before this returns (the embedder and knowledge base are free again at once); the Promise resolves
    /// to the answer.
    #[cfg(all(feature = "embed", feature = "index"))]
    #[wasm_bindgen(js_name = askAsync)]
    pub fn ask_async(
        &self,
        embedder: &JsEmbedder,
        kb: &JsKnowledgeBase,
        question: &str,
        options: JsValue,
        on_token: Option<js_sys::Function>,
    ) -> Result<js_sys::Promise, JsValue> {
        let opts: crate::AskOptions = from_js(options)?;
        let prepared = {
            let m = self.inner.try_borrow().map_err(|_| busy())?;
            crate::Rag::new(&m, &embedder.inner, &kb.inner)
                .prepare(question, &opts)
                .map_err(js_error)?
        };
        let inner = self.inner.clone();
        // Held across the awaits on purpose (see generateAsync).
        #[allow(clippy::await_holding_refcell_ref)]
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let m = inner.try_borrow().map_err(|_| busy())?;
            let mut thrown = None;
            let g = m
                .generate_async(
                    &prepared.prompt.ids,
                    &prepared.generate,
                    &mut token_callback(&on_token, &mut thrown),
                )
                .await
                .map_err(js_error)?;
            if let Some(e) = thrown {
                return Err(e);
            }
            to_js(&prepared.into_answer(g))
        }))
    }

    /// Where the model runs now: `{kind, name, backend, software, subgroups, notice, submissions, submitUs}`
    /// (on WebGPU, the submissions since it was chosen and the host's microseconds recording them).
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> Result<JsValue, JsValue> {
        let m = self.inner.try_borrow().map_err(|_| busy())?;
        to_js(&m.device())
    }
}

/// LoRA training on a [`JsGenerator`]'s model (src/llm/train.rs): the base stays frozen; the trainer holds the
/// adapter, the optimizer and the position in the data. One thread (wasm); run it in a Worker to keep a page
/// responsive.
#[cfg(feature = "llm")]
#[wasm_bindgen(js_name = Trainer)]
pub struct JsTrainer {
    model: std::rc::Rc<std::cell::RefCell<crate::llm::Model>>,
    t: std::rc::Rc<std::cell::RefCell<crate::llm::train::Trainer>>,
    running: std::rc::Rc<std::cell::Cell<bool>>,
}

#[cfg(feature = "llm")]
fn training_examples(data: &str) -> Result<Vec<crate::llm::train::Example>, JsValue> {
    crate::llm::train::parse_examples(data, crate::llm::train::MAX_EXAMPLES).map_err(js_error)
}

#[cfg(feature = "llm")]
#[wasm_bindgen(js_class = Trainer)]
impl JsTrainer {
    /// `data`: JSONL text, one `{"messages": [...]}` or `{"prompt", "response"[, "system"]}` per line. `lora`:
    /// `{rank, alpha, rslora, dropout, targets: ["q", "v", …], seed}`; `config`: `{lr, weightDecay, betas, eps,
    /// warmupSteps, schedule: "linear" | "cosine" | "constant", epochs, batchSize, maxLen, maxGradNorm,
    /// evalFraction, seed}` (each optional; the defaults are the CLI's).
    #[wasm_bindgen(constructor)]
    pub fn new(
        generator: &JsGenerator,
        data: &str,
        lora: JsValue,
        config: JsValue,
    ) -> Result<JsTrainer, JsValue> {
        let lora: crate::llm::train::LoraConfig = from_js(lora)?;
        let config: crate::llm::train::TrainConfig = from_js(config)?;
        let examples = training_examples(data)?;
        let m = generator.inner.try_borrow().map_err(|_| busy())?;
        let t = crate::llm::train::Trainer::new(&m, &examples, &lora, config).map_err(js_error)?;
        Ok(JsTrainer {
            model: generator.inner.clone(),
            t: std::rc::Rc::new(std::cell::RefCell::new(t)),
            running: Default::default(),
        })
    }

    /// Continue from `checkpoint()`'s bytes, with the same model and data (refused otherwise).
    pub fn resume(
        generator: &JsGenerator,
        data: &str,
        checkpoint: &[u8],
    ) -> Result<JsTrainer, JsValue> {
        let examples = training_examples(data)?;
        let m = generator.inner.try_borrow().map_err(|_| busy())?;
        let t = crate::llm::train::Trainer::resume(&m, &examples, checkpoint).map_err(js_error)?;
        Ok(JsTrainer {
            model: generator.inner.clone(),
            t: std::rc::Rc::new(std::cell::RefCell::new(t)),
            running: Default::default(),
        })
    }

    /// `{trainExamples, evalExamples, skipped, parameters, step, totalSteps, stepsPerEpoch, done, lora, config}`.
    #[wasm_bindgen(getter)]
    pub fn info(&self) -> Result<JsValue, JsValue> {
        let t = self.t.try_borrow().map_err(|_| trainer_busy())?;
        to_js(&serde_json::json!({
            "trainExamples": t.train.len(),
            "evalExamples": t.eval.len(),
            "skipped": t.skipped,
            "parameters": t.params.count(),
            "step": t.step,
            "totalSteps": t.total_steps(),
            "stepsPerEpoch": t.steps_per_epoch(),
            "done": t.done(),
            "lora": t.params.config,
            "config": t.cfg,
        }))
    }

    /// Mean loss per learned token on the held-out examples (`null` when there are none), on the CPU.
    #[wasm_bindgen(js_name = evalLoss)]
    pub fn eval_loss(&self) -> Result<Option<f64>, JsValue> {
        let m = self.model.try_borrow().map_err(|_| busy())?;
        let mut t = self.t.try_borrow_mut().map_err(|_| trainer_busy())?;
        t.eval_loss(&m).map_err(js_error)
    }

    /// Train until done, or until `onProgress(progress)` returns `false` (abort: the state stays as after the
    /// last step, so `checkpoint()` and `exportPeft()` still work and a later `run` goes on). Between steps it
    /// lets the event loop run, so a Worker sees an abort message. `progress`: `{step, totalSteps, epoch, loss,
    /// lr, gradNorm, tokens, tokensPerS, elapsedS, etaS, evalLoss}` (evalLoss at the end of each epoch). Resolves
    /// to the last progress (or `null` when there was nothing left to do). `keepGoing()`, when given, is asked
    /// before every step (after the event loop has run): `false` stops there.
    pub fn run(
        &self,
        on_progress: Option<js_sys::Function>,
        keep_going: Option<js_sys::Function>,
    ) -> js_sys::Promise {
        let (model, t, running) = (self.model.clone(), self.t.clone(), self.running.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            if running.replace(true) {
                return Err(trainer_busy());
            }
            let r = Self::steps(&model, &t, on_progress, keep_going).await;
            running.set(false);
            r
        })
    }

    // The borrows are held across a GPU step's awaits on purpose: every other access uses try_borrow(_mut) and
    // gets `busy`, never a panic.
    #[allow(clippy::await_holding_refcell_ref)]
    async fn steps(
        model: &std::cell::RefCell<crate::llm::Model>,
        t: &std::cell::RefCell<crate::llm::train::Trainer>,
        on_progress: Option<js_sys::Function>,
        keep_going: Option<js_sys::Function>,
    ) -> Result<JsValue, JsValue> {
        {
            let mut clock = {
                let t = t.try_borrow().map_err(|_| trainer_busy())?;
                crate::llm::train::RunClock::start(&t)
            };
            let mut last = JsValue::NULL;
            loop {
                if let Some(f) = &keep_going {
                    if f.call0(&JsValue::NULL)?.as_bool() == Some(false) {
                        break;
                    }
                }
                {
                    // Borrowed for one step. On the CPU the step never waits; on the GPU it awaits the device
                    // with both borrowed, so the generator and the trainer answer "busy" meanwhile.
                    let m = model.try_borrow().map_err(|_| busy())?;
                    let mut tr = t.try_borrow_mut().map_err(|_| trainer_busy())?;
                    if tr.done() {
                        break;
                    }
                    let p = tr.advance_async(&m, &mut clock).await.map_err(js_error)?;
                    last = to_js(&p)?;
                }
                if let Some(f) = &on_progress {
                    if f.call1(&JsValue::NULL, &last)?.as_bool() == Some(false) {
                        break;
                    }
                }
                crate::kernels::yield_now().await;
            }
            Ok(last)
        }
    }

    /// The whole state (adapter, optimizer moments, position, generator) for `Trainer.resume`.
    pub fn checkpoint(&self) -> Result<Vec<u8>, JsValue> {
        let t = self.t.try_borrow().map_err(|_| trainer_busy())?;
        Ok(t.checkpoint())
    }

    /// The adapter in PEFT's format: `{config: adapter_config.json text, weights: adapter_model.safetensors
    /// bytes}`; `generator.loadAdapter(name, weights, config)` uses it at once, Python PEFT loads the two files.
    #[wasm_bindgen(js_name = exportPeft)]
    pub fn export_peft(&self) -> Result<JsValue, JsValue> {
        let m = self.model.try_borrow().map_err(|_| busy())?;
        let t = self.t.try_borrow().map_err(|_| trainer_busy())?;
        let (config, weights) = t
            .params
            .to_peft(&m.weights, m.name.as_deref().unwrap_or("unknown"));
        let o = js_sys::Object::new();
        js_sys::Reflect::set(&o, &"config".into(), &config.into())?;
        js_sys::Reflect::set(
            &o,
            &"weights".into(),
            &js_sys::Uint8Array::from(weights.as_slice()).into(),
        )?;
        Ok(o.into())
    }
}

#[cfg(feature = "llm")]
fn trainer_busy() -> JsValue {
    js_error(Error::Config(
        "the trainer is busy (a run has not finished)".into(),
    ))
}
