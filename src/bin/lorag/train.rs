//! `lorag train`: a LoRA adapter from chat or prompt/response examples, written in PEFT format.

use std::io::Write;
use std::path::{Path, PathBuf};

use lorag::llm::train::{parse_examples, LoraConfig, Schedule, TrainConfig, Trainer};
use lorag::llm::{Model, Target};

use super::default_generator;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The GGUF base model (stays frozen and quantized).
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// Training examples, JSONL: {"messages": [...]} (as `lorag log export` writes) or {"prompt", "response"}.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Output folder: adapter_config.json + adapter_model.safetensors (PEFT), plus checkpoint.safetensors.
    #[arg(long, short, value_name = "DIR")]
    out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Rank-stabilized scaling (alpha / sqrt(rank)).
    #[arg(long)]
    rslora: bool,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Adapted matrices, comma-separated: q,k,v,o,gate,up,down (or all).
    #[arg(long, default_value = "q,v")]
    targets: String,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Sequences per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// linear, cosine or constant after warm-up.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Gradient clipping (global L2 norm; 0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Longest example in tokens (longer ones are skipped).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Fraction held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f32,
    /// Seed (initialization, split, shuffles, dropout).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads computing a batch's sequences side by side (0 = one per core); the result does not depend on it.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where the frozen model's matrix products run: auto (a hardware GPU when there is one), gpu, cpu. The
    /// adapters, attention and the rest stay on the CPU.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Continue from the checkpoint in --out (same model and data).
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimizer steps (the checkpoint lets --resume go on).
    #[arg(long)]
    max_steps: Option<usize>,
}

fn targets(s: &str) -> Result<Vec<Target>, String> {
    if s == "all" {
        return Ok(Target::ALL.to_vec());
    }
    s.split(',')
        .map(|t| {
            Target::parse(t.trim())
                .ok_or_else(|| format!("unknown LoRA target {t:?} (q,k,v,o,gate,up,down)"))
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run_train(a: &TrainArgs) -> Result<(), String> {
    let model_path = a.model.clone().unwrap_or_else(default_generator);
    let bytes = std::fs::read(&model_path).map_err(|e| format!("{}: {e}", model_path.display()))?;
    let mut model =
        Model::from_bytes(bytes).map_err(|e| format!("{}: {e}", model_path.display()))?;
    crate::choose_device(
        &mut model,
        &a.device,
        true,
        " for the frozen matrix products",
    )?;
    let text =
        std::fs::read_to_string(&a.data).map_err(|e| format!("{}: {e}", a.data.display()))?;
    let examples = parse_examples(&text, lorag::llm::train::MAX_EXAMPLES)
        .map_err(|e| format!("{}: {e}", a.data.display()))?;
    let lora = LoraConfig {
        rank: a.rank,
        alpha: a.alpha,
        rslora: a.rslora,
        dropout: a.dropout,
        targets: targets(&a.targets)?,
        seed: a.seed,
    };
    let schedule = match a.schedule.as_str() {
        "linear" => Schedule::Linear,
        "cosine" => Schedule::Cosine,
        "constant" => Schedule::Constant,
        s => return Err(format!("unknown schedule {s:?} (linear, cosine, constant)")),
    };
    let cfg = TrainConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_steps: a.warmup,
        schedule,
        epochs: a.epochs,
        batch_size: a.batch_size,
        max_len: a.max_len,
        max_grad_norm: a.max_grad_norm,
        eval_fraction: a.eval_fraction,
        seed: a.seed,
        threads: a.threads,
        ..Default::default()
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let ckpt_path = a.out.join("checkpoint.safetensors");
    let mut t = if a.resume {
        let ck = std::fs::read(&ckpt_path).map_err(|e| format!("{}: {e}", ckpt_path.display()))?;
        Trainer::resume(&model, &examples, &ck)
            .map_err(|e| format!("{}: {e}", ckpt_path.display()))?
    } else {
        Trainer::new(&model, &examples, &lora, cfg).map_err(|e| e.to_string())?
    };
    t.cfg.threads = a.threads; // a machine's choice, not the run's: a resumed run takes this one's
    let lc = &t.params.config;
    eprintln!(
        "training: {} examples ({} held out, {} skipped as longer than {} tokens), rank {} alpha {} on {}: {} parameters; {} steps of {} sequences{}",
        t.train.len() + t.eval.len(),
        t.eval.len(),
        t.skipped,
        t.cfg.max_len,
        lc.rank,
        lc.alpha,
        lc.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>().join(","),
        t.params.count(),
        t.total_steps(),
        t.cfg.batch_size,
        if a.resume { format!(", resuming after step {}", t.step) } else { String::new() }
    );
    if !a.resume {
        if let Some(l) = t.eval_loss(&model).map_err(|e| e.to_string())? {
            eprintln!("held-out loss before training: {l:.4}");
        }
    }
    let stop_at = a.max_steps.map(|n| t.step + n);
    let mut last_line = std::time::Instant::now();
    let mut err = std::io::stderr();
    t.run(&model, &mut |p| {
        let now = std::time::Instant::now();
        if p.eval_loss.is_some()
            || p.step == p.total_steps
            || now.duration_since(last_line).as_secs_f32() > 2.0
            || p.step <= 3
        {
            last_line = now;
            let _ = writeln!(
                err,
                "step {}/{} epoch {} loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s eta {:.0}s{}",
                p.step,
                p.total_steps,
                p.epoch,
                p.loss,
                p.lr,
                p.grad_norm,
                p.tokens_per_s,
                p.eta_s,
                p.eval_loss
                    .map_or(String::new(), |l| format!(" held-out loss {l:.4}"))
            );
        }
        stop_at.is_none_or(|s| p.step < s)
    })
    .map_err(|e| e.to_string())?;
    write_atomic(&ckpt_path, &t.checkpoint())?;
    let base = model
        .name
        .clone()
        .unwrap_or_else(|| model_path.display().to_string());
    let (config, weights) = t.params.to_peft(&model.weights, &base);
    write_atomic(&a.out.join("adapter_model.safetensors"), &weights)?;
    write_atomic(&a.out.join("adapter_config.json"), config.as_bytes())?;
    eprintln!(
        "{} after step {}/{}: {} (PEFT adapter; checkpoint.safetensors for --resume)",
        if t.done() { "done" } else { "stopped" },
        t.step,
        t.total_steps(),
        a.out.display()
    );
    Ok(())
}
