//! The generator against the independent reference (../shared/reference/smollm2_135m_q4_1.json: a float64 numpy
//! forward over the same GGUF weights), natively and in wasm (both must give the reference tokens, so they agree
//! with each other token for token); hostile GGUF files, prompts, settings and chat templates.

use crate::common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::reference::{case, ids};
use common::tiny::{tiny, tiny_as_qwen2, tiny_t};
use lorag::llm::gguf::GgufWriter;
use lorag::llm::quant::GgmlType;
use lorag::llm::{GenerateOptions, Message, Model, SamplerConfig, StopReason};
use lorag::Error;

use common::SMOLLM;

fn smollm() -> Model {
    Model::from_bytes(SMOLLM.to_vec()).expect("SmolLM2 loads")
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        top_logits: 5,
        ..Default::default()
    }
}

fn check_top5(got: &[(u32, f32)], want: &serde_json::Value) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0 as u64, w["id"].as_u64().unwrap(), "top-5 ids {got:?}");
        let wl = w["logit"].as_f64().unwrap() as f32;
        assert!(
            (g.1 - wl).abs() <= 0.05,
            "token {} logit {} vs reference {wl}",
            g.0,
            g.1
        );
    }
}

#[test]
fn raw_prompt_matches_the_reference() {
    let m = smollm();
    let c = case("raw_base");
    let prompt = m.encode(c["prompt"].as_str().unwrap(), false).unwrap();
    assert_eq!(prompt, ids(&c["prompt_ids"]));
    let out = m.generate(&prompt, &greedy(10), &mut |_| true).unwrap();
    check_top5(&out.top_logits, &c["top5_next"]);
    assert_eq!(out.ids, ids(&c["greedy_ids"]));
    assert_eq!(out.text, c["greedy_text"].as_str().unwrap());
    assert_eq!(out.stop_reason, StopReason::MaxTokens);
}

#[test]
fn chat_prompt_matches_the_reference_and_stops_at_end_of_turn() {
    let m = smollm();
    let c = case("chat_base");
    assert!(m.template_from_file);
    let msgs = [
        Message {
            role: "system".into(),
            content: "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into(),
        },
        Message {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    assert_eq!(m.render_chat(&msgs).unwrap(), c["prompt"].as_str().unwrap());
    let prompt = m.chat_prompt(&msgs).unwrap();
    assert_eq!(prompt, ids(&c["prompt_ids"]));
    let mut streamed = String::new();
    let out = m
        .generate(&prompt, &greedy(32), &mut |ev| {
            streamed.push_str(ev.text);
            true
        })
        .unwrap();
    check_top5(&out.top_logits, &c["top5_next"]);
    assert_eq!(out.ids, ids(&c["greedy_ids"]));
    assert_eq!(out.stop_reason, StopReason::Eos);
    // The reference text ends with the end-of-turn token's text; the answer does not include it.
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(streamed, out.text);
}

#[test]
fn special_tokens_in_plain_text_stay_text() {
    let m = smollm();
    let plain = m.encode("<|im_start|>user", false).unwrap();
    let special = m.encode("<|im_start|>user", true).unwrap();
    assert_eq!(special[0], 1);
    assert!(!plain.contains(&1), "{plain:?}");
    assert_eq!(m.tokenizer.decode(&plain), "<|im_start|>user");
}

#[test]
fn sampling_is_reproducible_and_stops_and_aborts() {
    let m = smollm();
    let prompt = m.encode("Once upon a time", false).unwrap();
    let opts = GenerateOptions {
        max_tokens: 8,
        sampler: SamplerConfig {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = m.generate(&prompt, &opts, &mut |_| true).unwrap();
    let b = m.generate(&prompt, &opts, &mut |_| true).unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.ids.len(), 8);

    // Greedy continuation of the raw reference prompt is " Paris.\n\nThe answer is: 2": stop at ".".
    let c = case("raw_base");
    let prompt = m.encode(c["prompt"].as_str().unwrap(), false).unwrap();
    let mut streamed = String::new();
    let out = m
        .generate(
            &prompt,
            &GenerateOptions {
                stop: vec!["\n\nThe".into()],
                ..greedy(10)
            },
            &mut |ev| {
                streamed.push_str(ev.text);
                true
            },
        )
        .unwrap();
    assert_eq!(out.text, " Paris.");
    assert_eq!(streamed, " Paris.");
    assert_eq!(out.stop_reason, StopReason::Stop("\n\nThe".into()));

    let mut n = 0;
    let out = m
        .generate(&prompt, &greedy(10), &mut |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::Aborted);
    assert_eq!(out.ids.len(), 3);
}

#[test]
fn bad_requests_are_typed_errors() {
    let m = smollm();
    let prompt = m.encode("The capital of France is", false).unwrap();
    let e = m
        .generate(
            &prompt,
            &GenerateOptions {
                context: 3,
                ..greedy(4)
            },
            &mut |_| true,
        )
        .unwrap_err();
    assert_eq!(
        e,
        Error::ContextOverflow {
            tokens: 5,
            context: 3
        }
    );
    // A full context ends the answer; it never runs past the cache.
    let out = m
        .generate(
            &prompt,
            &GenerateOptions {
                context: 7,
                ..greedy(10)
            },
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::ContextFull);
    assert_eq!(out.ids.len(), 3);
    for t in [0.0, f32::NAN, -1.0] {
        let e = m
            .generate(
                &prompt,
                &GenerateOptions {
                    sampler: SamplerConfig {
                        temperature: t,
                        ..Default::default()
                    },
                    ..greedy(2)
                },
                &mut |_| true,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{t}: {e}");
    }
    let e = m.generate(&[], &greedy(2), &mut |_| true).unwrap_err();
    assert!(matches!(e, Error::InvalidQuery(_)));
    let mut cache = m.new_cache(8).unwrap();
    let e = m.forward(&mut cache, &[49_152], false).unwrap_err();
    assert!(matches!(e, Error::InvalidQuery(_)), "{e}");
}

// ---- A tiny generated model: every truncation, hostile headers, hostile templates ----

fn load_err(bytes: Vec<u8>) -> String {
    match Model::from_bytes(bytes) {
        Ok(_) => panic!("a bad file loaded"),
        Err(e) => {
            assert!(
                matches!(e, Error::Model { .. } | Error::Template(_)),
                "{e:?}"
            );
            e.to_string()
        }
    }
}

#[test]
fn the_tiny_model_runs_and_every_truncation_is_refused() {
    let file = tiny(|_, _| {});
    let m = Model::from_bytes(file.clone()).unwrap();
    let prompt = m
        .chat_prompt(&[Message {
            role: "user".into(),
            content: "say the 3 tests".into(),
        }])
        .unwrap();
    assert_eq!(prompt[0], 258, "<|im_start|> parsed as its control token");
    assert!(
        prompt.contains(&257),
        "the merge Ġt + h gives Ġth: {prompt:?}"
    );
    let out = m.generate(&prompt, &greedy(5), &mut |_| true).unwrap();
    assert!(!out.ids.is_empty());
    // Batched prefill and one-at-a-time decoding compute the same logits.
    let mut c1 = m.new_cache(64).unwrap();
    let all = m.forward(&mut c1, &prompt, true).unwrap();
    let mut c2 = m.new_cache(64).unwrap();
    let nv = m.config().n_vocab;
    for (i, &t) in prompt.iter().enumerate() {
        let one = m.forward(&mut c2, &[t], false).unwrap();
        for (a, b) in one.iter().zip(&all[i * nv..(i + 1) * nv]) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "position {i}: {a} vs {b}"
            );
        }
    }
    for len in 0..file.len() {
        load_err(file[..len].to_vec());
    }
}

fn header_with(kv: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.str("general.architecture", "llama");
    kv(&mut w);
    w.to_bytes()
}

#[test]
fn hostile_headers_are_refused_before_allocating() {
    // A string claiming 2^40 bytes.
    let e = load_err(header_with(|w| {
        w.raw("x", 8, (1u64 << 40).to_le_bytes().to_vec());
    }));
    assert!(e.contains("over the cap"), "{e}");
    // An array claiming 2^31 elements.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend((1u64 << 31).to_le_bytes());
    let e = load_err(header_with(|w| {
        w.raw("x", 9, arr);
    }));
    assert!(e.contains("over the cap"), "{e}");
    // An array claiming more elements than the bytes left can hold.
    let mut arr = 10u32.to_le_bytes().to_vec();
    arr.extend(1000u64.to_le_bytes());
    let e = load_err(header_with(|w| {
        w.raw("x", 9, arr);
    }));
    assert!(e.contains("truncated"), "{e}");
    let e = load_err(header_with(|w| {
        w.u32("general.alignment", 0);
    }));
    assert!(e.contains("alignment"), "{e}");
    let e = load_err(header_with(|w| {
        w.raw("x", 77, vec![0; 8]);
    }));
    assert!(e.contains("unknown metadata value type"), "{e}");

    let e = load_err(tiny(|_, t| t[0].1 = vec![32, 1, 1, 1, 1]));
    assert!(e.contains("dimensions"), "{e}");
    let e = load_err(tiny(|_, t| t[1].2 = GgmlType::Q4_K));
    assert!(e.contains("multiple of"), "{e}");
    let e = load_err(tiny(|w, _| {
        w.u32("llama.attention.head_count", 0);
    }));
    assert!(e.contains("head_count"), "{e}");
    let e = load_err(tiny(|_, t| t[0].1 = vec![32, 200]));
    assert!(e.contains("vocabulary"), "{e}");
    let e = load_err(tiny(|_, t| t.retain(|x| x.0 != "blk.1.ffn_up.weight")));
    assert!(e.contains("blk.1.ffn_up.weight is missing"), "{e}");

    // Tensor offsets: past the end, misaligned, overlapping (patched into a valid file's tensor table).
    let file = tiny(|_, _| {});
    let g = lorag::llm::Gguf::parse(&file, Default::default()).unwrap();
    let name = b"output_norm.weight";
    let at = file.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // name | n_dims u32 | dims u64… | type u32 | offset u64
    let off_at = at + 4 + 8 + 4;
    let patch = |v: u64| {
        let mut f = file.clone();
        f[off_at..off_at + 8].copy_from_slice(&v.to_le_bytes());
        f
    };
    let data_len = (file.len() - g.data_start) as u64;
    assert!(load_err(patch(data_len + 32)).contains("truncated"));
    assert!(load_err(patch(1)).contains("aligned"));
    assert!(load_err(patch(0)).contains("overlap"));
    // An unknown quantization type.
    let mut f = file.clone();
    f[off_at - 4..off_at].copy_from_slice(&99u32.to_le_bytes());
    assert!(load_err(f).contains("type 99"));
}

#[test]
fn hostile_chat_templates_hit_the_limits() {
    for (src, what) in [
        ("{% for i in range(100000000) %}x{% endfor %}", "a loop that never ends"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "megabytes of output",
        ),
        ("{{ raise_exception('no system role') }}", "a raised exception"),
    ] {
        let m = Model::from_bytes(tiny_t(src, |_, _| {}))
            .expect("a template that only fails when rendered loads");
        let e = m
            .chat_prompt(&[Message {
                role: "user".into(),
                content: "hi".into(),
            }])
            .unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{what}: {e}");
    }
    let e = load_err(tiny_t("{% for %}", |_, _| {}));
    assert!(e.contains("template"), "{e}");
}

#[test]
fn qwen2_neox_rope_and_biases() {
    let llama = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 % 256) as u32).collect();
    let logits = |m: &Model| {
        let mut c = m.new_cache(32).unwrap();
        m.forward(&mut c, &prompt, true).unwrap()
    };
    let want = logits(&llama);
    // Zero biases: rotating halves of Hugging Face-ordered rows is rotating pairs of GGUF-ordered rows, and q·k
    // is the same sum in another order, so every logit agrees to rounding.
    let qwen = Model::from_bytes(tiny_as_qwen2(|_, _| 0.0)).unwrap();
    assert_eq!(qwen.config().arch, lorag::llm::Arch::Qwen2);
    for (a, b) in logits(&qwen).iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
    // A bias on v is used: the logits move.
    let biased = Model::from_bytes(tiny_as_qwen2(|n, i| {
        if n.contains("attn_v") {
            0.1 * (i as f32 + 1.0)
        } else {
            0.0
        }
    }))
    .unwrap();
    let moved = logits(&biased)
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "a v bias changed nothing");
    // Biases on q and k: the first position attends only to itself (softmax of one score is 1), so its logits
    // cannot depend on q or k; later positions' do.
    let kq = Model::from_bytes(tiny_as_qwen2(|n, i| {
        if n.contains("attn_v") {
            0.0
        } else {
            0.3 * (i as f32 - 4.0)
        }
    }))
    .unwrap();
    let got = logits(&kq);
    let nv = llama.config().n_vocab;
    for (a, b) in got[..nv].iter().zip(&want[..nv]) {
        assert!(
            (a - b).abs() <= 1e-4,
            "position 0 with q/k biases: {a} vs {b}"
        );
    }
    assert!(
        got[nv..]
            .iter()
            .zip(&want[nv..])
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "q/k biases unused"
    );
}

#[test]
fn decoding_with_int16_activations_stays_on_the_reference() {
    // Feed each prompt one token at a time: every step takes the decoding path (activations quantized to int16
    // per 32-element block, integer dot products); the last step's top-5 must still be the reference's.
    let mut m = smollm();
    for name in ["raw_base", "chat_base"] {
        let c = case(name);
        let prompt = ids(&c["prompt_ids"]);
        let top = |m: &Model| {
            let mut cache = m.new_cache(prompt.len()).unwrap();
            let mut logits = Vec::new();
            for &t in &prompt {
                logits = m.forward(&mut cache, &[t], false).unwrap();
            }
            lorag::llm::sampler::top_k(&logits, 5)
        };
        m.weights.int_acts = true;
        check_top5(&top(&m), &c["top5_next"]);
        m.weights.int_acts = false;
        check_top5(&top(&m), &c["top5_next"]);
    }
}
