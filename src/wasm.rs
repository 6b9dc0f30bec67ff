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
            Some(json) => {
                let counter =
                    crate::TokenCounter::from_bytes(&json, sentence_bert_config.as_deref())
                        .map_err(js_error)?;
                Chunker::new(counter, config)
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
