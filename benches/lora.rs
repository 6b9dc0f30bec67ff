//! Decoding speed with LoRA adapters against the base, one run, one thread: SmolLM2-135M Q4_1, the ~200-token
//! prompt of ../shared/peers/data/llm_prompt.json, 64 greedy tokens (end-of-sequence ignored), configurations
//! interleaved round by round so that machine noise hits them alike; medians of `LORA_REPS` rounds (default 5).
//! Random adapters (values ±0.02): rank 8 on q,v and rank 16 on all seven projections, one and three at a time.
//! The adapters are also written as GGUF-LoRA files to target/lora-bench/ for bench/lora-wasm.mjs.
//!   cargo bench --bench lora
use lorag::llm::lora::LoraMat;
use lorag::llm::{
    Adapter, AdapterFormat, AdapterUse, GenerateOptions, Model, SamplerConfig, Target,
};

fn random_adapter(m: &Model, targets: &[Target], rank: usize, seed: u64) -> Adapter {
    let mut s = seed;
    let mut r = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
    };
    let w = &m.weights;
    let mut a = Adapter::empty(w.cfg.n_layer, AdapterFormat::Memory);
    for l in 0..w.cfg.n_layer {
        for &t in targets {
            let base = t.mat(&w.layers[l]);
            let lm = LoraMat {
                rank,
                rows: base.rows,
                cols: base.cols,
                a: (0..rank * base.cols).map(|_| r()).collect(),
                bt: (0..rank * base.rows).map(|_| r()).collect(),
                scale: 2.0,
            };
            a.set(w, "bench", l, t, lm).unwrap();
        }
    }
    a
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut m =
        Model::from_bytes(std::fs::read(&model_path).expect("scripts/fetch-models first")).unwrap();
    let lp: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("../shared/peers/data/llm_prompt.json")).unwrap(),
    )
    .unwrap();
    let prompt = m.encode(lp["prompt"].as_str().unwrap(), false).unwrap();
    let out_dir = root.join("target/lora-bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let qv = [Target::Q, Target::V];
    for i in 0..3 {
        for (kind, targets, rank) in [("r8-qv", &qv[..], 8), ("r16-all", &Target::ALL[..], 16)] {
            let name = format!("{kind}-{i}");
            let a = random_adapter(&m, targets, rank, 17 + i as u64 * 31 + rank as u64);
            std::fs::write(
                out_dir.join(format!("{name}.gguf")),
                a.to_gguf(m.config().arch),
            )
            .unwrap();
            m.add_adapter(&name, a).unwrap();
        }
    }
    let configs: Vec<(&str, Vec<&str>)> = vec![
        ("base", vec![]),
        ("1 × rank 8 q,v", vec!["r8-qv-0"]),
        ("1 × rank 16 all", vec!["r16-all-0"]),
        ("3 × rank 8 q,v", vec!["r8-qv-0", "r8-qv-1", "r8-qv-2"]),
        (
            "3 × rank 16 all",
            vec!["r16-all-0", "r16-all-1", "r16-all-2"],
        ),
    ];
    let reps: usize = std::env::var("LORA_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut decode = vec![Vec::new(); configs.len()];
    let mut prefill = vec![Vec::new(); configs.len()];
    for _ in 0..reps {
        for (i, (_, names)) in configs.iter().enumerate() {
            let opts = GenerateOptions {
                max_tokens: 64,
                sampler: SamplerConfig::greedy(),
                ignore_eos: true,
                adapters: names
                    .iter()
                    .map(|n| AdapterUse {
                        name: n.to_string(),
                        weight: 1.0,
                    })
                    .collect(),
                ..Default::default()
            };
            let out = m.generate(&prompt, &opts, &mut |_| true).unwrap();
            decode[i].push(out.decode_tok_s());
            prefill[i].push(out.prefill_tok_s());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_d = med(&mut decode[0].clone());
    let base_p = med(&mut prefill[0].clone());
    println!(
        "prompt {} tokens, 64 generated, {reps} rounds, medians",
        prompt.len()
    );
    println!(
        "{:<18} {:>12} {:>9} {:>12} {:>9} {:>10}",
        "adapters", "decode tok/s", "vs base", "prefill tok/s", "vs base", "adapter MiB"
    );
    for (i, (label, names)) in configs.iter().enumerate() {
        let (d, p) = (med(&mut decode[i]), med(&mut prefill[i]));
        let mib: f64 = names
            .iter()
            .map(|n| m.adapters().find(|a| a.0 == *n).unwrap().1.info().bytes as f64)
            .fold(0.0, |a, b| a + b)
            / (1 << 20) as f64;
        println!(
            "{label:<18} {d:>12.1} {:>+8.1}% {p:>12.1} {:>+8.1}% {mib:>10.2}",
            (d / base_d - 1.0) * 100.0,
            (p / base_p - 1.0) * 100.0
        );
    }
}
