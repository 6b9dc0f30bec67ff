//! The integration tests that run natively and in wasm under Node, as one test binary: each file is a module
//! (chunking, ingest, wordpiece, index, llm, lora, pipeline); tests/embed.rs and tests/gpu.rs, which also run in
//! headless Chromium, stay binaries of their own. One binary instead of seven: the wasm-bindgen test runner
//! rewrites every wasm32 test binary before Node loads it (10–15 s each, more for those carrying the model), and
//! the shared files in `common` (the SmolLM2 model, MiniLM) are in it once. Run one file's tests natively with
//! `cargo test --features cli --test suite llm::`.

#[macro_use]
#[path = "common/mod.rs"]
mod common;

#[path = "chunking.rs"]
mod chunking;
#[path = "index.rs"]
mod index;
#[path = "ingest.rs"]
mod ingest;
#[path = "llm.rs"]
mod llm;
#[path = "lora.rs"]
mod lora;
#[path = "pipeline.rs"]
mod pipeline;
#[path = "wordpiece.rs"]
mod wordpiece;
