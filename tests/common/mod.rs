//! Shared test helpers: the real MiniLM tokenizer, a seeded random generator and a tiny PDF writer.
#![allow(dead_code)]

#[cfg(feature = "llm")]
pub mod reference;
#[cfg(feature = "llm")]
pub mod tiny;

/// all-MiniLM-L6-v2's tokenizer.json and sentence_bert_config.json, from `scripts/fetch-models`.
pub const TOKENIZER_JSON: &[u8] =
    include_bytes!("../../models/all-MiniLM-L6-v2-int8/tokenizer.json");
pub const SBERT_CONFIG: &[u8] =
    include_bytes!("../../models/all-MiniLM-L6-v2-int8/sentence_bert_config.json");
/// all-MiniLM-L6-v2's other configuration files.
pub const MINILM_CONFIG: &[u8] = include_bytes!("../../models/all-MiniLM-L6-v2-int8/config.json");
pub const MINILM_POOLING: &[u8] =
    include_bytes!("../../models/all-MiniLM-L6-v2-int8/1_Pooling/config.json");
pub const MINILM_MODULES: &[u8] = include_bytes!("../../models/all-MiniLM-L6-v2-int8/modules.json");

/// all-MiniLM-L6-v2's files, with `onnx` as its graph.
pub fn minilm_files(onnx: &[u8]) -> lorag::EmbedderFiles<'_> {
    lorag::EmbedderFiles {
        model_onnx: onnx,
        tokenizer_json: TOKENIZER_JSON,
        config_json: Some(MINILM_CONFIG),
        pooling_config_json: Some(MINILM_POOLING),
        sentence_bert_config_json: Some(SBERT_CONFIG),
        modules_json: Some(MINILM_MODULES),
    }
}

/// The larger files several test modules read, as statics: one copy in the test binary whichever modules use them
/// (consts would be copied where used; the wasm test binary carries them, ~100 MB for the model).
#[cfg(feature = "llm")]
pub static SMOLLM: &[u8] =
    include_bytes!("../../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
#[cfg(feature = "llm")]
pub static PEFT_CONFIG: &[u8] =
    include_bytes!("../../../shared/reference/lora-synthetic-smollm2/adapter_config.json");
#[cfg(feature = "llm")]
pub static PEFT_WEIGHTS: &[u8] =
    include_bytes!("../../../shared/reference/lora-synthetic-smollm2/adapter_model.safetensors");
pub static MINILM_ONNX: &[u8] = include_bytes!("../../models/all-MiniLM-L6-v2-int8/model.onnx");

/// A file of this crate (`path` relative to the crate root, e.g. a model from `scripts/fetch-models`), read when
/// the test runs rather than compiled into it: natively from disk; in wasm through Node's `fs`, or in a browser
/// from wasm-bindgen's test server, which serves the crate root. A test wasm carrying a 100 MB model took
/// Chromium longer to load than chromedriver's 30-second renderer deadline.
pub async fn asset(path: &str) -> Vec<u8> {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e} (run scripts/fetch-models)"))
    }
    #[cfg(target_arch = "wasm32")]
    {
        let read = js_sys::Function::new_with_args(
            "full, path",
            r#"return (async () => {
                if (typeof process === "object" && process.versions && process.versions.node) {
                    const fs = process.getBuiltinModule ? process.getBuiltinModule("fs") : await import("node:fs");
                    return new Uint8Array(fs.readFileSync(full));
                }
                const r = await fetch("/" + path);
                if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
                return new Uint8Array(await r.arrayBuffer());
            })()"#,
        );
        let promise = read
            .call2(&wasm_bindgen::JsValue::NULL, &full.into(), &path.into())
            .unwrap();
        let bytes = wasm_bindgen_futures::JsFuture::from(js_sys::Promise::from(promise))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?} (run scripts/fetch-models)"));
        js_sys::Uint8Array::new(&bytes).to_vec()
    }
}

/// `async_test! { fn name() { … .await … } }`: a `#[test]` natively (run by `lorag::kernels::block_on`, which
/// also serves the GPU's futures: the code awaiting them polls the device), an async `wasm_bindgen_test` in wasm.
#[macro_export]
macro_rules! async_test {
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        #[cfg(not(target_arch = "wasm32"))]
        #[test]
        $(#[$m])*
        fn $name() {
            lorag::kernels::block_on(async $body)
        }
        #[cfg(target_arch = "wasm32")]
        #[wasm_bindgen_test::wasm_bindgen_test]
        $(#[$m])*
        async fn $name() $body
    };
}

pub fn token_counter() -> lorag::TokenCounter {
    lorag::TokenCounter::from_bytes(TOKENIZER_JSON, Some(SBERT_CONFIG)).expect("tokenizer loads")
}

/// xorshift64*: deterministic, dependency-free, identical natively and in wasm.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Writes a minimal, valid PDF: one Helvetica (WinAnsi) font `/F1`, one page per content stream, an Info
/// dictionary with `title`, and a correct cross-reference table. `compress` deflates the content streams.
pub fn make_pdf(pages: &[&[u8]], title: Option<&str>, compress: bool) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = Vec::new();
    let n_pages = pages.len();
    // 1 catalog, 2 pages, 3 font, 4 info, then (page, content) pairs.
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    let kids: Vec<String> = (0..n_pages).map(|i| format!("{} 0 R", 5 + 2 * i)).collect();
    objects.push(
        format!(
            "<< /Type /Pages /Kids [{}] /Count {} >>",
            kids.join(" "),
            n_pages
        )
        .into_bytes(),
    );
    objects.push(
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    );
    objects.push(
        format!(
            "<< /Title ({}) /Producer (lorag tests) >>",
            title.unwrap_or("")
        )
        .into_bytes(),
    );
    for (i, content) in pages.iter().enumerate() {
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                6 + 2 * i
            )
            .into_bytes(),
        );
        let (data, filter) = if compress {
            use std::io::Write;
            let mut enc =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(content).unwrap();
            (enc.finish().unwrap(), " /Filter /FlateDecode")
        } else {
            (content.to_vec(), "")
        };
        let mut obj = format!("<< /Length {}{} >>\nstream\n", data.len(), filter).into_bytes();
        obj.extend_from_slice(&data);
        obj.extend_from_slice(b"\nendstream");
        objects.push(obj);
    }
    let mut out = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, obj) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(obj);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R /Info 4 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}
