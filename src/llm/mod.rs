//! The generator: a quantized GGUF language model run on the CPU (wasm simd128 or native SIMD), with its own
//! tokenizer and chat template read from the file.
//!
//! ```no_run
//! # fn main() -> lorag::Result<()> {
//! use lorag::llm::{GenerateOptions, Model, SamplerConfig};
//! let model = Model::from_bytes(std::fs::read("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap())?;
//! let prompt = model.encode("The capital of France is", false)?;
//! let opts = GenerateOptions { max_tokens: 10, sampler: SamplerConfig::greedy(), ..Default::default() };
//! let out = model.generate(&prompt, &opts, &mut |ev| {
//!     print!("{}", ev.text);
//!     true
//! })?;
//! assert_eq!(out.ids.len(), 10);
//! # Ok(()) }
//! ```

pub mod gguf;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod lora;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod sampler;
pub mod template;
pub mod tokenizer;
pub mod train;

pub use gguf::{Gguf, GgufLimits};
pub use lora::{Adapter, AdapterFormat, AdapterInfo, Target};
pub use model::{ActiveAdapters, Arch, KvCache, ModelConfig, Weights};
pub use sampler::{Sampler, SamplerConfig};
pub use template::{Builtin, ChatTemplate, Message, TemplateLimits};
pub use tokenizer::GgufTokenizer;

use crate::{Error, Limits, Result};

/// A loaded model: the file's bytes (one copy; weights are read from it in place), its configuration, tokenizer
/// and chat template.
pub struct Model {
    data: Vec<u8>,
    /// Weights and configuration.
    pub weights: Weights,
    /// The tokenizer from the file's metadata.
    pub tokenizer: GgufTokenizer,
    template: ChatTemplate,
    /// Whether the chat template came from the file (`false`: the built-in fallback for the architecture).
    pub template_from_file: bool,
    /// `general.name`, when present.
    pub name: Option<String>,
    adapters: Vec<(String, Adapter)>,
    #[cfg(feature = "gpu")]
    gpu: Option<GpuBackend>,
}

/// A GPU and the model's weights uploaded to it.
#[cfg(feature = "gpu")]
pub struct GpuBackend {
    /// The device.
    pub gpu: std::sync::Arc<crate::kernels::gpu::Gpu>,
    weights: gpu::GpuWeights,
}

#[cfg(feature = "gpu")]
impl GpuBackend {
    /// The weights on the GPU.
    pub fn weights(&self) -> &gpu::GpuWeights {
        &self.weights
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("config", &self.weights.cfg)
            .field("bytes", &self.data.len())
            .field(
                "adapters",
                &self.adapters.iter().map(|a| &a.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Context size (KV cache) in tokens; the prompt plus the answer must fit. 0 = the prompt + `max_tokens`,
    /// capped at the model's training context.
    pub context: usize,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Generation stops before any of these strings; they are not part of the answer.
    pub stop: Vec<String>,
    /// Tokens per prefill batch (matrix × matrix).
    pub batch: usize,
    /// How many of the first step's most likely tokens to report (0 = none).
    pub top_logits: usize,
    /// Keep going past end-of-sequence / end-of-turn tokens (benchmarks: a fixed number of tokens).
    pub ignore_eos: bool,
    /// LoRA adapters to apply, by the name they were loaded under, each with a weight (none: the base model).
    pub adapters: Vec<AdapterUse>,
}

/// One adapter applied to a request: `y = W·x + Σ weight · scale · B(A·x)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterUse {
    /// The name it was loaded under ([`Model::add_adapter`]).
    pub name: String,
    /// Its weight (1 = as trained; 0 = off).
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            context: 0,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            batch: 64,
            top_logits: 0,
            ignore_eos: false,
            adapters: Vec::new(),
        }
    }
}

/// One generated token, as it is streamed.
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    /// Token id; `None` for the last event, which flushes text held back (a possible stop string that did not
    /// complete, or the end of a character).
    pub id: Option<u32>,
    /// Text that became complete with this token (may be empty mid-character, or held back while it could be
    /// the start of a stop string).
    pub text: &'a str,
    /// Index of the token in the answer.
    pub index: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "value")]
pub enum StopReason {
    /// The model produced its end-of-sequence or end-of-turn token.
    Eos,
    /// A stop string appeared (it is cut from the text).
    Stop(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop.
    Aborted,
}

/// The result of [`Model::generate`].
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Generated ids (an end token, when one ended the answer, included).
    pub ids: Vec<u32>,
    /// Generated text (stop strings and end tokens cut).
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// The first step's most likely tokens: (id, logit), when asked for.
    pub top_logits: Vec<(u32, f32)>,
    /// Prompt processing time, milliseconds.
    pub prefill_ms: f64,
    /// Decoding time (after the first token), milliseconds.
    pub decode_ms: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / (self.prefill_ms / 1e3)
    }
    /// Generated tokens per second (after the first).
    pub fn decode_tok_s(&self) -> f64 {
        (self.ids.len().saturating_sub(1)) as f64 / (self.decode_ms / 1e3)
    }
}

pub use crate::clock::now_ms;

impl Model {
    /// Load from the GGUF file's bytes, with the default [`Limits`].
    pub fn from_bytes(data: Vec<u8>) -> Result<Model> {
        Model::from_bytes_with_limits(data, &Limits::default())
    }

    /// Load from the GGUF file's bytes. The bytes are kept (weights stay quantized, read in place).
    pub fn from_bytes_with_limits(data: Vec<u8>, limits: &Limits) -> Result<Model> {
        Limits::check("model bytes", data.len(), limits.max_model_bytes)?;
        let g = Gguf::parse(&data, GgufLimits::default())?;
        let weights = Weights::from_gguf(&g, &data)?;
        let tokenizer = GgufTokenizer::from_gguf(&g)?;
        if tokenizer.vocab_len() != weights.cfg.n_vocab {
            return Err(Error::Model {
                file: "model.gguf",
                detail: format!(
                    "the vocabulary has {} tokens but token_embd.weight has {} rows",
                    tokenizer.vocab_len(),
                    weights.cfg.n_vocab
                ),
            });
        }
        let tok = |id: Option<u32>| id.map_or("", |i| tokenizer.token_str(i)).to_owned();
        let (bos, eos) = (tok(tokenizer.bos), tok(tokenizer.eos));
        let builtin = match weights.cfg.arch {
            Arch::Qwen2 => Builtin::ChatMl,
            Arch::Llama if tokenizer.token_id("<|start_header_id|>").is_some() => Builtin::Llama3,
            Arch::Llama if tokenizer.token_id("<|im_start|>").is_some() => Builtin::ChatMl,
            Arch::Llama => Builtin::Llama2,
        };
        let (template, template_from_file) = match g.str("tokenizer.chat_template")? {
            Some(src) => (
                ChatTemplate::new(src, &bos, &eos, TemplateLimits::default())
                    .map_err(|e| Error::Template(e.to_string()))?,
                true,
            ),
            None => (ChatTemplate::builtin(builtin, &bos, &eos), false),
        };
        let name = g.str("general.name")?.map(str::to_owned);
        Ok(Model {
            data,
            weights,
            tokenizer,
            template,
            template_from_file,
            name,
            adapters: Vec::new(),
            #[cfg(feature = "gpu")]
            gpu: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.weights.cfg
    }

    /// The model file's bytes (weights are read from them in place).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of the model file held in memory.
    pub fn file_bytes(&self) -> usize {
        self.data.len()
    }

    /// Token ids of `text`, with BOS first when the model asks for it. `parse_special`: see
    /// [`GgufTokenizer::encode`].
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(b)) = (self.tokenizer.add_bos, self.tokenizer.bos) {
            ids.push(b);
        }
        let body = self.tokenizer.encode(text, parse_special)?;
        if !ids.is_empty() && body.first() == ids.first() {
            return Ok(body);
        }
        ids.extend(body);
        Ok(ids)
    }

    /// `text` with every control-token string in it (`<|im_start|>`, `<|eot_id|>`, …) broken up by a zero-width
    /// space after its first character, so that text from documents or users cannot act as a control token when
    /// it is placed inside a chat template whose output is tokenized with specials parsed.
    pub fn neutralize_special(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in self.tokenizer.control_strings() {
            if out.contains(s) {
                let first = s.chars().next().map_or(0, char::len_utf8);
                out = out.replace(s, &format!("{}\u{200B}{}", &s[..first], &s[first..]));
            }
        }
        out
    }

    /// The chat template applied to `messages` (with the assistant turn opened), as text.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template
            .render(messages, true)
            .map_err(|e| Error::Template(e.to_string()))
    }

    /// The chat template applied to `messages`, with or without an opened assistant turn.
    pub fn render_chat_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template
            .render(messages, add_generation_prompt)
            .map_err(|e| Error::Template(e.to_string()))
    }

    /// The chat template applied to `messages`, tokenized (control tokens parsed).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        self.encode(&text, true)
    }

    /// A fresh KV cache for `n_ctx` tokens.
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache> {
        KvCache::new(&self.weights, n_ctx)
    }

    /// Logits after running `tokens` through the base model in `cache` (last token only, or all).
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        self.weights.forward(&self.data, cache, tokens, all, &[])
    }

    /// [`Model::forward`] with adapters applied (each with its weight). A cache must be used with one adapter mix
    /// throughout: its keys and values depend on it.
    pub fn forward_with(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        all: bool,
        adapters: &ActiveAdapters,
    ) -> Result<Vec<f32>> {
        self.weights
            .forward(&self.data, cache, tokens, all, adapters)
    }

    /// Check a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) against this model.
    pub fn adapter_from_peft(&self, config_json: &[u8], safetensors: &[u8]) -> Result<Adapter> {
        Limits::check(
            "adapter bytes",
            safetensors.len(),
            Limits::default().max_model_bytes,
        )?;
        Adapter::from_peft(config_json, safetensors, &self.weights)
    }

    /// Check a GGUF-LoRA adapter against this model.
    pub fn adapter_from_gguf(&self, bytes: &[u8]) -> Result<Adapter> {
        Limits::check(
            "adapter bytes",
            bytes.len(),
            Limits::default().max_model_bytes,
        )?;
        Adapter::from_gguf(bytes, &self.weights)
    }

    /// Check an adapter from its bytes: a GGUF-LoRA file (starts with `GGUF`; `config_json` must be `None`), or
    /// PEFT's `adapter_model.safetensors` with its `adapter_config.json`.
    pub fn adapter_from_bytes(&self, bytes: &[u8], config_json: Option<&[u8]>) -> Result<Adapter> {
        match (bytes.starts_with(b"GGUF"), config_json) {
            (true, None) => self.adapter_from_gguf(bytes),
            (false, Some(c)) => self.adapter_from_peft(c, bytes),
            (true, Some(_)) => Err(Error::Adapter {
                tensor: "adapter_config.json".into(),
                detail: "given with a GGUF-LoRA file, which carries its own configuration".into(),
            }),
            (false, None) => Err(Error::Adapter {
                tensor: "adapter_config.json".into(),
                detail: "is needed with adapter_model.safetensors (a PEFT adapter); a GGUF-LoRA file starts with GGUF".into(),
            }),
        }
    }

    /// Keep `adapter` resident under `name` (replacing an adapter of that name), ready for any request to use.
    /// Adapters from [`Model::adapter_from_peft`] / [`Model::adapter_from_gguf`] were checked against this
    /// model; one built by hand is checked here.
    pub fn add_adapter(&mut self, name: &str, adapter: Adapter) -> Result<AdapterInfo> {
        if name.is_empty() || name.len() > 256 {
            return Err(Error::Config(format!(
                "adapter name {name:?} must be 1 to 256 bytes"
            )));
        }
        let mut checked = Adapter::empty(self.weights.cfg.n_layer, adapter.format);
        for (l, t, m) in adapter.mats() {
            let tensor = format!("blk.{l}.{}", t.gguf_name());
            checked.set(&self.weights, &tensor, l, t, m.clone())?;
        }
        let info = checked.info();
        match self.adapters.iter_mut().find(|a| a.0 == name) {
            Some(slot) => slot.1 = checked,
            None => self.adapters.push((name.to_owned(), checked)),
        }
        Ok(info)
    }

    /// Drop the adapter called `name`; `false` if there was none.
    pub fn remove_adapter(&mut self, name: &str) -> bool {
        let before = self.adapters.len();
        self.adapters.retain(|a| a.0 != name);
        self.adapters.len() != before
    }

    /// The resident adapters, by name.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &Adapter)> {
        self.adapters.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// The resident adapters that `uses` names, with their weights.
    pub fn active_adapters(&self, uses: &[AdapterUse]) -> Result<Vec<(&Adapter, f32)>> {
        uses.iter()
            .map(|u| {
                if !u.weight.is_finite() {
                    return Err(Error::Config(format!(
                        "adapter {:?} has weight {}",
                        u.name, u.weight
                    )));
                }
                self.adapters
                    .iter()
                    .find(|a| a.0 == u.name)
                    .map(|a| (&a.1, u.weight))
                    .ok_or_else(|| {
                        Error::NotFound(format!("no adapter named {:?} is loaded", u.name))
                    })
            })
            .collect()
    }

    /// Generate an answer to `prompt` (token ids) in a fresh cache, on the CPU. `on_token` sees each token as it
    /// comes and returns `false` to stop (the result then says [`StopReason::Aborted`]).
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        let mut stepper = self.cpu_stepper(prompt, opts, false)?;
        run_ready(self.generate_core(&mut stepper, prompt, opts, on_token))
    }

    /// Choose where this model runs: `Cpu`; `Gpu` (an error when no GPU answers or the weights do not fit);
    /// `Auto` (a hardware GPU when one answers and takes the weights, else the CPU — a software adapter such as
    /// lavapipe or SwiftShader is slower than the CPU path — with the reason in the report's `notice`).
    pub async fn use_device(
        &mut self,
        pref: crate::kernels::DevicePref,
    ) -> Result<crate::kernels::DeviceReport> {
        use crate::kernels::{DevicePref, DeviceReport};
        #[cfg(feature = "gpu")]
        {
            self.gpu = None;
            if pref == DevicePref::Cpu {
                return Ok(DeviceReport::cpu(None));
            }
            let auto = pref == DevicePref::Auto;
            let g = match crate::kernels::gpu::Gpu::new().await {
                Ok(g) => g,
                Err(e) if auto => return Ok(DeviceReport::cpu(Some(e.to_string()))),
                Err(e) => return Err(e),
            };
            if auto && g.info.software {
                // (A browser's fallback adapter may have no name: headless Chromium's SwiftShader has none.)
                let name = match g.info.name.as_str() {
                    "" => "the browser's fallback adapter",
                    n => n,
                };
                return Ok(DeviceReport::cpu(Some(format!(
                    "the only GPU adapter is a software one ({name}); the CPU path is faster"
                ))));
            }
            #[allow(clippy::arc_with_non_send_sync)]
            // wasm's WebGPU handles are neither; one thread there
            let g = std::sync::Arc::new(g);
            match self.attach_gpu(g) {
                Ok(r) => Ok(r),
                Err(e) if auto => Ok(DeviceReport::cpu(Some(e.to_string()))),
                Err(e) => Err(e),
            }
        }
        #[cfg(not(feature = "gpu"))]
        match pref {
            DevicePref::Gpu => Err(Error::FeatureDisabled("GPU", "gpu")),
            DevicePref::Auto => Ok(DeviceReport::cpu(Some(
                "this build has no GPU support (cargo feature gpu)".into(),
            ))),
            DevicePref::Cpu => Ok(DeviceReport::cpu(None)),
        }
    }

    /// Run on `gpu`, a device opened once and shared (with other models, or across tests): the weights are
    /// uploaded to it and compiled kernels are reused.
    #[cfg(feature = "gpu")]
    pub fn attach_gpu(
        &mut self,
        gpu: std::sync::Arc<crate::kernels::gpu::Gpu>,
    ) -> Result<crate::kernels::DeviceReport> {
        self.gpu = None;
        let weights = gpu::GpuWeights::upload(&gpu, &self.weights, &self.data)?;
        self.gpu = Some(GpuBackend { gpu, weights });
        Ok(self.device())
    }

    /// Where the model runs now.
    pub fn device(&self) -> crate::kernels::DeviceReport {
        #[cfg(feature = "gpu")]
        if let Some(b) = &self.gpu {
            return crate::kernels::DeviceReport {
                kind: "gpu".into(),
                name: Some(b.gpu.info.name.clone()),
                backend: Some(b.gpu.info.backend.clone()),
                software: b.gpu.info.software,
                subgroups: b.gpu.subgroups(),
                notice: None,
                submissions: b
                    .gpu
                    .counters
                    .submissions
                    .load(std::sync::atomic::Ordering::Relaxed) as u64,
                submit_us: b
                    .gpu
                    .counters
                    .submit_us
                    .load(std::sync::atomic::Ordering::Relaxed),
            };
        }
        crate::kernels::DeviceReport::cpu(None)
    }

    /// The GPU in use, if any.
    #[cfg(feature = "gpu")]
    pub fn gpu(&self) -> Option<&GpuBackend> {
        self.gpu.as_ref()
    }

    /// [`Model::generate`] on the device chosen with [`Model::use_device`] (the CPU by default; on the GPU every
    /// step is one submission and only logits come back, and greedy decoding without penalties runs several
    /// steps a submission, choosing each token there: only the ids come back). A lost GPU fails the request it
    /// happens in with `Error::Device`; later requests run on the CPU until `use_device` is called again.
    pub async fn generate_async(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        #[cfg(feature = "gpu")]
        if let Some(b) = self.gpu.as_ref().filter(|b| b.gpu.check().is_ok()) {
            let (n_ctx, lora) = self.prepare(prompt, opts)?;
            let session = gpu::GpuSession::new(
                &b.gpu,
                &b.weights,
                &self.weights,
                &self.data,
                n_ctx,
                opts.batch,
                &lora,
            )?;
            let mut stepper = GpuStepper(session);
            let r = self
                .generate_core(&mut stepper, prompt, opts, on_token)
                .await;
            if matches!(r, Err(Error::Device(_))) {
                b.gpu.mark_lost();
            }
            return r;
        }
        let mut stepper = self.cpu_stepper(prompt, opts, cfg!(target_arch = "wasm32"))?;
        self.generate_core(&mut stepper, prompt, opts, on_token)
            .await
    }

    /// A checked request's CPU stepper: a fresh cache of the request's context, its adapters.
    fn cpu_stepper(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        yield_between: bool,
    ) -> Result<CpuStepper<'_>> {
        let (n_ctx, lora) = self.prepare(prompt, opts)?;
        Ok(CpuStepper {
            model: self,
            cache: self.new_cache(n_ctx)?,
            lora,
            batch: opts.batch.max(1),
            yield_between,
        })
    }

    /// Check a request; the context size and the adapters it uses.
    fn prepare(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
    ) -> Result<(usize, Vec<(&Adapter, f32)>)> {
        if prompt.is_empty() {
            return Err(Error::InvalidQuery("the prompt has no tokens".into()));
        }
        Sampler::new(opts.sampler)?;
        let lora = self.active_adapters(&opts.adapters)?;
        if opts.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::Config("a stop string is empty".into()));
        }
        let n_ctx = if opts.context == 0 {
            (prompt.len() + opts.max_tokens).min(self.weights.cfg.n_ctx_train.max(prompt.len()))
        } else {
            opts.context
        };
        if prompt.len() > n_ctx {
            return Err(Error::ContextOverflow {
                tokens: prompt.len(),
                context: n_ctx,
            });
        }
        Ok((n_ctx, lora))
    }

    /// The generation loop, over any backend's forward pass.
    async fn generate_core<S: Stepper>(
        &self,
        stepper: &mut S,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(opts.sampler)?;
        let t0 = now_ms();
        let mut logits = stepper.step(prompt).await?;
        let prefill_ms = now_ms() - t0;
        let top_logits = sampler::top_k(&logits, opts.top_logits);
        let mut history = prompt.to_vec();
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut emitted = 0usize;
        let mut utf8 = tokenizer::Utf8Stream::default();
        let max_stop = opts.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut t_first = None;
        // Tokens run through the model (the prompt, then each token fed back), and tokens a device's greedy
        // decoding returned ahead, in order.
        let mut fed = prompt.len();
        let mut queued = std::collections::VecDeque::new();
        let device_greedy = opts.sampler.plain_greedy();
        // Sampling whose draw depends only on the largest logits: the device finds them and the rest stay there.
        let device_top = sampler
            .top_k_suffices(stepper.top_max())
            .then_some(opts.sampler.top_k);
        let mut top: Option<Vec<(u32, f32)>> = None;
        let stop_reason = loop {
            if opts.max_tokens == 0 {
                break StopReason::MaxTokens;
            }
            let id = match (queued.pop_front(), top.take()) {
                (Some(id), _) => id,
                (None, Some(top)) => sampler.sample_top(&top),
                (None, None) => sampler.sample(&mut logits, &history),
            };
            ids.push(id);
            history.push(id);
            t_first.get_or_insert_with(now_ms);
            if self.tokenizer.is_end(id) && !opts.ignore_eos {
                break StopReason::Eos;
            }
            text.push_str(&utf8.push(self.tokenizer.token_bytes(id)));
            // A stop string anywhere in the new part of the text ends the answer before it.
            let from = emitted.saturating_sub(max_stop);
            let hit = opts
                .stop
                .iter()
                .filter_map(|s| {
                    text[from..]
                        .find(s.as_str())
                        .map(|at| (from + at, s.clone()))
                })
                .min();
            if let Some((at, s)) = hit {
                text.truncate(at);
                let ev = TokenEvent {
                    id: Some(id),
                    text: &text[emitted.min(at)..],
                    index: ids.len() - 1,
                };
                on_token(&ev);
                emitted = text.len();
                break StopReason::Stop(s);
            }
            // Hold back a tail that could still become a stop string.
            let mut safe = text.len();
            for s in &opts.stop {
                for l in (1..s.len()).rev() {
                    if text.len() >= l
                        && text.is_char_boundary(text.len() - l)
                        && s.as_bytes().starts_with(&text.as_bytes()[text.len() - l..])
                    {
                        safe = safe.min(text.len() - l);
                        break;
                    }
                }
            }
            let safe = safe.max(emitted);
            let ev = TokenEvent {
                id: Some(id),
                text: &text[emitted..safe],
                index: ids.len() - 1,
            };
            emitted = safe;
            if !on_token(&ev) {
                break StopReason::Aborted;
            }
            if ids.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            if fed >= stepper.n_ctx() {
                break StopReason::ContextFull;
            }
            // Greedy: the device may run several steps at once (the next tokens come queued, their steps
            // run); otherwise one step, and the next token sampled from its logits.
            if queued.is_empty() {
                let want = opts.max_tokens - ids.len();
                if device_greedy {
                    match stepper.greedy(id, want).await? {
                        Some(next) => queued.extend(next),
                        None => logits = stepper.step(&[id]).await?,
                    }
                } else if let Some(k) = device_top {
                    match stepper.step_top(&[id], k).await? {
                        Some(t) => top = Some(t),
                        None => logits = stepper.step(&[id]).await?,
                    }
                } else {
                    logits = stepper.step(&[id]).await?;
                }
            }
            fed += 1;
        };
        if !matches!(stop_reason, StopReason::Stop(_)) {
            text.push_str(&utf8.finish());
        }
        if emitted < text.len() && stop_reason != StopReason::Aborted {
            on_token(&TokenEvent {
                id: None,
                text: &text[emitted..],
                index: ids.len(),
            });
        }
        let decode_ms = t_first.map_or(0.0, |t| now_ms() - t);
        Ok(Generation {
            prompt_ids: prompt.to_vec(),
            ids,
            text,
            stop_reason,
            top_logits,
            prefill_ms,
            decode_ms,
        })
    }
}

/// One backend's forward pass inside a generation: run tokens, get the last one's logits.
trait Stepper {
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Greedy decoding on the device, where it has it: the tokens that follow `last` (at most `want`, at least
    /// one), each the argmax of the logits after the one before; `None`: use `step` and the sampler.
    async fn greedy(&mut self, _last: u32, _want: usize) -> Result<Option<Vec<u32>>> {
        Ok(None)
    }
    /// The largest `k` [`Stepper::step_top`] takes (0: none).
    fn top_max(&self) -> usize {
        0
    }
    /// Run `tokens` and return the last one's `k` largest logits in the sampler's order, found by the device
    /// ([`Sampler::sample_top`] draws from them); `None`: use `step`.
    async fn step_top(&mut self, _tokens: &[u32], _k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        Ok(None)
    }
    fn n_ctx(&self) -> usize;
}

struct CpuStepper<'a> {
    model: &'a Model,
    cache: KvCache,
    lora: Vec<(&'a Adapter, f32)>,
    batch: usize,
    /// Give the JS event loop a turn after each step (wasm's async path), so tokens stream out and an abort
    /// from the page arrives while the answer is being generated.
    yield_between: bool,
}

impl Stepper for CpuStepper<'_> {
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        for part in tokens.chunks(self.batch) {
            logits = self
                .model
                .forward_with(&mut self.cache, part, false, &self.lora)?;
            if self.yield_between {
                crate::kernels::yield_now().await;
            }
        }
        Ok(logits)
    }
    fn n_ctx(&self) -> usize {
        self.cache.n_ctx()
    }
}

/// Drive a future that never waits (the CPU path) to its end.
fn run_ready<F: std::future::Future<Output = Result<T>>, T>(f: F) -> Result<T> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => Err(Error::Config(
            "internal: a CPU generation waited on something".into(),
        )),
    }
}

#[cfg(feature = "gpu")]
struct GpuStepper<'a>(gpu::GpuSession<'a>);

#[cfg(feature = "gpu")]
impl Stepper for GpuStepper<'_> {
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.0.forward(tokens).await
    }
    async fn greedy(&mut self, last: u32, want: usize) -> Result<Option<Vec<u32>>> {
        if !self.0.greedy_on_gpu() {
            return Ok(None);
        }
        Ok(Some(self.0.greedy(last, want).await?))
    }
    fn top_max(&self) -> usize {
        self.0.top_max()
    }
    async fn step_top(&mut self, tokens: &[u32], k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        Ok(Some(self.0.forward_top(tokens, k).await?))
    }
    fn n_ctx(&self) -> usize {
        self.0.n_ctx()
    }
}
