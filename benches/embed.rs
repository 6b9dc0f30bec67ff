//! Native embedding throughput, both engines, one thread, interleaved round by round so machine noise hits them
//! alike: all-MiniLM-L6-v2 int8 on the peers' pre-tokenized inputs (../shared/peers/data: 200 short sentences
//! at batch 1; the first 64 SciFact passages ≤256 tokens at batch 16), the same inputs bench/embed-wasm.mjs and
//! the onnxruntime-web script use. Medians of `EMBED_REPS` rounds (default 3).
//!   cargo bench --bench embed
use std::time::Instant;

use lorag::{Embedder, EmbedderConfig, EmbedderFiles, Engine, Limits};

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|s| {
            s.as_array()
                .expect("a sequence")
                .iter()
                .map(|t| t.as_u64().expect("an id") as u32)
                .collect()
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let model = format!("{root}/models/all-MiniLM-L6-v2-int8");
    let read = |f: &str| std::fs::read(format!("{model}/{f}")).expect("run scripts/fetch-models");
    let (onnx, tok, cfg, pool, sbert, modules) = (
        read("model.onnx"),
        read("tokenizer.json"),
        read("config.json"),
        read("1_Pooling/config.json"),
        read("sentence_bert_config.json"),
        read("modules.json"),
    );
    let files = EmbedderFiles {
        model_onnx: &onnx,
        tokenizer_json: &tok,
        config_json: Some(&cfg),
        pooling_config_json: Some(&pool),
        sentence_bert_config_json: Some(&sbert),
        modules_json: Some(&modules),
    };
    let data = |f: &str| -> serde_json::Value {
        let p = format!("{root}/../shared/peers/data/{f}");
        serde_json::from_slice(&std::fs::read(&p).expect(&p)).expect("json")
    };
    let short = ids(&data("short_sentences.json"));
    let passages: Vec<Vec<u32>> = ids(&data("passages_256.json"))
        .into_iter()
        .take(64)
        .collect();
    let reps: usize = std::env::var("EMBED_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let engines = [Engine::Native, Engine::Tract];
    let load = |engine| {
        let t = Instant::now();
        let config = EmbedderConfig {
            engine: Some(engine),
            batch_size: Some(16),
            ..Default::default()
        };
        let e = Embedder::from_bytes(files, config, &Limits::default()).expect("model");
        (e, t.elapsed().as_secs_f64() * 1000.0)
    };
    let embedders: Vec<(Embedder, f64)> = engines.iter().map(|&e| load(e)).collect();
    let mut short_rate = vec![Vec::new(); 2];
    let mut pass_rate = vec![Vec::new(); 2];
    for _ in 0..reps {
        for (k, (e, _)) in embedders.iter().enumerate() {
            let t = Instant::now();
            for q in &short {
                e.embed_ids(std::slice::from_ref(q)).expect("embed");
            }
            short_rate[k].push(short.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            e.embed_ids(&passages).expect("embed");
            pass_rate[k].push(passages.len() as f64 / t.elapsed().as_secs_f64());
        }
    }
    for (k, engine) in engines.iter().enumerate() {
        println!(
            "{engine:?}: load {:.0} ms; short sentences batch 1 {:.1}/s; passages batch 16 {:.2}/s",
            embedders[k].1,
            median(short_rate[k].clone()),
            median(pass_rate[k].clone())
        );
    }
    println!(
        "native / tract: short {:.2}×, passages {:.2}× (medians of {reps} interleaved rounds)",
        median(short_rate[0].clone()) / median(short_rate[1].clone()),
        median(pass_rate[0].clone()) / median(pass_rate[1].clone())
    );
}
