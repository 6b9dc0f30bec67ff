//! A tiny generated llama (and its Qwen2 twin) for the generator and LoRA tests.

use super::Rng;
use lorag::llm::gguf::GgufWriter;
use lorag::llm::quant::GgmlType;

/// A byte-level vocabulary (the 256 byte characters, two merges, three control tokens) and a 2-layer llama
/// with F32/F16 weights of random values.
pub fn tiny(edit: impl FnOnce(&mut GgufWriter, &mut Tensors)) -> Vec<u8> {
    tiny_t(CHATML, edit)
}

pub type Tensors = Vec<(&'static str, Vec<u64>, GgmlType)>;
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

pub fn tiny_t(template: &str, edit: impl FnOnce(&mut GgufWriter, &mut Tensors)) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut tokens: Vec<String> = Vec::new();
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        tokens.push(if printable {
            char::from_u32(b).unwrap().to_string()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap().to_string()
        });
    }
    tokens.extend(["Ġt", "Ġth", "<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(String::from));
    let n_vocab = tokens.len() as u64;
    let mut types = vec![1i32; tokens.len()];
    types[tokens.len() - 3..].fill(3);
    let mut w = GgufWriter::new();
    w.str("general.architecture", "llama")
        .str("general.type", "model")
        .u32("llama.block_count", 2)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", 32)
        .u32("llama.feed_forward_length", 64)
        .u32("llama.attention.head_count", 4)
        .u32("llama.attention.head_count_kv", 2)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array(
            "tokenizer.ggml.tokens",
            &tokens.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        )
        .i32_array("tokenizer.ggml.token_type", &types)
        .str_array("tokenizer.ggml.merges", &["Ġ t", "Ġt h"])
        .u32("tokenizer.ggml.bos_token_id", n_vocab as u32 - 3)
        .u32("tokenizer.ggml.eos_token_id", n_vocab as u32 - 2)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str("tokenizer.chat_template", template);
    let mut tensors: Tensors = vec![
        ("token_embd.weight", vec![32, n_vocab], GgmlType::F16),
        ("output_norm.weight", vec![32], GgmlType::F32),
    ];
    for l in 0..2 {
        let names: [(&str, Vec<u64>); 9] = [
            ("attn_norm.weight", vec![32]),
            ("attn_q.weight", vec![32, 32]),
            ("attn_k.weight", vec![32, 16]),
            ("attn_v.weight", vec![32, 16]),
            ("attn_output.weight", vec![32, 32]),
            ("ffn_norm.weight", vec![32]),
            ("ffn_gate.weight", vec![32, 64]),
            ("ffn_up.weight", vec![32, 64]),
            ("ffn_down.weight", vec![64, 32]),
        ];
        for (s, d) in names {
            let name: &'static str = Box::leak(format!("blk.{l}.{s}").into_boxed_str());
            tensors.push((name, d, GgmlType::F32));
        }
    }
    edit(&mut w, &mut tensors);
    for (name, dims, ty) in &tensors {
        let n: u64 = dims.iter().product();
        let mut data = Vec::new();
        for _ in 0..n {
            let x = (rng.below(2001) as f32 - 1000.0) / 4000.0;
            let x = if name.contains("norm") { 1.0 + x } else { x };
            match ty {
                GgmlType::F16 => data.extend(lorag::llm::quant::f32_to_f16(x).to_le_bytes()),
                _ => data.extend(x.to_le_bytes()),
            }
        }
        w.tensor(name, dims, *ty, data);
    }
    w.to_bytes()
}

/// The tiny llama rewritten as Qwen2: metadata under `qwen2.*`, q/k rows put back in Hugging Face order (what
/// llama.cpp's converter permutes for llama but not for Qwen2, which rotates halves: NeoX RoPE), and q/k/v bias
/// tensors (`bias` gives their values).
pub fn tiny_as_qwen2(bias: impl Fn(&str, usize) -> f32) -> Vec<u8> {
    let hd = 8; // 32 / 4 heads
    let mut w = rewrite(&tiny(|_, _| {}), true, |name, dims, data| {
        if !(name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            return data;
        }
        // GGUF row h·hd + 2i + c  ←→  Hugging Face row h·hd + c·hd/2 + i.
        let (rows, cols) = (dims[1] as usize, dims[0] as usize);
        let rb = cols * 4;
        let mut hf = vec![0u8; data.len()];
        for r in 0..rows {
            let (h, j) = (r / hd, r % hd);
            let (i, c) = (j / 2, j % 2);
            let to = h * hd + c * hd / 2 + i;
            hf[to * rb..(to + 1) * rb].copy_from_slice(&data[r * rb..(r + 1) * rb]);
        }
        hf
    });
    for l in 0..2 {
        for (name, n) in [
            ("attn_q.bias", 32),
            ("attn_k.bias", 16),
            ("attn_v.bias", 16),
        ] {
            let name = format!("blk.{l}.{name}");
            let data = (0..n).flat_map(|i| bias(&name, i).to_le_bytes()).collect();
            w.tensor(&name, &[n as u64], GgmlType::F32, data);
        }
    }
    w.to_bytes()
}

/// A writer holding `src`'s metadata (renamed to Qwen2 when `qwen2`) and its tensors, each tensor's bytes passed
/// through `edit(name, dims, bytes)`.
pub fn rewrite(
    src: &[u8],
    qwen2: bool,
    mut edit: impl FnMut(&str, &[u64], Vec<u8>) -> Vec<u8>,
) -> GgufWriter {
    use lorag::llm::gguf::Value;
    let g = lorag::llm::Gguf::parse(src, Default::default()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        let k = if qwen2 {
            k.replace("llama.", "qwen2.")
        } else {
            k.clone()
        };
        match v {
            Value::U64(u) => w.u32(&k, *u as u32),
            Value::F64(f) => w.f32(&k, *f as f32),
            Value::Bool(b) => w.bool(&k, *b),
            Value::Str(_) if qwen2 && k == "general.architecture" => w.str(&k, "qwen2"),
            Value::Str(s) => w.str(&k, s),
            Value::StrArray(a) => {
                w.str_array(&k, &a.iter().map(String::as_str).collect::<Vec<_>>())
            }
            Value::IntArray(a) => w.i32_array(&k, &a.iter().map(|&x| x as i32).collect::<Vec<_>>()),
            other => panic!("{other:?}"),
        };
    }
    for t in &g.tensors {
        let data = edit(&t.name, &t.dims, src[t.start..t.start + t.len].to_vec());
        w.tensor(&t.name, &t.dims, t.ty, data);
    }
    w
}

/// A random rank-`rank` adapter on `targets` of every layer of `w` (values in ±amp, drawn from `seed`; the
/// adapter's scale `scale`).
pub fn random_adapter(
    w: &lorag::llm::Weights,
    targets: &[lorag::llm::Target],
    rank: usize,
    seed: u64,
    amp: f32,
    scale: f32,
) -> lorag::llm::Adapter {
    let mut rng = Rng(seed);
    let mut r = move || (rng.below(2001) as f32 - 1000.0) / 1000.0 * amp;
    let n_layer = w.cfg.n_layer;
    let mut a = lorag::llm::Adapter::empty(n_layer, lorag::llm::AdapterFormat::Memory);
    for l in 0..n_layer {
        for &t in targets {
            let m = t.mat(&w.layers[l]);
            let lm = lorag::llm::lora::LoraMat {
                rank,
                rows: m.rows,
                cols: m.cols,
                a: (0..rank * m.cols).map(|_| r()).collect(),
                bt: (0..rank * m.rows).map(|_| r()).collect(),
                scale,
            };
            a.set(w, &format!("blk.{l}"), l, t, lm).unwrap();
        }
    }
    a
}
