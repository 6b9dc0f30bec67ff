//! LoRA adapters against independent references: the synthetic SmolLM2 adapter's reference logits
//! (../shared/reference: a float64 numpy forward with the adapter merged into dequantized weights), and on a tiny
//! generated llama, a model whose weights have the update merged in (`W + s·B·A`, written by the test) and the
//! model's Qwen2 twin (Hugging Face row order, NeoX RoPE: no permutation of the adapter needed). Hostile adapter
//! files: typed errors, and the base and resident adapters keep working. Training (`mod training`): gradients
//! against finite differences, learning, export, resume. Natively and in wasm.

use crate::common;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use common::reference::{case, ids};
use common::tiny::{random_adapter, rewrite, tiny, tiny_as_qwen2};
use lorag::llm::gguf::GgufWriter;
use lorag::llm::quant::GgmlType;
use lorag::llm::safetensors::{self as st, SafeTensors};
use lorag::llm::{
    Adapter, AdapterFormat, AdapterUse, GenerateOptions, Model, SamplerConfig, Target,
};
use lorag::Error;

use common::{PEFT_CONFIG, PEFT_WEIGHTS, SMOLLM};
const GGUF_LORA: &[u8] = include_bytes!(
    "../../shared/reference/lora-synthetic-smollm2/smollm2-135m-synthetic-lora-f32.gguf"
);

fn smollm() -> Model {
    Model::from_bytes(SMOLLM.to_vec()).expect("SmolLM2 loads")
}

fn uses(list: &[(&str, f32)]) -> Vec<AdapterUse> {
    list.iter()
        .map(|&(name, weight)| AdapterUse {
            name: name.into(),
            weight,
        })
        .collect()
}

fn opts(max_tokens: usize, adapters: &[(&str, f32)]) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        top_logits: 5,
        adapters: uses(adapters),
        ..Default::default()
    }
}

/// Logits of every position of `prompt` with `adapters` applied.
fn logits(m: &Model, prompt: &[u32], adapters: &[(&str, f32)]) -> Vec<f32> {
    let active = m.active_adapters(&uses(adapters)).unwrap();
    let mut c = m.new_cache(prompt.len()).unwrap();
    m.forward_with(&mut c, prompt, true, &active).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_synthetic_adapter_in_both_formats_gives_the_reference_logits() {
    let mut m = smollm();
    let peft = m.adapter_from_peft(PEFT_CONFIG, PEFT_WEIGHTS).unwrap();
    let gguf = m.adapter_from_gguf(GGUF_LORA).unwrap();
    for a in [&peft, &gguf] {
        let info = a.info();
        assert_eq!(info.targets, [Target::Q, Target::V]);
        assert_eq!((info.rank, info.layers), ((8, 8), 30));
    }
    assert_eq!(peft.format, AdapterFormat::Peft);
    m.add_adapter("peft", peft).unwrap();
    m.add_adapter("gguf", gguf).unwrap();
    let c = case("raw_lora_synthetic");
    let prompt = ids(&c["prompt_ids"]);
    assert_eq!(
        m.encode(c["prompt"].as_str().unwrap(), false).unwrap(),
        prompt
    );
    for name in ["peft", "gguf"] {
        let out = m
            .generate(&prompt, &opts(10, &[(name, 1.0)]), &mut |_| true)
            .unwrap();
        let want = c["top5_next"].as_array().unwrap();
        for (g, w) in out.top_logits.iter().zip(want) {
            assert_eq!(
                g.0 as u64,
                w["id"].as_u64().unwrap(),
                "{name}: {:?}",
                out.top_logits
            );
            let wl = w["logit"].as_f64().unwrap() as f32;
            assert!(
                (g.1 - wl).abs() <= 0.05,
                "{name}: {} vs reference {wl}",
                g.1
            );
        }
        assert_eq!(out.ids, ids(&c["greedy_ids"]), "{name}");
    }
    // The two formats (Hugging Face rows permuted by the loader vs rows already in GGUF order) agree on every
    // logit of every position.
    let d = max_diff(
        &logits(&m, &prompt, &[("peft", 1.0)]),
        &logits(&m, &prompt, &[("gguf", 1.0)]),
    );
    assert!(d <= 1e-3, "PEFT and GGUF-LoRA differ by {d}");
    // And the adapter is what moved the logits off the base reference.
    let base = case("raw_base");
    let out = m.generate(&prompt, &opts(1, &[]), &mut |_| true).unwrap();
    let top = base["top5_next"][0]["logit"].as_f64().unwrap() as f32;
    assert!((out.top_logits[0].1 - top).abs() <= 0.05);
}

#[test]
fn switching_adapters_per_request_equals_a_fresh_generator_with_only_that_adapter() {
    let prompt = ids(&case("raw_base")["prompt_ids"]);
    let load = |m: &mut Model, name: &str| {
        let a = match name {
            "ref" => m.adapter_from_peft(PEFT_CONFIG, PEFT_WEIGHTS).unwrap(),
            _ => random_adapter(&m.weights, &[Target::O, Target::Down], 4, 11, 0.05, 1.0),
        };
        m.add_adapter(name, a).unwrap();
    };
    let mut m = smollm();
    load(&mut m, "ref");
    load(&mut m, "rnd");
    let requests: [&[(&str, f32)]; 5] = [
        &[("ref", 1.0)],
        &[("rnd", 1.0)],
        &[],
        &[("ref", 0.5), ("rnd", 1.0)],
        &[("ref", 1.0)],
    ];
    let mut outs = Vec::new();
    for req in requests {
        let got = m.generate(&prompt, &opts(6, req), &mut |_| true).unwrap();
        let mut fresh = smollm();
        for (name, _) in req {
            load(&mut fresh, name);
        }
        let want = fresh
            .generate(&prompt, &opts(6, req), &mut |_| true)
            .unwrap();
        assert_eq!(got.ids, want.ids, "{req:?}");
        assert_eq!(got.top_logits, want.top_logits, "{req:?}");
        outs.push(got.top_logits);
    }
    assert_ne!(outs[0], outs[1], "two adapters, same logits");
    assert_ne!(outs[1], outs[2], "the random adapter changed nothing");
    // Weight 0 is the base; a zero-weighted adapter beside another changes nothing.
    let zero = m
        .generate(&prompt, &opts(6, &[("ref", 0.0)]), &mut |_| true)
        .unwrap();
    assert_eq!(zero.top_logits, outs[2]);
    let l = |req: &[(&str, f32)]| logits(&m, &prompt, req);
    assert_eq!(l(&[("ref", 0.0), ("rnd", 1.0)]), l(&[("rnd", 1.0)]));
    // Weights add: two halves of an adapter are the adapter.
    let d = max_diff(&l(&[("ref", 0.5), ("ref", 0.5)]), &l(&[("ref", 1.0)]));
    assert!(d <= 1e-3, "{d}");
    assert!(max_diff(&l(&[("ref", 2.0)]), &l(&[("ref", 1.0)])) > 0.1);
    // Removing an adapter leaves the others.
    assert!(m.remove_adapter("rnd"));
    assert!(!m.remove_adapter("rnd"));
    let e = m.active_adapters(&uses(&[("rnd", 1.0)])).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let again = m
        .generate(&prompt, &opts(6, &[("ref", 1.0)]), &mut |_| true)
        .unwrap();
    assert_eq!(again.top_logits, outs[0]);
    let e = m.active_adapters(&uses(&[("ref", f32::NAN)])).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
}

// ---- The tiny llama: every target, PEFT's rsLoRA, rank and alpha patterns, against merged weights ----

const D: usize = 32;

/// (rows, cols) of `target` in the tiny model (32 wide, 4 heads of 8, 2 KV heads, feed-forward 64).
fn tiny_shape(t: Target) -> (usize, usize) {
    match t {
        Target::Q | Target::O => (D, D),
        Target::K | Target::V => (16, D),
        Target::Gate | Target::Up => (64, D),
        Target::Down => (D, 64),
    }
}

/// One adapted matrix in GGUF row order: A (r × cols), B (rows × r), scale.
struct Mat {
    layer: usize,
    t: Target,
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    scale: f64,
}

/// rsLoRA with alpha 6; rank 3 except k (rank_pattern: 2); layer 1's down projection has alpha 1.5
/// (alpha_pattern).
fn tiny_adapter() -> Vec<Mat> {
    let mut rng = common::Rng(99);
    let mut r = move || (rng.below(2001) as f32 - 1000.0) / 2000.0;
    let mut out = Vec::new();
    for layer in 0..2 {
        for t in Target::ALL {
            let (rows, cols) = tiny_shape(t);
            let rank = if t == Target::K { 2 } else { 3 };
            let alpha = if layer == 1 && t == Target::Down {
                1.5
            } else {
                6.0
            };
            out.push(Mat {
                layer,
                t,
                rank,
                a: (0..rank * cols).map(|_| r()).collect(),
                b: (0..rows * rank).map(|_| r()).collect(),
                scale: alpha / (rank as f64).sqrt(),
            });
        }
    }
    out
}

/// The tiny model with `W + s·B·A` merged into every adapted matrix (in f64, stored as f32).
fn merged(mats: &[Mat]) -> Vec<u8> {
    rewrite(&tiny(|_, _| {}), false, |name, _, data| {
        let Some(m) = mats
            .iter()
            .find(|m| name == format!("blk.{}.{}.weight", m.layer, m.t.gguf_name()))
        else {
            return data;
        };
        let (rows, cols) = tiny_shape(m.t);
        let mut w: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for i in 0..rows {
            for j in 0..cols {
                let ba: f64 = (0..m.rank)
                    .map(|k| m.b[i * m.rank + k] as f64 * m.a[k * cols + j] as f64)
                    .sum();
                w[i * cols + j] = (w[i * cols + j] as f64 + m.scale * ba) as f32;
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    })
    .to_bytes()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The adapter as GGUF-LoRA. One file has one alpha (scale alpha / rank), so alpha is 1 and each B is
/// pre-multiplied by scale · rank to carry its own scale.
fn tiny_gguf_lora(mats: &[Mat]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.str("general.architecture", "llama")
        .str("general.type", "adapter")
        .str("adapter.type", "lora")
        .f32("adapter.lora.alpha", 1.0);
    for m in mats {
        let (rows, cols) = tiny_shape(m.t);
        let stem = format!("blk.{}.{}.weight", m.layer, m.t.gguf_name());
        let k = (m.scale * m.rank as f64) as f32;
        let b: Vec<f32> = m.b.iter().map(|x| x * k).collect();
        w.tensor(
            &format!("{stem}.lora_a"),
            &[cols as u64, m.rank as u64],
            GgmlType::F32,
            f32_bytes(&m.a),
        );
        w.tensor(
            &format!("{stem}.lora_b"),
            &[m.rank as u64, rows as u64],
            GgmlType::F32,
            f32_bytes(&b),
        );
    }
    w.to_bytes()
}

/// Rows of q/k B in Hugging Face order (the inverse of llama.cpp's permute): GGUF row h·8 + 2i + c is Hugging
/// Face row h·8 + 4c + i.
fn to_hf_rows(b: &[f32], rows: usize, rank: usize) -> Vec<f32> {
    let mut out = vec![0.0; b.len()];
    for g in 0..rows {
        let (h, j) = (g / 8, g % 8);
        let hf = h * 8 + (j % 2) * 4 + j / 2;
        out[hf * rank..(hf + 1) * rank].copy_from_slice(&b[g * rank..(g + 1) * rank]);
    }
    out
}

fn tiny_peft(mats: &[Mat]) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": true,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"layers.1.mlp.down_proj": 1.5},
    });
    let mut tensors = Vec::new();
    let mut bs = Vec::new();
    for m in mats {
        let (rows, _) = tiny_shape(m.t);
        bs.push(match m.t {
            Target::Q | Target::K => to_hf_rows(&m.b, rows, m.rank),
            _ => m.b.clone(),
        });
    }
    for (m, b) in mats.iter().zip(&bs) {
        let (rows, cols) = tiny_shape(m.t);
        let key = format!(
            "base_model.model.model.layers.{}.{}",
            m.layer,
            m.t.peft_path()
        );
        tensors.push((format!("{key}.lora_A.weight"), vec![m.rank, cols], &m.a[..]));
        tensors.push((format!("{key}.lora_B.weight"), vec![rows, m.rank], &b[..]));
    }
    (
        serde_json::to_vec(&config).unwrap(),
        st::write_f32(&tensors, &[("format", "pt")]),
    )
}

#[test]
fn every_target_equals_the_merged_weights_on_a_tiny_llama() {
    let mats = tiny_adapter();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 % 256) as u32).collect();
    let want = {
        let m = Model::from_bytes(merged(&mats)).unwrap();
        logits(&m, &prompt, &[])
    };
    let base = logits(&Model::from_bytes(tiny(|_, _| {})).unwrap(), &prompt, &[]);
    assert!(max_diff(&base, &want) > 0.1, "the adapter barely matters");
    let (config, weights) = tiny_peft(&mats);
    let mut m = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let gguf = m.adapter_from_gguf(&tiny_gguf_lora(&mats)).unwrap();
    let peft = m.adapter_from_peft(&config, &weights).unwrap();
    assert_eq!(peft.info().rank, (2, 3));
    assert_eq!(peft.info().targets.len(), 7);
    m.add_adapter("gguf", gguf).unwrap();
    m.add_adapter("peft", peft).unwrap();
    for name in ["gguf", "peft"] {
        let got = logits(&m, &prompt, &[(name, 1.0)]);
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: {d} from the merged model");
        // One token at a time (the decoding path) too.
        let active = m.active_adapters(&uses(&[(name, 1.0)])).unwrap();
        let mut c = m.new_cache(prompt.len()).unwrap();
        let nv = m.config().n_vocab;
        for (i, &t) in prompt.iter().enumerate() {
            let one = m.forward_with(&mut c, &[t], false, &active).unwrap();
            let d = max_diff(&one, &want[i * nv..(i + 1) * nv]);
            assert!(d <= 1e-4, "{name} position {i}: {d}");
        }
    }
    // The same PEFT file on the Qwen2 twin (Hugging Face rows, NeoX RoPE, zero biases): no permutation, same
    // model, same logits. This checks the loader's q/k permutation without using its formula.
    let mut qwen = Model::from_bytes(tiny_as_qwen2(|_, _| 0.0)).unwrap();
    let a = qwen.adapter_from_peft(&config, &weights).unwrap();
    qwen.add_adapter("peft", a).unwrap();
    let d = max_diff(&logits(&qwen, &prompt, &[("peft", 1.0)]), &want);
    assert!(d <= 1e-4, "Qwen2 twin: {d}");
    // Without the permutation the llama result would be wrong: applying the PEFT file's B rows as they are
    // moves the logits.
    let raw: Vec<Mat> = tiny_adapter()
        .into_iter()
        .map(|mut m| {
            if matches!(m.t, Target::Q | Target::K) {
                m.b = to_hf_rows(&m.b, tiny_shape(m.t).0, m.rank);
            }
            m
        })
        .collect();
    let unpermuted = tiny_gguf_lora(&raw);
    let wrong = m.adapter_from_gguf(&unpermuted).unwrap();
    m.add_adapter("wrong", wrong).unwrap();
    assert!(max_diff(&logits(&m, &prompt, &[("wrong", 1.0)]), &want) > 1e-2);
}

// ---- Hostile adapters: a typed error naming the problem; the base and resident adapters unharmed ----

fn adapter_err(r: lorag::Result<Adapter>, needle: &str) {
    match r {
        Ok(_) => panic!("a bad adapter loaded (expected {needle:?})"),
        Err(e) => {
            assert!(
                matches!(e, Error::Adapter { .. } | Error::ResourceLimit { .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains(needle), "{e} (expected {needle:?})");
        }
    }
}

/// The reference safetensors with its header edited by `f` (data unchanged).
fn edit_header(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let n = u64::from_le_bytes(PEFT_WEIGHTS[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&PEFT_WEIGHTS[8..8 + n]).unwrap();
    f(&mut h);
    let h = serde_json::to_vec(&h).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&PEFT_WEIGHTS[8 + n..]);
    out
}

/// The reference tensors, edited by `f`, written again.
fn edit_tensors(f: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> Vec<u8> {
    let s = SafeTensors::parse(PEFT_WEIGHTS, Default::default()).unwrap();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = s
        .tensors
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone(), st::to_f32(e, PEFT_WEIGHTS)))
        .collect();
    f(&mut t);
    let refs: Vec<(String, Vec<usize>, &[f32])> = t
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), &v[..]))
        .collect();
    st::write_f32(&refs, &[])
}

fn config_with(edit: serde_json::Value) -> Vec<u8> {
    let mut c: serde_json::Value = serde_json::from_slice(PEFT_CONFIG).unwrap();
    for (k, v) in edit.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

#[test]
fn hostile_adapters_are_refused_and_nothing_is_lost() {
    let mut m = smollm();
    let prompt = ids(&case("raw_base")["prompt_ids"]);
    let good = m.adapter_from_peft(PEFT_CONFIG, PEFT_WEIGHTS).unwrap();
    m.add_adapter("ref", good).unwrap();
    let run =
        |m: &Model, a: &[(&str, f32)]| m.generate(&prompt, &opts(3, a), &mut |_| true).unwrap();
    let (base0, ref0) = (run(&m, &[]).top_logits, run(&m, &[("ref", 1.0)]).top_logits);

    let peft = |w: &[u8]| m.adapter_from_peft(PEFT_CONFIG, w);
    let n = u64::from_le_bytes(PEFT_WEIGHTS[..8].try_into().unwrap()) as usize;
    // Truncated anywhere: in the length, the header, or the data.
    for cut in [
        0,
        5,
        8,
        9,
        100,
        8 + n - 1,
        8 + n,
        8 + n + 1000,
        PEFT_WEIGHTS.len() - 1,
    ] {
        assert!(peft(&PEFT_WEIGHTS[..cut]).is_err(), "cut at {cut}");
    }
    adapter_err(peft(&PEFT_WEIGHTS[..5]), "too short");
    adapter_err(peft(&PEFT_WEIGHTS[..100]), "truncated");
    adapter_err(
        peft(&PEFT_WEIGHTS[..PEFT_WEIGHTS.len() - 1]),
        "not a range inside",
    );
    // Bytes after the last tensor (a hole no tensor owns).
    let mut long = PEFT_WEIGHTS.to_vec();
    long.extend([0; 4]);
    adapter_err(peft(&long), "cover");
    // Oversized header length.
    let mut big = PEFT_WEIGHTS.to_vec();
    big[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    adapter_err(peft(&big), "limit");
    // Overlapping offsets, and a hole.
    let first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let second = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    adapter_err(
        peft(&edit_header(|h| {
            h[second]["data_offsets"] = h[first]["data_offsets"].clone();
        })),
        "overlap",
    );
    // Unknown and unsupported dtypes.
    adapter_err(
        peft(&edit_header(|h| h[first]["dtype"] = "Q4".into())),
        "unknown dtype",
    );
    adapter_err(
        peft(&edit_header(|h| h[first]["dtype"] = "F64".into())),
        "not supported",
    );
    adapter_err(
        peft(&edit_header(|h| {
            h[first]["shape"] = serde_json::json!([8, 577])
        })),
        "needs",
    );
    // Wrong shapes against the base: v's B with q's row count.
    let v_b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    adapter_err(
        peft(&edit_tensors(|t| {
            let e = t.iter_mut().find(|e| e.0 == v_b).unwrap();
            e.1 = vec![576, 8];
            e.2 = vec![0.01; 576 * 8];
        })),
        "base's attn_v is 192×576",
    );
    // Rank 0 (config and tensors), NaN and infinite alpha, rank against the config.
    adapter_err(
        m.adapter_from_peft(&config_with(serde_json::json!({"r": 0})), PEFT_WEIGHTS),
        "not a rank",
    );
    adapter_err(
        peft(&edit_tensors(|t| {
            for e in t
                .iter_mut()
                .filter(|e| e.0.contains("layers.3.self_attn.q_proj"))
            {
                e.1 = if e.0.contains("lora_A") {
                    vec![0, 576]
                } else {
                    vec![576, 0]
                };
                e.2.clear();
            }
        })),
        "rank 0",
    );
    let nan = String::from_utf8(PEFT_CONFIG.to_vec())
        .unwrap()
        .replace("\"lora_alpha\": 16", "\"lora_alpha\": NaN");
    assert!(nan.contains("NaN"));
    adapter_err(
        m.adapter_from_peft(nan.as_bytes(), PEFT_WEIGHTS),
        "adapter_config.json",
    );
    adapter_err(
        m.adapter_from_peft(&config_with(serde_json::json!({"r": 16})), PEFT_WEIGHTS),
        "r = 16",
    );
    // Targets the base does not have, or that lorag refuses by name.
    adapter_err(
        m.adapter_from_peft(
            &config_with(serde_json::json!({"target_modules": ["q_proj", "c_attn"]})),
            PEFT_WEIGHTS,
        ),
        "c_attn",
    );
    adapter_err(
        m.adapter_from_peft(
            &config_with(serde_json::json!({"target_modules": ["q_proj", "lm_head"]})),
            PEFT_WEIGHTS,
        ),
        "lm_head",
    );
    adapter_err(
        m.adapter_from_peft(
            &config_with(serde_json::json!({"target_modules": ["q_proj"]})),
            PEFT_WEIGHTS,
        ),
        "target_modules",
    );
    adapter_err(
        m.adapter_from_peft(
            &config_with(serde_json::json!({"use_dora": true})),
            PEFT_WEIGHTS,
        ),
        "DoRA",
    );
    adapter_err(
        peft(&edit_tensors(|t| {
            t.push((
                "base_model.model.lm_head.lora_A.weight".into(),
                vec![8, 576],
                vec![0.0; 8 * 576],
            ));
        })),
        "lm_head",
    );
    adapter_err(
        peft(&edit_tensors(|t| {
            for e in t.iter_mut() {
                e.0 = e.0.replace("layers.29.", "layers.30.");
            }
        })),
        "layer 30 does not exist",
    );
    adapter_err(
        peft(&edit_tensors(|t| {
            t.retain(|e| e.0 != v_b);
        })),
        "only one of",
    );
    adapter_err(
        peft(&edit_tensors(|t| {
            t[3].2[5] = f32::NAN;
        })),
        "NaN",
    );
    // An adapter made for another base, both ways round.
    let mut tiny_m = Model::from_bytes(tiny(|_, _| {})).unwrap();
    adapter_err(
        tiny_m.adapter_from_peft(PEFT_CONFIG, PEFT_WEIGHTS),
        "another model",
    );
    let tiny_lora = tiny_gguf_lora(&tiny_adapter());
    adapter_err(m.adapter_from_gguf(&tiny_lora), "another model");
    let foreign = random_adapter(&tiny_m.weights, &[Target::Q], 2, 5, 0.1, 1.0);
    tiny_m.add_adapter("ok", foreign.clone()).unwrap();
    let e = m.add_adapter("ref", foreign).unwrap_err();
    assert!(matches!(e, Error::Adapter { .. }), "{e}");
    // GGUF-LoRA: not an adapter, another architecture, NaN alpha, a model file, every truncation.
    let gguf_with = |alpha: f32, ty: &str, arch: &str| {
        let mut w = rewrite(GGUF_LORA, false, |_, _, d| d);
        w.f32("adapter.lora.alpha", alpha)
            .str("general.type", ty)
            .str("general.architecture", arch);
        w.to_bytes()
    };
    assert!(m
        .adapter_from_gguf(&gguf_with(16.0, "adapter", "llama"))
        .is_ok());
    adapter_err(
        m.adapter_from_gguf(&gguf_with(f32::NAN, "adapter", "llama")),
        "not finite",
    );
    adapter_err(
        m.adapter_from_gguf(&gguf_with(16.0, "model", "llama")),
        "not a LoRA adapter",
    );
    adapter_err(
        m.adapter_from_gguf(&gguf_with(16.0, "adapter", "qwen2")),
        "qwen2",
    );
    adapter_err(m.adapter_from_gguf(SMOLLM), "not a LoRA adapter");
    adapter_err(m.adapter_from_bytes(GGUF_LORA, Some(PEFT_CONFIG)), "GGUF");
    adapter_err(
        m.adapter_from_bytes(PEFT_WEIGHTS, None),
        "adapter_config.json",
    );
    let step = if cfg!(target_arch = "wasm32") {
        997
    } else {
        101
    };
    for cut in (0..GGUF_LORA.len()).step_by(step) {
        assert!(
            m.adapter_from_gguf(&GGUF_LORA[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // Nothing was lost.
    assert_eq!(run(&m, &[]).top_logits, base0);
    assert_eq!(run(&m, &[("ref", 1.0)]).top_logits, ref0);
    assert_eq!(m.adapters().count(), 1);
}

#[test]
fn an_adapter_written_as_gguf_lora_loads_back_with_the_same_products() {
    let m = Model::from_bytes(tiny(|_, _| {})).unwrap();
    let (config, weights) = tiny_peft(&tiny_adapter());
    let a = m.adapter_from_peft(&config, &weights).unwrap();
    let b = m.adapter_from_gguf(&a.to_gguf(m.config().arch)).unwrap();
    for l in 0..2 {
        for t in Target::ALL {
            let (x, y) = (a.get(l, t).unwrap(), b.get(l, t).unwrap());
            assert_eq!((x.rank, &x.a), (y.rank, &y.a));
            for (p, q) in x.bt.iter().zip(&y.bt) {
                let (p, q) = (p * x.scale, q * y.scale);
                assert!(
                    (p - q).abs() <= 1e-6 * (1.0 + p.abs()),
                    "{l} {t:?}: {p} vs {q}"
                );
            }
        }
    }
}

/// LoRA training: the analytic gradients of the backward pass against central finite differences of the loss,
/// on a tiny generated llama (and its Qwen2 twin: biases, NeoX RoPE), every target adapted, with and without
/// dropout; a behaviour learned and exported in PEFT form; checkpoints. Natively and in wasm.
mod training {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::common::tiny::{tiny, tiny_as_qwen2};
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
        let (l, n) =
            loss_and_grad(&model.weights, model.bytes(), &mut p, &seq, false, None).unwrap();
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
            "cats", "dogs", "bread", "rain", "maps", "glue", "jazz", "kites", "salt", "wood",
            "ink", "fog", "corn", "milk", "bees", "wind", "tea", "soap", "iron", "owls", "rice",
            "moss", "silk", "wax",
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
        // Cut anywhere, or with a byte changed in its header: a typed error, never a panic.
        let ck = first.checkpoint();
        for cut in (0..ck.len()).step_by(ck.len() / 97 + 1) {
            assert!(
                Trainer::resume(&model, &examples, &ck[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let header = u64::from_le_bytes(ck[..8].try_into().unwrap()) as usize + 8;
        for at in (8..header).step_by(7) {
            let mut bad = ck.clone();
            bad[at] ^= 0x5a;
            let _ = Trainer::resume(&model, &examples, &bad); // Ok (a harmless byte) or Err, never a panic
        }
    }

    #[test]
    fn threads_do_not_change_the_result() {
        let model = Model::from_bytes(tiny(|_, _| {})).unwrap();
        let examples = parse_examples(
            &signoff_data(&["cats", "dogs", "bread", "rain", "maps"]),
            100,
        )
        .unwrap();
        let lora = LoraConfig {
            rank: 2,
            dropout: 0.1,
            ..Default::default()
        };
        let run = |threads: usize| {
            let cfg = TrainConfig {
                lr: 1e-2,
                epochs: 1,
                batch_size: 3,
                threads,
                ..Default::default()
            };
            let mut t = Trainer::new(&model, &examples, &lora, cfg).unwrap();
            let mut evals = vec![];
            t.run(&model, &mut |p| {
                evals.push((p.loss, p.eval_loss));
                true
            })
            .unwrap();
            (t.params.mats, evals)
        };
        let (one, e1) = run(1);
        let (three, e3) = run(3);
        assert_eq!(e1, e3);
        for (a, b) in one.iter().zip(&three) {
            assert_eq!(a.m.a, b.m.a);
            assert_eq!(a.m.bt, b.m.bt);
        }
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

    /// Against PyTorch + PEFT (tests/fixtures/peft-train-smollm2.*, written by scripts/peft-reference.py):
    /// SmolLM2 loaded from the same GGUF by transformers, LoRA r 8 on q,v with the same start (A as
    /// `LoraParams::init` draws it, checked bit for bit; B from SplitMix64 seed 2 in Hugging Face row order), three
    /// conversations, three AdamW steps (lr 1e-3, weight decay 0.1, clipping at norm 1).
    #[test]
    #[cfg(not(target_arch = "wasm32"))] // ~half a minute of f32 training: natively only
    fn matches_pytorch_peft() {
        use lorag::llm::lora::hf_rows_to_gguf;
        use lorag::llm::safetensors::{self as st, SafeTensors};
        use lorag::llm::train::AdamW;

        const JSON: &str = include_str!("fixtures/peft-train-smollm2.json");
        const TENSORS: &[u8] = include_bytes!("fixtures/peft-train-smollm2.safetensors");
        let golden: serde_json::Value = serde_json::from_str(JSON).unwrap();
        let tensors = SafeTensors::parse(TENSORS, Default::default()).unwrap();
        let tensor = |name: &str| st::to_f32(tensors.get(name).expect(name), TENSORS);
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };

        let model = super::smollm();
        let w = &model.weights;
        let lora = LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::V],
            seed: 1,
            ..Default::default()
        };
        let mut p = LoraParams::init(w, &lora).unwrap();
        let mut rb = Rng::new(2);
        let amp = golden["init"]["b_amp"].as_f64().unwrap() as f32;
        for m in &mut p.mats {
            let (rows, r) = (m.m.rows, m.m.rank);
            let hf: Vec<f32> = (0..rows * r)
                .map(|_| (rb.uniform() * 2.0 - 1.0) * amp)
                .collect();
            let b = if m.target == Target::Q {
                hf_rows_to_gguf(&hf, rows, r, w.cfg.n_head)
            } else {
                hf
            };
            for j in 0..r {
                for row in 0..rows {
                    m.m.bt[j * rows + row] = b[row * r + j];
                }
            }
        }
        // The start is the reference's, exactly.
        // A and B of layers 0 and 29 in Hugging Face order, read from the adapter as the PEFT export writes it.
        type Pairs = Vec<((usize, Target), (Vec<f32>, Vec<f32>))>;
        let exported = |p: &LoraParams| -> Pairs {
            let (_, bytes) = p.to_peft(w, "SmolLM2");
            let s = SafeTensors::parse(&bytes, Default::default()).unwrap();
            let get = |m: &lorag::llm::train::TrainMat, ab: &str| {
                let name = format!(
                    "base_model.model.model.layers.{}.{}.lora_{ab}.weight",
                    m.layer,
                    m.target.peft_path()
                );
                st::to_f32(s.get(&name).expect("exported"), &bytes)
            };
            p.mats
                .iter()
                .filter(|m| [0, 29].contains(&m.layer))
                .map(|m| ((m.layer, m.target), (get(m, "A"), get(m, "B"))))
                .collect()
        };
        let stem = |(layer, target): (usize, Target)| {
            let t = if target == Target::Q {
                "q_proj"
            } else {
                "v_proj"
            };
            format!("layers.{layer}.{t}")
        };
        for (m, (a, b)) in exported(&p) {
            assert_eq!(
                a,
                tensor(&format!("{}.lora_A.init", stem(m))),
                "{}",
                stem(m)
            );
            assert_eq!(
                b,
                tensor(&format!("{}.lora_B.init", stem(m))),
                "{}",
                stem(m)
            );
        }

        let seqs: Vec<Sequence> = golden["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Sequence {
                ids: s["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
                loss: s["loss"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_bool().unwrap())
                    .collect(),
            })
            .collect();
        let n_tok: usize = seqs.iter().map(|s| s.loss_tokens()).sum();
        assert_eq!(n_tok as u64, golden["loss_tokens"].as_u64().unwrap());
        let o = &golden["optimizer"];
        let cfg = lorag::llm::train::TrainConfig {
            lr: o["lr"].as_f64().unwrap() as f32,
            weight_decay: o["weight_decay"].as_f64().unwrap() as f32,
            max_grad_norm: o["max_grad_norm"].as_f64().unwrap() as f32,
            ..Default::default()
        };
        let batch_loss = |p: &mut LoraParams, grad: bool| -> f64 {
            let mut sum = 0.0;
            for s in &seqs {
                sum += loss_and_grad(w, model.bytes(), p, s, grad, None).unwrap().0;
            }
            sum / n_tok as f64
        };
        let start = p.clone();
        let mut adam = AdamW::default();
        let (want_loss, want_norm) = (floats(&golden["losses"]), floats(&golden["grad_norms"]));
        for step in 0..want_loss.len() {
            p.zero_grad();
            let loss = batch_loss(&mut p, true);
            let norm = adam.step(&mut p, &cfg, cfg.lr, 1.0 / n_tok as f32) as f64;
            eprintln!(
                "step {step}: loss {loss:.6} (PEFT {:.6}), gradient norm {norm:.6} (PEFT {:.6})",
                want_loss[step], want_norm[step]
            );
            assert!((loss - want_loss[step]).abs() < 1e-3, "step {step} loss");
            assert!(
                (norm - want_norm[step]).abs() < 1e-3 * want_norm[step],
                "step {step} gradient norm"
            );
        }
        let final_loss = batch_loss(&mut p, false);
        let want_final = golden["final_loss"].as_f64().unwrap();
        eprintln!("after: loss {final_loss:.6} (PEFT {want_final:.6})");
        assert!((final_loss - want_final).abs() < 1e-3, "loss after 3 steps");

        // The weights after three steps.
        let mut worst = (0.0f32, String::new());
        let (mut off, mut total) = (0usize, 0usize);
        for (m, (a, b)) in exported(&p) {
            for (which, got) in [("A", a), ("B", b)] {
                let want = tensor(&format!("{}.lora_{which}.final", stem(m)));
                for (g, e) in got.iter().zip(&want) {
                    let d = (g - e).abs();
                    total += 1;
                    if d > 1e-2 * cfg.lr {
                        off += 1;
                    }
                    if d > worst.0 {
                        worst = (d, format!("{} {which}", stem(m)));
                    }
                }
            }
        }
        eprintln!(
            "largest weight difference after 3 steps: {:.3e} ({}); {off} of {total} differ by more than 1% of lr",
            worst.0, worst.1
        );
        // Tolerance: Adam moves an element by about lr·m̂/√v̂ whatever the gradient's size, so an element whose
        // gradient is near zero (of the order of the difference between two f32 evaluations) may move differently
        // on each side, by up to a few lr. The rest must agree to 1% of lr: at most 1% of the elements may not
        // (0.25% do here); the matrices' changes as a whole agree to 1e-3 relative (2.3e-4 here).
        assert!(
            off * 100 <= total,
            "{off} of {total} weights differ by more than 1% of lr"
        );
        // Every adapter matrix's change (an L2 norm: the row order does not matter).
        let mut worst_change = (0.0f64, String::new());
        for ((m, m0), c) in p
            .mats
            .iter()
            .zip(&start.mats)
            .zip(golden["changes"].as_array().unwrap())
        {
            assert_eq!(m.layer as u64, c["layer"].as_u64().unwrap());
            for (which, now, then) in [("a", &m.m.a, &m0.m.a), ("b", &m.m.bt, &m0.m.bt)] {
                let got = now
                    .iter()
                    .zip(then)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let want = c[which].as_f64().unwrap();
                let rel = (got - want).abs() / want;
                if rel > worst_change.0 {
                    worst_change = (rel, format!("{} {which}", stem((m.layer, m.target))));
                }
            }
        }
        eprintln!(
            "largest relative difference of a matrix's change: {:.3e} ({})",
            worst_change.0, worst_change.1
        );
        assert!(worst_change.0 < 1e-3, "change of {}", worst_change.1);
    }

    /// The other direction: an adapter `lorag train` exported (rank 1 on q and k, whose rows it permutes back
    /// to Hugging Face order), loaded by Python PEFT (`PeftModel.from_pretrained` on transformers' GGUF load,
    /// scripts/peft-reference.py --adapter), gives the logits lorag's generator gives with it. Tolerance 0.05 as
    /// for every SmolLM2 logit against an f32/f64 reference (the generator's activations go through Q8 blocks);
    /// the adapter moves the logits by up to 2.6, so the rows must be where PEFT expects them.
    #[test]
    fn python_peft_reads_lorag_exports() {
        const CONFIG: &[u8] = include_bytes!("fixtures/lorag-trained-qk/adapter_config.json");
        const WEIGHTS: &[u8] =
            include_bytes!("fixtures/lorag-trained-qk/adapter_model.safetensors");
        const WANT: &str = include_str!("fixtures/peft-load-lorag-adapter.json");
        let want: serde_json::Value = serde_json::from_str(WANT).unwrap();
        let mut m = super::smollm();
        let adapter = m.adapter_from_peft(CONFIG, WEIGHTS).unwrap();
        assert_eq!(adapter.info().targets, [Target::Q, Target::K]);
        m.add_adapter("trained", adapter).unwrap();
        for case in want["cases"].as_array().unwrap() {
            let prompt = super::ids(&case["ids"]);
            let n_vocab = m.config().n_vocab;
            let last = |adapters: &[(&str, f32)]| {
                let all = super::logits(&m, &prompt, adapters);
                all[all.len() - n_vocab..].to_vec()
            };
            let (adapted, base) = (last(&[("trained", 1.0)]), last(&[]));
            assert!(case["max_change"].as_f64().unwrap() > 1.0);
            let top = case["top5"].as_array().unwrap();
            let best = (0..n_vocab)
                .max_by(|&a, &b| adapted[a].total_cmp(&adapted[b]))
                .unwrap();
            assert_eq!(best as u64, top[0]["id"].as_u64().unwrap());
            for t in top {
                let id = t["id"].as_u64().unwrap() as usize;
                for (got, key) in [(adapted[id], "adapted"), (base[id], "base")] {
                    let w = t[key].as_f64().unwrap() as f32;
                    assert!(
                        (got - w).abs() <= 0.05,
                        "{key} logit of {id}: {got} vs PEFT {w}"
                    );
                }
            }
        }
    }
}
