//! LoRA training: the analytic gradients of the backward pass against central finite differences of the loss,
//! on a tiny generated llama (and its Qwen2 twin: biases, NeoX RoPE), every target adapted, with and without
//! dropout. Natively and in wasm.

mod common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::tiny::{tiny, tiny_as_qwen2};
use lorag::llm::train::{loss_and_grad, LoraConfig, LoraParams, Rng, Sequence};
use lorag::llm::{Model, Target};

fn sequence(n_vocab: usize) -> Sequence {
    // 12 tokens, the loss on the last 7 predictions (as on an answer after a prompt).
    let ids: Vec<u32> = (0..12).map(|i| ((i * 37 + 11) % n_vocab) as u32).collect();
    let loss = (0..11).map(|t| t >= 4).collect();
    Sequence { ids, loss }
}

/// Random non-zero B (a fresh adapter's B is zero, which would make every A gradient zero).
fn randomize_b(p: &mut LoraParams, seed: u64) {
    let mut rng = Rng::new(seed);
    for m in &mut p.mats {
        for b in &mut m.m.bt {
            *b = (rng.uniform() * 2.0 - 1.0) * 0.5;
        }
    }
}

fn param(p: &mut LoraParams, mi: usize, which: usize, k: usize) -> &mut f32 {
    let m = &mut p.mats[mi].m;
    if which == 0 {
        &mut m.a[k]
    } else {
        &mut m.bt[k]
    }
}

fn loss(model: &Model, p: &mut LoraParams, seq: &Sequence, seed: u64) -> f64 {
    let (l, _) = loss_and_grad(
        &model.weights,
        model.bytes(),
        p,
        seq,
        false,
        Some(&mut Rng::new(seed)),
    )
    .unwrap();
    l
}

/// Checks every A and B gradient component in a sample (and a random direction through all of them) against
/// central differences with step `h`.
///
/// Tolerance: the forward pass is f32, so the loss (≈ 7 tokens × ln 261 ≈ 39) carries rounding noise of order
/// 1e-5; over a step of 2h = 2e-2 that is ≈ 1e-3 of absolute error in a difference quotient, and the truncation
/// error is O(h²) ≈ 1e-4 relative. Components are compared with |fd − g| ≤ 2e-3 + 1e-2·|g|.
fn check(model: &Model, cfg: &LoraConfig) {
    let seq = sequence(model.config().n_vocab);
    let mut p = LoraParams::init(&model.weights, cfg).unwrap();
    randomize_b(&mut p, 99);
    let seed = 5; // the dropout masks: the same for every evaluation
    let (l0, n) = loss_and_grad(
        &model.weights,
        model.bytes(),
        &mut p,
        &seq,
        true,
        Some(&mut Rng::new(seed)),
    )
    .unwrap();
    assert_eq!(n, 7);
    assert!(l0.is_finite() && l0 > 0.0);
    let grads: Vec<(Vec<f32>, Vec<f32>)> = p
        .mats
        .iter()
        .map(|m| (m.ga.clone(), m.gbt.clone()))
        .collect();
    // The gradients themselves must be non-trivial for the check to mean anything.
    let norm: f64 = grads
        .iter()
        .flat_map(|(a, b)| a.iter().chain(b))
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(norm > 1e-2, "gradient norm {norm}");
    let h = 1e-2f32;
    let mut pick = Rng::new(3);
    let mut checked = 0;
    #[allow(clippy::needless_range_loop)] // p is mutated inside the loop
    for mi in 0..p.mats.len() {
        for which in 0..2 {
            for _ in 0..6 {
                let len = if which == 0 {
                    p.mats[mi].m.a.len()
                } else {
                    p.mats[mi].m.bt.len()
                };
                let k = pick.below(len);
                let orig = *param(&mut p, mi, which, k);
                *param(&mut p, mi, which, k) = orig + h;
                let up = loss(model, &mut p, &seq, seed);
                *param(&mut p, mi, which, k) = orig - h;
                let down = loss(model, &mut p, &seq, seed);
                *param(&mut p, mi, which, k) = orig;
                let fd = (up - down) / (2.0 * h as f64);
                let g = if which == 0 {
                    grads[mi].0[k]
                } else {
                    grads[mi].1[k]
                } as f64;
                let (layer, target) = (p.mats[mi].layer, p.mats[mi].target);
                assert!(
                    (fd - g).abs() <= 2e-3 + 1e-2 * g.abs(),
                    "layer {layer} {target:?} {} [{k}]: analytic {g}, finite difference {fd}",
                    if which == 0 { "A" } else { "B" }
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, p.mats.len() * 12);
    // A random direction u through all parameters: (L(θ + hu) − L(θ − hu)) / 2h = g·u.
    let mut dir = Rng::new(11);
    let u: Vec<(Vec<f32>, Vec<f32>)> = p
        .mats
        .iter()
        .map(|m| {
            let mut r = || dir.uniform() * 2.0 - 1.0;
            (
                m.m.a.iter().map(|_| r()).collect(),
                m.m.bt.iter().map(|_| r()).collect(),
            )
        })
        .collect();
    let unorm = u
        .iter()
        .flat_map(|(a, b)| a.iter().chain(b))
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let shift = |p: &mut LoraParams, s: f32| {
        for (m, (ua, ub)) in p.mats.iter_mut().zip(&u) {
            m.m.a
                .iter_mut()
                .zip(ua)
                .for_each(|(x, d)| *x += s * d / unorm as f32);
            m.m.bt
                .iter_mut()
                .zip(ub)
                .for_each(|(x, d)| *x += s * d / unorm as f32);
        }
    };
    let gu: f64 = grads
        .iter()
        .zip(&u)
        .map(|((ga, gb), (ua, ub))| {
            ga.iter()
                .zip(ua)
                .chain(gb.iter().zip(ub))
                .map(|(&g, &d)| g as f64 * d as f64)
                .sum::<f64>()
        })
        .sum::<f64>()
        / unorm;
    shift(&mut p, h);
    let up = loss(model, &mut p, &seq, seed);
    shift(&mut p, -2.0 * h);
    let down = loss(model, &mut p, &seq, seed);
    let fd = (up - down) / (2.0 * h as f64);
    assert!(
        (fd - gu).abs() <= 2e-3 + 1e-2 * gu.abs(),
        "direction: analytic {gu}, finite difference {fd}"
    );
}

fn all_targets(dropout: f32) -> LoraConfig {
    LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout,
        targets: Target::ALL.to_vec(),
        seed: 42,
        ..Default::default()
    }
}

#[test]
fn gradients_match_finite_differences_llama() {
    let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    check(&model, &all_targets(0.0));
}

#[test]
fn gradients_match_finite_differences_with_dropout() {
    let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    check(&model, &all_targets(0.25));
}

#[test]
fn gradients_match_finite_differences_qwen2_biases_neox() {
    let model = Model::from_bytes(tiny_as_qwen2(|name, i| {
        ((i % 7) as f32 - 3.0) * 0.05 * (name.len() % 3) as f32
    }))
    .unwrap();
    check(
        &model,
        &LoraConfig {
            rslora: true,
            ..all_targets(0.0)
        },
    );
}

#[test]
fn fresh_adapter_leaves_the_model_unchanged_and_loss_matches_forward() {
    // B = 0: the loss equals the base model's cross-entropy computed from its own forward logits.
    let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let seq = sequence(model.config().n_vocab);
    let mut p = LoraParams::init(&model.weights, &LoraConfig::default()).unwrap();
    let (l, n) = loss_and_grad(&model.weights, model.bytes(), &mut p, &seq, false, None).unwrap();
    let mut cache = model.new_cache(16).unwrap();
    let logits = model.forward(&mut cache, &seq.ids, true).unwrap();
    let v = model.config().n_vocab;
    let mut want = 0.0f64;
    for t in 0..11 {
        if !seq.loss[t] {
            continue;
        }
        let row = &logits[t * v..(t + 1) * v];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&z| (z as f64 - max).exp())
                .sum::<f64>()
                .ln();
        want += lse - row[seq.ids[t + 1] as usize] as f64;
    }
    assert_eq!(n, 7);
    assert!(
        (l - want).abs() < 1e-4 * want,
        "training loss {l}, from forward logits {want}"
    );
}

use lorag::llm::train::{parse_examples, TrainConfig, Trainer};
use lorag::llm::{AdapterUse, GenerateOptions, SamplerConfig};

/// Conversations whose answers all end with the same sign-off, over varied questions.
fn signoff_data(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| {
            serde_json::json!({"prompt": format!("tell me about {w}"), "response": "fine, ok!"})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn training_teaches_a_behaviour_the_base_lacks_and_exports_peft() {
    let mut model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let train_words = [
        "cats", "dogs", "bread", "rain", "maps", "glue", "jazz", "kites", "salt", "wood", "ink",
        "fog", "corn", "milk", "bees", "wind", "tea", "soap", "iron", "owls", "rice", "moss",
        "silk", "wax",
    ];
    let examples = parse_examples(&signoff_data(&train_words), 1000).unwrap();
    let cfg = TrainConfig {
        lr: 2e-2,
        epochs: 20,
        batch_size: 2,
        eval_fraction: 0.25,
        seed: 3,
        ..Default::default()
    };
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Target::ALL.to_vec(),
        seed: 9,
        ..Default::default()
    };
    let mut t = Trainer::new(&model, &examples, &lora, cfg).unwrap();
    assert_eq!((t.train.len(), t.eval.len()), (18, 6));
    let before = t.eval_loss(&model).unwrap().unwrap();
    let mut evals = Vec::new();
    t.run(&model, &mut |p| {
        assert!(p.loss.is_finite() && p.grad_norm.is_finite());
        if let Some(l) = p.eval_loss {
            evals.push(l);
        }
        true
    })
    .unwrap();
    assert!(t.done());
    assert_eq!(evals.len(), 20);
    let after = *evals.last().unwrap();
    assert!(
        evals.windows(2).filter(|w| w[1] > w[0] + 1e-3).count() <= 2,
        "held-out loss by epoch: {evals:?}"
    );
    assert!(after < 0.5 * before, "held-out loss {before} → {after}");
    // Unseen questions: the trained adapter signs off, the base model does not.
    let (config, weights) = t.params.to_peft(&model.weights, "tiny");
    let adapter = model
        .adapter_from_peft(config.as_bytes(), &weights)
        .unwrap();
    model.add_adapter("signoff", adapter).unwrap();
    let mut signed = [0, 0];
    for w in [
        "lamps", "honey", "snow", "trains", "clay", "ferns", "vans", "mugs",
    ] {
        let prompt = model
            .chat_prompt(&[lorag::llm::Message {
                role: "user".into(),
                content: format!("tell me about {w}"),
            }])
            .unwrap();
        for (i, adapters) in [
            vec![],
            vec![AdapterUse {
                name: "signoff".into(),
                weight: 1.0,
            }],
        ]
        .into_iter()
        .enumerate()
        {
            let opts = GenerateOptions {
                max_tokens: 16,
                sampler: SamplerConfig::greedy(),
                adapters,
                ..Default::default()
            };
            let out = model.generate(&prompt, &opts, &mut |_| true).unwrap();
            if out.text.contains("ok!") {
                signed[i] += 1;
            }
        }
    }
    // The tiny model's logits are small (RMS-normed 32-wide states dotted with ±0.25 embeddings), so even the
    // trained adapter's loss stays near 1.76 nats a token and a greedy answer can slip: most, not all.
    assert!(
        signed[0] == 0 && signed[1] >= 6,
        "answers with the sign-off: [base, adapter] = {signed:?} of 8"
    );
}

#[test]
fn checkpoint_resume_continues_exactly() {
    let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let examples = parse_examples(
        &signoff_data(&["cats", "dogs", "bread", "rain", "maps", "glue"]),
        100,
    )
    .unwrap();
    let cfg = TrainConfig {
        lr: 1e-2,
        epochs: 2,
        batch_size: 2,
        seed: 4,
        ..Default::default()
    };
    let lora = LoraConfig {
        rank: 2,
        dropout: 0.1,
        ..Default::default()
    };
    let mut whole = Trainer::new(&model, &examples, &lora, cfg.clone()).unwrap();
    whole.run(&model, &mut |_| true).unwrap();
    let mut first = Trainer::new(&model, &examples, &lora, cfg).unwrap();
    first.run(&model, &mut |p| p.step < 3).unwrap();
    assert_eq!(first.step, 3);
    let mut second = Trainer::resume(&model, &examples, &first.checkpoint()).unwrap();
    second.run(&model, &mut |_| true).unwrap();
    assert_eq!(second.step, whole.step);
    for (a, b) in whole.params.mats.iter().zip(&second.params.mats) {
        assert_eq!(a.m.a, b.m.a);
        assert_eq!(a.m.bt, b.m.bt);
    }
    // Another data file, or bytes that are not a checkpoint, are refused.
    let other = parse_examples(&signoff_data(&["x", "y", "z"]), 100).unwrap();
    assert!(matches!(
        Trainer::resume(&model, &other, &first.checkpoint()),
        Err(lorag::Error::Config(_))
    ));
    assert!(Trainer::resume(&model, &examples, b"not a checkpoint").is_err());
}

#[test]
fn bad_training_data_is_a_typed_error() {
    for (text, want) in [
        ("{\"prompt\": \"a\"}", "line 1"),
        (
            "\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
            "line 3: no assistant",
        ),
        ("not json", "line 1"),
        (
            "{\"prompt\": \"a\", \"response\": \"b\", \"extra\": 1}",
            "line 1",
        ),
    ] {
        match parse_examples(text, 10) {
            Err(lorag::Error::Config(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let many = "{\"prompt\": \"a\", \"response\": \"b\"}\n".repeat(3);
    assert!(parse_examples(&many, 2).is_err());
    let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let none: Vec<lorag::llm::train::Example> = Vec::new();
    assert!(Trainer::new(
        &model,
        &none,
        &LoraConfig::default(),
        TrainConfig::default()
    )
    .is_err());
}
