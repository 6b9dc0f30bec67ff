//! GPU kernel and generation speed, for the machines that have a GPU (on a software adapter the figures only
//! show that it runs): the products' bandwidth and arithmetic on a 4096 × 4096 matrix per format (one token:
//! matvec.wgsl; 64 and 256 tokens: matmul.wgsl), and SmolLM2-135M generation on the GPU beside the CPU path in the same run (the peers'
//! 197-token prompt, 64 greedy tokens, medians of `GPU_REPS` rounds, default 3), then per-launch profiles of its
//! prefill, its decoding, and decoding after a RAG-length prompt (`LONG_PROMPT` tokens, default 720).
//!   cargo bench --bench gpu
use lorag::kernels::gpu::{Dispatch, Gpu, Grid, Input, Kernel, MatvecParams};
use lorag::kernels::{block_on, DevicePref};
use lorag::llm::quant::GgmlType;
use lorag::llm::{GenerateOptions, Model, SamplerConfig};
use std::time::Instant;

const LAUNCHES: usize = 21;

fn main() {
    let g = match Gpu::new_blocking() {
        Ok(g) => g,
        Err(e) => {
            println!("no GPU: {e}");
            return;
        }
    };
    println!(
        "adapter: {} ({}, {}{}; subgroups: {})",
        g.info.name,
        g.info.backend,
        g.info.device_type,
        if g.info.software { ", software" } else { "" },
        match g.subgroups() {
            true => "matrix-vector products on matvec_sg.wgsl; the one-token \"-sg\" rows without",
            false => "none",
        }
    );
    // GPU_ROWS × GPU_COLS (default 4096 × 4096); on a large GPU take a matrix well past its L2 (16384 × 8192: 75 MB
    // in Q4_1), since the repeated launches would otherwise read it from cache.
    let dim = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(4096)
    };
    let (rows, cols) = (dim("GPU_ROWS"), dim("GPU_COLS"));
    // Warm-up: a GPU idle before the run starts at a low clock (an H200 at 345 MHz through most of a 10-second
    // run), so 1.5 s of launches first.
    {
        let x = g.f32_buffer("x", &vec![1.5; 4096]);
        let y = g.buffer(
            "y",
            4 * 4096,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let p = g.uniform(&[4096, 0, 1e-5f32.to_bits(), 0]);
        let step = g.uniform(&[0, 1, 0, 0]);
        let d = g.dispatch(Kernel::RmsNorm, &[&x, &x, &y, &p, &step], Grid::One);
        let many = vec![d; 200];
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < 1.5 {
            block_on(g.run_and_read(&many, 1, &y, 1)).unwrap();
        }
    }
    let all = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    products(&g, rows, cols, &all, &[1, 64, 256]);
    // SmolLM2-135M's decoding products one token at a time (`SMALL_SHAPES`, rows x cols separated by commas; empty
    // skips): q/k/v together, o, gate and up (as the pair's rows), down; what a step's launches cost in isolation.
    let shapes = std::env::var("SMALL_SHAPES")
        .unwrap_or_else(|_| "960x576,576x576,3072x576,576x1536".into());
    // Each with one-token rows split over subgroups (`Gpu::set_decode_rows`: 1, 2 or 4 rows a workgroup) where
    // the adapter allows it, beside a subgroup per row (0).
    for (r, c) in shapes.split(',').filter_map(|s| s.trim().split_once('x')) {
        if let (Ok(r), Ok(c)) = (r.parse(), c.parse()) {
            for split in [0, 1, 2, 4] {
                g.set_decode_rows(Some(split));
                g.set_subgroups(true);
                if g.decode_rows() == Some(split) && g.subgroups() {
                    println!(
                        "(one-token rows: {})",
                        match split {
                            0 => "a subgroup each, 4 a workgroup".to_string(),
                            k => format!("{k} a workgroup, split over its subgroups"),
                        }
                    );
                    products(&g, r, c, &[GgmlType::Q4_1], &[1]);
                }
            }
            g.set_decode_rows(None);
        }
    }
    // The floor under every launch of a decoding step: LAUNCHES launches of a kernel with almost nothing to do
    // (RMSNorm of 4 values, one workgroup), each writing the buffer the next one writes (the decoder's chain
    // of dependent launches, with the barrier between them), per launch as above. Then the same chain
    // alternating with another pipeline (SwiGLU of 4 values: what a pipeline switch adds), and RMSNorm of 576
    // values (one workgroup's reduction: what a small kernel's own work adds).
    {
        let floor = |n: usize, alternate: bool| {
            let x = g.f32_buffer("x", &vec![1.5; n]);
            let w = g.f32_buffer("w", &vec![1.0; n]);
            let y = g.buffer(
                "y",
                4 * n as u64,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let p = g.uniform(&[n as u32, 0, 1e-5f32.to_bits(), 0]);
            let step = g.uniform(&[0, 1, 0, 0]);
            let d = g.dispatch(Kernel::RmsNorm, &[&x, &w, &y, &p, &step], Grid::One);
            let sp = g.uniform(&[n as u32, 0, 0, 0]);
            let other = g.dispatch(Kernel::SwiGlu, &[&y, &w, &sp, &step], Grid::Flat(n as u32));
            let chain = |k: usize| {
                (0..k)
                    .map(|i| match alternate && i % 2 == 1 {
                        true => other.clone(),
                        false => d.clone(),
                    })
                    .collect()
            };
            per_launch(&g, 1, &y, 5, chain).max(0.0) * 1e6
        };
        println!(
            "floor: a dependent launch with (almost) nothing to do: {:.1} µs; alternating two pipelines: {:.1} µs; \
             RMSNorm of 576 values: {:.1} µs",
            floor(4, false),
            floor(4, true),
            floor(576, false)
        );
    }
    attention_alone(&g);
    attention_phases(&g);
    drop(g);
    // `KERNELS_ONLY=1`: the kernel tables alone (a short run on a lent machine).
    if std::env::var_os("KERNELS_ONLY").is_some() {
        return;
    }
    // The model and the peers' prompt; LORAG_MODEL / LLM_PROMPT name other paths (a copy on a GPU machine).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = |var: &str, default: &str| {
        std::env::var(var)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| root.join(default))
    };
    let bytes = std::fs::read(path(
        "LORAG_MODEL",
        "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))
    .expect("scripts/fetch-models first");
    let lp: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path("LLM_PROMPT", "../shared/peers/data/llm_prompt.json")).unwrap(),
    )
    .unwrap();
    let cpu = Model::from_bytes(bytes.clone()).unwrap();
    let mut gpu = Model::from_bytes(bytes).unwrap();
    block_on(gpu.use_device(DevicePref::Gpu)).unwrap();
    let prompt = cpu.encode(lp["prompt"].as_str().unwrap(), false).unwrap();
    let opts = GenerateOptions {
        max_tokens: 64,
        sampler: SamplerConfig::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let reps: usize = std::env::var("GPU_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut cp, mut cd, mut gp, mut gd) = (vec![], vec![], vec![], vec![]);
    let mut ids = vec![];
    // The host's time recording and submitting: a prompt-only request's, taken out of each request's below.
    let before = gpu.device();
    let one = GenerateOptions {
        max_tokens: 1,
        ..opts.clone()
    };
    block_on(gpu.generate_async(&prompt, &one, &mut |_| true)).unwrap();
    let prompt_us = gpu.device().submit_us - before.submit_us;
    let (mut host_us, mut subs, mut tokens) = (0, 0, 0);
    for _ in 0..reps {
        let c = cpu.generate(&prompt, &opts, &mut |_| true).unwrap();
        let before = gpu.device();
        let o = block_on(gpu.generate_async(&prompt, &opts, &mut |_| true)).unwrap();
        let after = gpu.device();
        host_us += (after.submit_us - before.submit_us).saturating_sub(prompt_us);
        subs += after.submissions - before.submissions;
        tokens += o.ids.len() as u64 - 1;
        assert_eq!(c.ids, o.ids, "GPU and CPU greedy tokens differ");
        ids.clone_from(&c.ids);
        cp.push(c.prefill_tok_s());
        cd.push(c.decode_tok_s());
        gp.push(o.prefill_tok_s());
        gd.push(o.decode_tok_s());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("SmolLM2-135M Q4_1, {} prompt tokens, 64 generated (same tokens on both), medians of {reps}:", prompt.len());
    println!(
        "  CPU: prefill {:.1} tok/s, decode {:.1} tok/s",
        med(&mut cp),
        med(&mut cd)
    );
    println!(
        "  GPU: prefill {:.1} tok/s, decode {:.1} tok/s; the host recording and submitting: {:.1} µs a \
         decoding step ({} submissions a request, the prompt's included; lavapipe runs the work inside submit)",
        med(&mut gp),
        med(&mut gd),
        host_us as f64 / tokens as f64,
        subs / reps as u64
    );
    // What a decoding change saves: the same requests with it undone (same tokens asserted), median decode tok/s.
    let backend = gpu.gpu().unwrap().gpu.clone();
    let decode_without = |what: &str| {
        let mut v = vec![];
        for _ in 0..reps {
            let o = block_on(gpu.generate_async(&prompt, &opts, &mut |_| true)).unwrap();
            assert_eq!(o.ids, ids, "GPU ({what}) and CPU greedy tokens differ");
            v.push(o.decode_tok_s());
        }
        med(&mut v)
    };
    // Greedy decoding on the GPU (argmax and the next embedding there, several tokens a submission, the next
    // submission queued while the host reads one), against the host choosing each token from the logits read
    // back every step, and against other batch sizes.
    for batch in [0, 1, 32] {
        backend.set_greedy_batch(Some(batch));
        let v = decode_without("greedy batch");
        backend.set_greedy_batch(None);
        match batch {
            0 => println!("  GPU with the host choosing each token (the logits read back every step): decode {v:.1} tok/s"),
            b => println!("  GPU greedy decoding {b} tokens a submission (default {}): decode {v:.1} tok/s", lorag::kernels::gpu::GREEDY_BATCH),
        }
    }
    // Sampling (the default sampler: top-k 40, seeded): the candidates found on the GPU and 320 bytes read back
    // a step, each step recorded while the GPU runs the one before (the default), recorded after it, and all the
    // logits read back and sorted on the host; the same tokens asserted (the same logits, the same draws).
    let sampled = GenerateOptions {
        sampler: SamplerConfig::default(),
        ..opts.clone()
    };
    let mut runs = vec![];
    for (on, ahead) in [(true, true), (true, false), (false, true)] {
        backend.set_sample_on_gpu(on);
        backend.set_record_ahead(ahead);
        let mut v = vec![];
        let mut got = vec![];
        for _ in 0..reps {
            let o = block_on(gpu.generate_async(&prompt, &sampled, &mut |_| true)).unwrap();
            v.push(o.decode_tok_s());
            got = o.ids;
        }
        runs.push((med(&mut v), got));
    }
    backend.set_sample_on_gpu(true);
    backend.set_record_ahead(true);
    assert!(
        runs.iter().all(|r| r.1 == runs[0].1),
        "sampled tokens differ between the paths"
    );
    println!(
        "  GPU sampling (top-k 40): candidates found on the GPU, steps recorded ahead: decode {:.1} tok/s; recorded \
         after the step before: {:.1} tok/s; all the logits read back: {:.1} tok/s",
        runs[0].0, runs[1].0, runs[2].0
    );
    // Gate and up as one launch, against two.
    backend.set_row_pairs(false);
    let two = decode_without("two launches");
    backend.set_row_pairs(true);
    println!("  GPU with gate and up as two launches: decode {two:.1} tok/s");
    // Attention's chunks added up inside the output projection, against a launch of their own.
    backend.set_combine_in_product(false);
    let own = decode_without("combine launch");
    backend.set_combine_in_product(true);
    println!(
        "  GPU with attention's chunks added up in a launch of their own: decode {own:.1} tok/s"
    );
    // Decoding's attention split over position chunks, against unsplit.
    backend.set_attention_chunks(Some(1));
    let unsplit = decode_without("attention unsplit");
    backend.set_attention_chunks(None);
    println!(
        "  GPU with attention unsplit (one workgroup per head; the default here: {} chunks): decode {unsplit:.1} tok/s",
        backend.attention_chunks(gpu.weights.cfg.n_head),
    );
    // One-token rows per workgroup swept (`Gpu::set_decode_rows`; the model's products are built per request).
    for split in [0, 1, 2, 4] {
        backend.set_decode_rows(Some(split));
        if backend.decode_rows() == Some(split) && backend.subgroups() {
            let v = decode_without(&format!("decode rows {split}"));
            println!("  GPU with one-token rows {split} a workgroup (0: a subgroup each): decode {v:.1} tok/s");
        }
    }
    backend.set_decode_rows(None);
    // Products without subgroups: the kernels a browser runs (wgpu 30's WebGPU backend offers no subgroups), the
    // figure to set against the CPU wasm path in the same browser.
    if backend.subgroups() {
        backend.set_subgroups(false);
        let plain = decode_without("no subgroups");
        backend.set_subgroups(true);
        println!("  GPU without subgroups (a browser's products): decode {plain:.1} tok/s");
    }
    // Attention's workgroup size (64 or 256 invocations per (head, token, chunk)).
    for wg in [64, 256] {
        backend.set_attention_workgroup(Some(wg));
        let v = decode_without(&format!("attention workgroups of {wg}"));
        println!("  GPU with attention workgroups of {wg}: decode {v:.1} tok/s");
    }
    backend.set_attention_workgroup(None);
    // Decoding's attention chunk count swept (`ATTN_SWEEP`, counts separated by commas; empty skips): decode tok/s
    // after the peers' prompt and after a `LONG_PROMPT`-token one (below), same tokens asserted for the first.
    let long: usize = std::env::var("LONG_PROMPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(720);
    let long_prompt: Vec<u32> = prompt.iter().copied().cycle().take(long).collect();
    let sweep = std::env::var("ATTN_SWEEP").unwrap_or_else(|_| "1,2,4,8,16,32".into());
    for c in sweep
        .split(',')
        .filter_map(|c| c.trim().parse::<u32>().ok())
    {
        backend.set_attention_chunks(Some(c));
        let short = decode_without(&format!("attention in {c} chunks"));
        let mut v = vec![];
        for _ in 0..reps.min(if long > 0 { reps } else { 0 }) {
            let o = GenerateOptions {
                max_tokens: 33,
                ..opts.clone()
            };
            v.push(
                block_on(gpu.generate_async(&long_prompt, &o, &mut |_| true))
                    .unwrap()
                    .decode_tok_s(),
            );
        }
        let after = if v.is_empty() { 0.0 } else { med(&mut v) };
        println!("  attention in {c:>2} chunks: decode {short:.1} tok/s; after a {long}-token prompt {after:.1} tok/s");
    }
    backend.set_attention_chunks(None);
    // Where a GPU step's time goes: each launch timed (one run of the prompt alone, then of the whole request;
    // decoding is the difference), beside the wall-clock time per step.
    if !backend.set_profiling(true) {
        println!("  (no per-launch profile: the adapter has no timestamp queries inside passes)");
        return;
    }
    let run = |prompt: &[u32], max_tokens: usize| {
        let o = GenerateOptions {
            max_tokens,
            ..opts.clone()
        };
        let t = Instant::now();
        block_on(gpu.generate_async(prompt, &o, &mut |_| true)).unwrap();
        (t.elapsed().as_secs_f64(), backend.profile())
    };
    // A whole request's launches less its prompt's: the decoding steps'.
    let minus = |all: &[lorag::kernels::gpu::KernelTime],
                 prefill: &[lorag::kernels::gpu::KernelTime]| {
        all.iter()
            .map(|k| {
                let p = prefill.iter().find(|p| p.label == k.label);
                let (n, ns) = p.map_or((0, 0.0), |p| (p.launches, p.ns));
                (k.label.clone(), k.launches - n, k.ns - ns)
            })
            .filter(|k| k.1 > 0)
            .collect::<Vec<_>>()
    };
    let (t1, prefill) = run(&prompt, 1);
    let (t64, all) = run(&prompt, 64);
    let decode = minus(&all, &prefill);
    // Steps: the final norm runs once per step.
    let steps = |rows: &[(String, usize, f64)]| {
        rows.iter()
            .filter(|r| r.0 == "rmsnorm")
            .map(|r| r.1)
            .sum::<usize>()
            .max(1) as f64
    };
    let show = |what: &str, rows: Vec<(String, usize, f64)>, wall: f64| {
        let steps = steps(&rows);
        let gpu_ns: f64 = rows.iter().map(|r| r.2).sum();
        println!(
            "  profile, {what}, {steps} steps: GPU busy {:.3} ms of {:.3} ms wall per step ({:.0} %), {} launches per step",
            gpu_ns / 1e6 / steps,
            wall * 1e3 / steps,
            gpu_ns / 1e7 / wall,
            rows.iter().map(|r| r.1).sum::<usize>() as f64 / steps
        );
        let mut rows = rows;
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (label, n, ns) in rows.iter().take(12) {
            println!(
                "    {label:<34} {:>6} launches {:>9.1} µs each {:>5.1} %",
                n,
                ns / 1e3 / *n as f64,
                100.0 * ns / gpu_ns
            );
        }
    };
    let tuples = |v: &[lorag::kernels::gpu::KernelTime]| {
        v.iter()
            .map(|k| (k.label.clone(), k.launches, k.ns))
            .collect()
    };
    show("prefill (the prompt)", tuples(&prefill), t1);
    show("decoding (one token a step)", decode, t64 - t1);
    // Decoding after a prompt as long as a RAG prompt (`LONG_PROMPT` tokens, default 720: the bundled examples'
    // cited prompts are about 700): the peers' prompt repeated to that length, then 16 tokens. Attention's share
    // of a step grows with the context (its workgroups walk every cached position); 0 skips this.
    if long > 0 {
        // Attention split over position chunks (the default on a GPU), then unsplit.
        for (chunks, what) in [(None, ""), (Some(1), ", attention unsplit")] {
            backend.set_attention_chunks(chunks);
            let (t1, prefill) = run(&long_prompt, 1);
            let (t17, all) = run(&long_prompt, 17);
            show(
                &format!("decoding after a {long}-token prompt{what}"),
                minus(&all, &prefill),
                t17 - t1,
            );
        }
        backend.set_attention_chunks(None);
    }
    backend.set_profiling(false);
}

/// Products of `tys` on a rows × cols matrix: per launch time of LAUNCHES dependent launches, for each token count
/// (one token also with the fused RMSNorm, and where the adapter has subgroups, without them).
fn products(g: &Gpu, rows: usize, cols: usize, tys: &[GgmlType], tokens: &[usize]) {
    println!("products on {rows} × {cols}: one submission of {LAUNCHES} launches, time per launch");
    let mut s = 0x1234_5678u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    // "kernel ms": the launch's own GPU time from timestamps around it (where the adapter has them), beside the
    // wall-clock difference "ms".
    let timed = g.set_profiling(true);
    g.set_profiling(false);
    println!(
        "{:<12} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "type", "tokens", "ms", "GB/s", "GFLOP/s", "kernel ms"
    );
    for &ty in tys {
        let rb = ty.row_bytes(cols).unwrap();
        let mut w: Vec<u8> = (0..rows * rb).map(|_| next() as u8).collect();
        // Keep every scale a small normal number (f16 0x2000 ≈ 2^-7) so no NaN or infinity appears.
        let scale_offsets: &[usize] = match ty {
            GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[],
        };
        if ty == GgmlType::F32 {
            for c in w.chunks_exact_mut(4) {
                c.copy_from_slice(&0.01f32.to_le_bytes());
            }
        } else if ty == GgmlType::F16 {
            for c in w.chunks_exact_mut(2) {
                c.copy_from_slice(&0x2000u16.to_le_bytes());
            }
        } else {
            for b in w.chunks_exact_mut(ty.block_bytes()) {
                for &o in scale_offsets {
                    b[o..o + 2].copy_from_slice(&0x2000u16.to_le_bytes());
                }
            }
        }
        let m = g.upload_matrix(ty, &w, rows, cols).unwrap();
        // One token also with the decoder's fused RMSNorm (what q, k, v, gate and up pay for not launching a norm),
        // and where the adapter has subgroups, without them (matvec.wgsl's workgroup-memory sums).
        let norm_w = g.f32_buffer("norm", &vec![1.0f32; cols]);
        let sg = g.subgroups();
        let mut runs = vec![];
        for &n in tokens {
            runs.push((n, false, sg));
            if n == 1 {
                runs.push((1, true, sg));
                if sg {
                    runs.extend([(1, false, false), (1, true, false)]);
                }
            }
        }
        for (n, norm, sub) in runs {
            g.set_subgroups(sub);
            let x = g.f32_buffer("x", &vec![0.5f32; n * cols]);
            let y = g.buffer(
                "y",
                (n * rows * 4) as u64,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let step = g.uniform(&[0, n as u32, 0, 0]);
            let d = g.matvec_dispatches_with(
                &m,
                &x,
                &y,
                None,
                norm.then_some(&norm_w),
                None,
                &step,
                MatvecParams {
                    in_stride: cols as u32,
                    out_stride: rows as u32,
                    scale: 1.0,
                    input: match norm {
                        true => Input::RmsNorm { eps: 1e-5 },
                        false => Input::Plain,
                    },
                    ..Default::default()
                },
            );
            let ms =
                per_launch(g, n as u32, &y, 3, repeat(&d)).max(1e-9 / (LAUNCHES - 1) as f64) * 1e3;
            let gbs = (rows * rb) as f64 / (ms / 1e3) / 1e9;
            let gflops = 2.0 * (rows * cols * n) as f64 / (ms / 1e3) / 1e9;
            let kernel = if timed {
                g.set_profiling(true);
                let many: Vec<_> = (0..LAUNCHES).flat_map(|_| d.iter().cloned()).collect();
                block_on(g.run_and_read(&many, n as u32, &y, 1)).unwrap();
                let p = g.profile();
                g.set_profiling(false);
                let (ns, k) = p
                    .iter()
                    .fold((0.0, 0), |(s, c), t| (s + t.ns, c + t.launches));
                format!("{:.3}", ns / 1e6 / k.max(1) as f64)
            } else {
                "-".into()
            };
            let name = format!(
                "{}{}{}",
                ty.name(),
                if norm { "+norm" } else { "" },
                if sg && !sub { "-sg" } else { "" }
            );
            println!("{name:<12} {n:>6} {ms:>10.3} {gbs:>10.1} {gflops:>10.1} {kernel:>10}");
        }
    }
}

/// Decoding's attention launches alone at SmolLM2's shapes (9 heads, 3 KV heads of 64, one token), by context
/// length and chunk count: time per launch of LAUNCHES dependent ones (as the products above), the attention
/// launch by itself and with the combine; against the floor, what the kernel's own work costs.
fn attention_alone(g: &Gpu) {
    use lorag::kernels::gpu::attention_partials;
    let (nh, nkv, hd, half, n_ctx) = (9usize, 3usize, 64usize, 32usize, 1024usize);
    let kv_dim = nkv * hd;
    let qkv = g.f32_buffer("qkv", &vec![0.01; nh * hd + 2 * kv_dim]);
    let kc = g.f32_buffer("kc", &vec![0.01; n_ctx * kv_dim]);
    let vc = g.f32_buffer("vc", &vec![0.01; n_ctx * kv_dim]);
    let cs = g.f32_buffer("cs", &vec![0.5; n_ctx * half * 2]);
    let sb = g.f32_buffer("scores", &vec![0.0; nh * n_ctx]);
    let ob = g.f32_buffer("out", &vec![0.0; nh * hd]);
    let p = g.uniform(&[
        nh as u32,
        nkv as u32,
        hd as u32,
        n_ctx as u32,
        0,
        (1.0 / (hd as f32).sqrt()).to_bits(),
        half as u32,
        0,
    ]);
    println!("attention alone (SmolLM2's heads, one token), time per launch of {LAUNCHES} dependent ones:");
    for pos0 in [0u32, 230, 720] {
        let step = g.uniform(&[pos0, 1, 0, 0]);
        let mut line = format!("  after {pos0:>3} positions:");
        for nch in [1u32, 4, 16] {
            let pb = g.f32_buffer("partials", &vec![0.0; attention_partials(nch, nh, hd)]);
            let ds = g.attention([&qkv, &kc, &vc, &cs, &sb, &ob, &p, &step], &pb, nh, hd, nch);
            let per = |ds: &[Dispatch]| per_launch(g, 1, &ob, 5, repeat(ds)).max(0.0) * 1e6;
            let alone = per(&ds[..1]);
            match ds.len() {
                1 => line += &format!(" unsplit {alone:.1} µs;"),
                _ => {
                    line += &format!(
                        " {nch} chunks {alone:.1} µs, with the combine {:.1};",
                        per(&ds)
                    )
                }
            }
        }
        println!("{line}");
    }
}

/// Where a decoding attention launch's time goes: attention.wgsl cut short after each of its phases (a `return`
/// for every invocation, so the barriers stay uniform), timed as in `attention_alone` after 230 positions,
/// unsplit and in 4 chunks. The differences between rows are the phases' costs (a measuring aid: the cut
/// kernels compute nothing useful).
fn attention_phases(g: &Gpu) {
    let (nh, nkv, hd, half, n_ctx) = (9usize, 3usize, 64usize, 32usize, 1024usize);
    let kv_dim = nkv * hd;
    let src = include_str!("../src/kernels/wgsl/attention.wgsl");
    let cuts = [
        ("rotated q (and the cache store)", "    var mx = -3.4e38;\n"),
        (
            "+ scores",
            "    red[li] = mx;\n    let m = reduce(li, true);\n",
        ),
        ("+ max (tree over the workgroup)", "    var sum = 0.0;\n"),
        (
            "+ exponentials and their sum",
            "    // Unsplit: the weights e / total",
        ),
        (
            "+ normalized weights, storageBarrier",
            "    // Values: invocation li takes",
        ),
        ("+ values (the whole kernel)", ""),
    ];
    let wg = if g.info.software { 64 } else { 256 };
    let bufs = [
        g.f32_buffer("qkv", &vec![0.01; nh * hd + 2 * kv_dim]),
        g.f32_buffer("kc", &vec![0.01; n_ctx * kv_dim]),
        g.f32_buffer("vc", &vec![0.01; n_ctx * kv_dim]),
        g.f32_buffer("cs", &vec![0.5; n_ctx * half * 2]),
        g.f32_buffer("scores", &vec![0.0; nh * n_ctx]),
        g.f32_buffer("out", &vec![0.0; nh * hd]),
        g.uniform(&[
            nh as u32,
            nkv as u32,
            hd as u32,
            n_ctx as u32,
            0,
            (1.0 / (hd as f32).sqrt()).to_bits(),
            half as u32,
            0,
        ]),
        g.uniform(&[230, 1, 0, 0]),
        g.f32_buffer(
            "partials",
            &vec![0.0; lorag::kernels::gpu::attention_partials(16, nh, hd)],
        ),
    ];
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    println!("attention cut short after each phase (after 230 positions), time per launch of {LAUNCHES} dependent ones:");
    for (what, at) in cuts {
        let body = match at {
            "" => src.to_string(),
            at => {
                let i = src
                    .rfind(at)
                    .expect("attention.wgsl changed: update the cut points");
                format!("{}    return;\n{}", &src[..i], &src[i..])
            }
        };
        let code = format!("const HD: u32 = {hd}u;\nconst WG: u32 = {wg}u;\n{body}");
        let pipeline = g.pipeline_from_wgsl("attention cut", &code);
        let mut line = format!("  {what:<40}");
        for nch in [1u32, 4] {
            let d = g.launch(
                "attention cut",
                pipeline.clone(),
                &refs,
                Grid::TokensYChunks(nh as u32, nch),
            );
            let us = per_launch(g, 1, &bufs[5], 5, repeat(std::slice::from_ref(&d))).max(0.0) * 1e6;
            line += &format!(
                " {nch} chunk{}: {us:>5.1} µs",
                if nch > 1 { "s" } else { " " }
            );
        }
        println!("{line}");
    }
}

/// Seconds per launch of a chain of dependent launches: `chain(k)` builds k launches, each chain runs in one
/// submission ending in a 4-byte read of `read` (a step of `n` tokens), best of `reps` after a warm-up run
/// (pipelines); the difference between LAUNCHES and one leaves out the submission's and the read's fixed cost.
fn per_launch(
    g: &Gpu,
    n: u32,
    read: &wgpu::Buffer,
    reps: usize,
    chain: impl Fn(usize) -> Vec<Dispatch>,
) -> f64 {
    let time = |k: usize| {
        let many = chain(k);
        block_on(g.run_and_read(&many, n, read, 1)).unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            block_on(g.run_and_read(&many, n, read, 1)).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    (time(LAUNCHES) - time(1)) / (LAUNCHES - 1) as f64
}

/// A chain of k copies of `ds` (for [`per_launch`]).
fn repeat(ds: &[Dispatch]) -> impl Fn(usize) -> Vec<Dispatch> + '_ {
    move |k| (0..k).flat_map(|_| ds.iter().cloned()).collect()
}
