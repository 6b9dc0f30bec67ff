//! Embedding: a sentence-transformers model (ONNX, tokenizer.json through `tokenizers`) turns texts into pooled,
//! optionally normalized vectors.
//!
//! [`Embedder::from_bytes`] takes the files of a Hugging Face sentence-transformers folder as bytes
//! ([`EmbedderFiles`]): `model.onnx` (fp32 or weight-int8), `tokenizer.json`, and when present `config.json`,
//! `1_Pooling/config.json`, `sentence_bert_config.json` and `modules.json`. The ONNX file is validated before
//! anything allocates from it. Two engines ([`Engine`]): lorag's BERT encoder (`bert.rs`, the default for the
//! graphs it recognizes; no padding, weights packed once) and, with the `onnx` feature, tract (the graph optimized
//! once with the model's own symbolic batch and sequence dimensions, so one plan serves every batch shape).

mod bert;
mod gemm;
mod onnx;
pub(crate) mod pb;

#[cfg(feature = "onnx")]
use std::sync::Arc;

use crate::clock::now_ms;
use crate::{Error, Limits, Result};
use serde::{Deserialize, Serialize};
#[cfg(feature = "onnx")]
use tract_onnx::prelude::*;
#[cfg(feature = "onnx")]
use tract_onnx::tract_hir::internal::DimLike;

/// The files of a sentence-transformers model folder, as bytes.
#[derive(Clone, Copy, Default)]
pub struct EmbedderFiles<'a> {
    /// `model.onnx`.
    pub model_onnx: &'a [u8],
    /// `tokenizer.json`.
    pub tokenizer_json: &'a [u8],
    /// `config.json` (hidden size, vocabulary size).
    pub config_json: Option<&'a [u8]>,
    /// `1_Pooling/config.json` (mean / CLS / max).
    pub pooling_config_json: Option<&'a [u8]>,
    /// `sentence_bert_config.json` (`max_seq_length`, `do_lower_case`).
    pub sentence_bert_config_json: Option<&'a [u8]>,
    /// `modules.json` (a `Normalize` module turns normalization on).
    pub modules_json: Option<&'a [u8]>,
}

/// Choices the model folder does not make, or that the caller overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmbedderConfig {
    /// Normalize vectors to unit length. Default: what `modules.json` says (a `Normalize` module), else no.
    pub normalize: Option<bool>,
    /// Text put before every query (e5: `"query: "`, bge: its instruction).
    pub query_prefix: String,
    /// Text put before every passage (e5: `"passage: "`).
    pub passage_prefix: String,
    /// Texts per forward pass (default 16); inputs are sorted by length (tract pads each batch to its longest;
    /// the native encoder does not pad).
    pub batch_size: Option<usize>,
    /// Override `max_seq_length` (tokens, special tokens included).
    pub max_seq_length: Option<usize>,
    /// Run the graph as exported, without moving int8 embedding-table dequantization after the row lookup
    /// (the rewrite is exact; this exists so tests can prove it). Not part of the stable API.
    #[doc(hidden)]
    pub as_exported: bool,
    /// What runs the graph. Default: lorag's own BERT encoder when the graph is one it recognizes
    /// (sentence-transformers BERT exports; tested: all-MiniLM-L6-v2 int8 and paraphrase-MiniLM-L3-v2 fp32), else
    /// tract.
    pub engine: Option<Engine>,
}

/// What runs an embedder's graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// lorag's BERT encoder (its own kernels; weights packed once; no padding). Refused, with the reason,
    /// for a graph it does not recognize.
    Native,
    /// tract-onnx's optimized plan: any graph tract runs.
    Tract,
}

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps.
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// Element-wise maximum over the kept tokens.
    Max,
}

/// One embedded text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// The vector (unit length when the embedder normalizes).
    pub vector: Vec<f32>,
    /// Tokens the model read, special tokens included.
    pub tokens: usize,
    /// The text was longer than `max_seq_length` and was cut (chunking should have prevented it).
    pub truncated: bool,
}

/// Queries and passages may get different prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// A search query.
    Query,
    /// A document passage.
    Passage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

/// A loaded sentence embedder. Cheap to share (`&self` methods); build once per model.
pub struct Embedder {
    tokenizer: tokenizers::Tokenizer,
    runner: Runner,
    #[cfg_attr(not(feature = "onnx"), allow(dead_code))]
    inputs: Vec<(Role, IdType)>,
    dim: usize,
    vocab_size: usize,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    do_lower_case: bool,
    #[cfg_attr(not(feature = "onnx"), allow(dead_code))]
    pad_id: u32,
    batch_size: usize,
    config: EmbedderConfig,
    identity: String,
}

enum Runner {
    Native {
        bert: Box<bert::Bert>,
        scratch: Box<std::sync::Mutex<bert::Scratch>>,
    },
    #[cfg(feature = "onnx")]
    Tract(Arc<TypedRunnableModel>),
}

/// Element type of a graph's id inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdType {
    I64,
    I32,
}

fn model_err(file: &'static str) -> impl Fn(String) -> Error {
    move |detail| Error::Model { file, detail }
}

fn json(bytes: Option<&[u8]>, file: &'static str) -> Result<Option<serde_json::Value>> {
    bytes
        .map(|b| {
            serde_json::from_slice(b).map_err(|e| Error::Model {
                file,
                detail: format!("not valid JSON: {e}"),
            })
        })
        .transpose()
}

impl Embedder {
    /// Load and validate a model from its files. Checks, before running anything: the ONNX tensors against
    /// their declared sizes, the graph's inputs (`input_ids` and `attention_mask` required, `token_type_ids`
    /// fed only when present), the token-states output (by name `last_hidden_state`, else the rank-3 output),
    /// and the tokenizer's vocabulary against the model's.
    pub fn from_bytes(
        files: EmbedderFiles<'_>,
        config: EmbedderConfig,
        limits: &Limits,
    ) -> Result<Self> {
        Limits::check(
            "model bytes",
            files.model_onnx.len(),
            limits.max_model_bytes,
        )?;
        let proto = onnx::decode_and_validate(files.model_onnx, limits.max_model_bytes)?;
        let (graph_inputs, graph_outputs) = onnx::graph_io(&proto);

        // Inputs by name.
        let onnx_err = model_err("model.onnx");
        let mut inputs = Vec::new();
        for io in &graph_inputs {
            let role = match io.name.as_str() {
                n if n.contains("input_ids") => Role::InputIds,
                n if n.contains("attention_mask") => Role::AttentionMask,
                n if n.contains("token_type_ids") => Role::TokenTypeIds,
                other => return Err(onnx_err(format!("unexpected graph input {other:?} (known: input_ids, attention_mask, token_type_ids)"))),
            };
            let dt = match io.elem_type {
                7 => IdType::I64,
                6 => IdType::I32,
                t => {
                    return Err(onnx_err(format!(
                        "graph input {} has element type {t}; expected int64 or int32",
                        io.name
                    )))
                }
            };
            inputs.push((role, dt));
        }
        for required in [Role::InputIds, Role::AttentionMask] {
            if !inputs.iter().any(|(r, _)| *r == required) {
                return Err(onnx_err(format!(
                    "the graph has no {required:?} input (it has {:?})",
                    graph_inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
                )));
            }
        }
        // The token-states output.
        let out_ix = graph_outputs
            .iter()
            .position(|o| o.name == "last_hidden_state")
            .or_else(|| {
                graph_outputs
                    .iter()
                    .position(|o| o.dims.as_ref().is_some_and(|d| d.len() == 3))
            })
            .ok_or_else(|| {
                onnx_err(format!(
                    "no token-states output (rank 3) among {:?}",
                    graph_outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
                ))
            })?;

        // Configuration files.
        let cfg = json(files.config_json, "config.json")?;
        let pooling_cfg = json(files.pooling_config_json, "1_Pooling/config.json")?;
        let sbert = json(files.sentence_bert_config_json, "sentence_bert_config.json")?;
        let modules = json(files.modules_json, "modules.json")?;
        let pooling = match &pooling_cfg {
            Some(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => {
                Pooling::Cls
            }
            Some(p) if p.get("pooling_mode_max_tokens").and_then(|v| v.as_bool()) == Some(true) => {
                Pooling::Max
            }
            _ => Pooling::Mean,
        };
        let normalize = config.normalize.unwrap_or_else(|| {
            modules
                .as_ref()
                .and_then(|m| m.as_array())
                .is_some_and(|mods| {
                    mods.iter().any(|m| {
                        m.get("type")
                            .and_then(|t| t.as_str())
                            .is_some_and(|t| t.ends_with("Normalize"))
                    })
                })
        });
        let max_positions = cfg
            .as_ref()
            .and_then(|c| c.get("max_position_embeddings"))
            .and_then(|v| v.as_u64())
            .unwrap_or(512) as usize;
        let max_seq_length = config
            .max_seq_length
            .or_else(|| {
                sbert
                    .as_ref()
                    .and_then(|s| s.get("max_seq_length"))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
            })
            .unwrap_or(max_positions.min(512));
        if max_seq_length < 2 || max_seq_length > max_positions {
            return Err(Error::Config(format!(
                "max_seq_length {max_seq_length} is outside 2..={max_positions}"
            )));
        }
        let do_lower_case = sbert
            .as_ref()
            .and_then(|s| s.get("do_lower_case"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);

        // Tokenizer: padding off (we pad per batch), truncation to max_seq_length (special tokens included).
        let tok_err = |e: String| Error::Tokenizer(e);
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(files.tokenizer_json)
            .map_err(|e| tok_err(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let model_vocab = cfg
            .as_ref()
            .and_then(|c| c.get("vocab_size"))
            .and_then(|v| v.as_u64())
            .map(|v| v as i64)
            .or_else(|| onnx::word_embedding_rows(&proto));
        if let Some(mv) = model_vocab {
            if mv as usize != vocab_size {
                return Err(tok_err(format!(
                    "tokenizer.json has {vocab_size} tokens but the model's vocabulary has {mv}"
                )));
            }
        }
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0);

        // lorag's encoder when the graph is a BERT it recognizes (and the caller did not ask for tract).
        let out_name = graph_outputs[out_ix].name.clone();
        let native = match config.engine {
            Some(Engine::Tract) if cfg!(feature = "onnx") => None,
            Some(Engine::Tract) => {
                return Err(Error::Config(
                    "this build of lorag has no tract engine (the `onnx` feature)".into(),
                ))
            }
            Some(Engine::Native) => Some(bert::from_graph(&proto, &out_name).map_err(|why| {
                onnx_err(format!("the native engine does not run this graph: {why}"))
            })?),
            None if cfg!(feature = "onnx") => bert::from_graph(&proto, &out_name).ok(),
            None => Some(bert::from_graph(&proto, &out_name).map_err(|why| {
                onnx_err(format!(
                    "not a BERT graph lorag's encoder runs, and this build has no tract engine (the `onnx` feature): {why}"
                ))
            })?),
        };
        drop(proto);
        let (runner, dim) = match native {
            Some(bert) => {
                if bert.vocab() != vocab_size {
                    return Err(tok_err(format!(
                        "tokenizer.json has {vocab_size} tokens but the model's vocabulary has {}",
                        bert.vocab()
                    )));
                }
                if max_seq_length > bert.max_positions() {
                    return Err(Error::Config(format!(
                        "max_seq_length {max_seq_length} is over the model's {} positions",
                        bert.max_positions()
                    )));
                }
                let dim = bert.hidden();
                let runner = Runner::Native {
                    bert: Box::new(bert),
                    scratch: Default::default(),
                };
                (runner, dim)
            }
            #[cfg(feature = "onnx")]
            None => Self::tract_plan(
                files.model_onnx,
                &graph_inputs,
                &inputs,
                out_ix,
                &cfg,
                &config,
            )?,
            #[cfg(not(feature = "onnx"))]
            None => unreachable!("refused above without tract"),
        };

        use sha2::Digest;
        let digest = sha2::Sha256::digest(files.model_onnx);
        let identity = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let batch_size = config.batch_size.unwrap_or(16).clamp(1, 1024);
        Ok(Embedder {
            tokenizer,
            runner,
            inputs,
            dim,
            vocab_size,
            pooling,
            normalize,
            max_seq_length,
            do_lower_case,
            pad_id,
            batch_size,
            config,
            identity,
        })
    }

    /// The tract plan, with the model's own symbolic dims. tract reads the file with its own (complete) ONNX
    /// schema, after lorag's validation of the same bytes.
    #[cfg(feature = "onnx")]
    fn tract_plan(
        model_onnx: &[u8],
        graph_inputs: &[onnx::Io],
        inputs: &[(Role, IdType)],
        out_ix: usize,
        cfg: &Option<serde_json::Value>,
        config: &EmbedderConfig,
    ) -> Result<(Runner, usize)> {
        let onnx_err = model_err("model.onnx");
        let mut proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(model_onnx)
            .map_err(|e| onnx_err(format!("not a valid ONNX protobuf: {e}")))?;
        // Intermediate shapes in `value_info` are exporter hints, sometimes wrong (the MiniLM int8 export
        // declares an attention-mask broadcast as [batch, 1, sequence, sequence]); tract infers its own.
        if !config.as_exported {
            onnx::gather_before_dequantize(&mut proto);
        }
        let mut model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_proto_model(&proto)
            .map_err(tract_err)?;
        for (ix, io) in graph_inputs.iter().enumerate() {
            let dims = io
                .dims
                .clone()
                .unwrap_or_else(|| vec![Err("batch".into()), Err("sequence".into())]);
            if dims.len() != 2 {
                return Err(onnx_err(format!(
                    "graph input {} has rank {}, expected [batch, sequence]",
                    io.name,
                    dims.len()
                )));
            }
            let shape: TVec<TDim> = dims
                .iter()
                .enumerate()
                .map(|(k, d)| match d {
                    Ok(n) if *n > 0 => TDim::from(*n),
                    Ok(_) | Err(_) => {
                        let name = match d {
                            Err(n) if !n.is_empty() => n.clone(),
                            _ => {
                                if k == 0 {
                                    "batch".into()
                                } else {
                                    "sequence".into()
                                }
                            }
                        };
                        model.symbols.sym(&name).into()
                    }
                })
                .collect();
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(inputs[ix].1.datum_type(), shape),
                )
                .map_err(tract_err)?;
        }
        let out = model.output_outlets().map_err(tract_err)?[out_ix];
        model.select_output_outlets(&[out]).map_err(tract_err)?;
        let typed = model.into_optimized().map_err(tract_err)?;
        let dim = typed
            .output_fact(0)
            .map_err(tract_err)?
            .shape
            .last()
            .and_then(|d| d.to_usize().ok())
            .or_else(|| {
                cfg.as_ref()
                    .and_then(|c| c.get("hidden_size"))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
            })
            .ok_or_else(|| {
                onnx_err("cannot tell the hidden size from the output or config.json".into())
            })?;
        let plan = typed.into_runnable().map_err(tract_err)?;

        Ok((Runner::Tract(plan), dim))
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens per input at most (special tokens included).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Pooling mode in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether vectors are normalized to unit length.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Hex SHA-256 (first 128 bits) of `model.onnx`: the model's identity, stored with an index.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Token ids the model will read for `text` (special tokens included, truncated), and whether it was cut.
    pub fn token_ids(&self, text: &str, kind: TextKind) -> Result<(Vec<u32>, bool)> {
        let prefix = match kind {
            TextKind::Query => &self.config.query_prefix,
            TextKind::Passage => &self.config.passage_prefix,
        };
        let mut input = format!("{prefix}{text}");
        if self.do_lower_case {
            input = input.to_lowercase();
        }
        let enc = self
            .tokenizer
            .encode(input, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// Embed texts (queries or passages: the kind picks the prefix). Sorted by length and batched; the
    /// results come back in input order.
    pub fn embed(&self, texts: &[&str], kind: TextKind) -> Result<Vec<Embedding>> {
        let tokenized = texts
            .iter()
            .map(|t| self.token_ids(t, kind))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = tokenized.iter().map(|(ids, _)| ids.clone()).collect();
        let vectors = self.embed_ids(&ids)?;
        Ok(vectors
            .into_iter()
            .zip(tokenized)
            .map(|(vector, (ids, truncated))| Embedding {
                vector,
                tokens: ids.len(),
                truncated,
            })
            .collect())
    }

    /// Embed pre-tokenized inputs (special tokens included), in batches sorted by length.
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (i, seq) in ids.iter().enumerate() {
            if seq.is_empty() || seq.len() > self.max_seq_length {
                return Err(Error::Config(format!(
                    "input {i} has {} tokens; expected 1..={}",
                    seq.len(),
                    self.max_seq_length
                )));
            }
            if let Some(&bad) = seq.iter().find(|&&t| t as usize >= self.vocab_size) {
                return Err(Error::Config(format!(
                    "input {i} has token id {bad} outside the vocabulary ({})",
                    self.vocab_size
                )));
            }
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        for batch in order.chunks(self.batch_size) {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| ids[i].as_slice()).collect();
            for (k, v) in self.run_batch(&seqs)?.into_iter().enumerate() {
                out[batch[k]] = v;
            }
        }
        Ok(out)
    }

    /// Where the time of one forward pass over `ids` (one batch) goes: milliseconds and count per stage (the
    /// native encoder) or per tract operator, most expensive first. For benchmarks and profiles; not part of
    /// the stable API.
    #[doc(hidden)]
    pub fn profile_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<(String, f64, usize)>> {
        let seqs: Vec<&[u32]> = ids.iter().map(|q| q.as_slice()).collect();
        let mut per_op: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        match &self.runner {
            Runner::Native { bert, scratch } => {
                let mut s = scratch.lock().unwrap_or_else(|e| e.into_inner());
                s.profile = Some(Default::default());
                bert.forward(&seqs, &mut s);
                for (k, v) in s.profile.take().unwrap_or_default() {
                    per_op.insert(k.to_string(), v);
                }
            }
            #[cfg(feature = "onnx")]
            Runner::Tract(plan) => {
                let feeds = self.feeds(&seqs)?;
                let mut state =
                    tract_onnx::tract_core::plan::SimpleState::new(plan).map_err(tract_err)?;
                state
                    .run_plan_with_eval(feeds, |ctx, op_state, node, inputs| {
                        let t = now_ms();
                        let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                        let e = per_op.entry(node.op().name().to_string()).or_default();
                        e.0 += now_ms() - t;
                        e.1 += 1;
                        out
                    })
                    .map_err(tract_err)?;
            }
        }
        let mut rows: Vec<(String, f64, usize)> =
            per_op.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(rows)
    }

    /// Bytes of weights the native encoder holds (tables, packed matrices); `None` on tract.
    pub fn weight_bytes(&self) -> Option<usize> {
        match &self.runner {
            Runner::Native { bert, .. } => Some(bert.bytes()),
            #[cfg(feature = "onnx")]
            Runner::Tract(_) => None,
        }
    }

    /// Which engine runs the graph: `"native"` (lorag's BERT encoder) or `"tract"`.
    pub fn engine(&self) -> Engine {
        match self.runner {
            Runner::Native { .. } => Engine::Native,
            #[cfg(feature = "onnx")]
            Runner::Tract(_) => Engine::Tract,
        }
    }

    /// The padded input tensors for one batch, in the graph's input order.
    #[cfg(feature = "onnx")]
    fn feeds(&self, seqs: &[&[u32]]) -> Result<TVec<TValue>> {
        let (b, s) = (seqs.len(), seqs.iter().map(|q| q.len()).max().unwrap_or(1));
        let mut input_ids = vec![self.pad_id as i64; b * s];
        let mut mask = vec![0i64; b * s];
        for (r, q) in seqs.iter().enumerate() {
            for (c, &t) in q.iter().enumerate() {
                input_ids[r * s + c] = t as i64;
                mask[r * s + c] = 1;
            }
        }
        let make = |data: &[i64], dt: IdType| -> Result<TValue> {
            let dt = dt.datum_type();
            let t =
                tract_ndarray::Array2::from_shape_vec((b, s), data.to_vec()).expect("b*s elements");
            let t: Tensor = t.into();
            Ok(t.cast_to_dt(dt).map_err(tract_err)?.into_owned().into())
        };
        let zeros = vec![0i64; b * s];
        self.inputs
            .iter()
            .map(|(role, dt)| match role {
                Role::InputIds => make(&input_ids, *dt),
                Role::AttentionMask => make(&mask, *dt),
                Role::TokenTypeIds => make(&zeros, *dt),
            })
            .collect()
    }

    /// One forward pass over `seqs` (tract: padded to the longest; native: each at its length), then pooled.
    fn run_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let d = self.dim;
        match &self.runner {
            Runner::Native { bert, scratch } => {
                let states = {
                    let mut s = scratch.lock().unwrap_or_else(|e| e.into_inner());
                    bert.forward(seqs, &mut s)
                };
                let mut t0 = 0;
                let out = seqs
                    .iter()
                    .map(|q| {
                        let rows = &states[t0 * d..(t0 + q.len()) * d];
                        t0 += q.len();
                        self.pool(q.len(), |c, k| rows[c * d + k])
                    })
                    .collect();
                Ok(out)
            }
            #[cfg(feature = "onnx")]
            Runner::Tract(plan) => {
                let (b, s) = (seqs.len(), seqs.iter().map(|q| q.len()).max().unwrap_or(1));
                let feeds = self.feeds(seqs)?;
                let outputs = plan.run(feeds).map_err(tract_err)?;
                let states = outputs[0].to_plain_array_view::<f32>().map_err(tract_err)?;
                let shape = states.shape();
                if shape.len() != 3 || shape[0] != b || shape[1] != s || shape[2] != d {
                    return Err(Error::Model {
                        file: "model.onnx",
                        detail: format!(
                            "token states have shape {shape:?}, expected [{b}, {s}, {d}]"
                        ),
                    });
                }
                Ok(seqs
                    .iter()
                    .enumerate()
                    .map(|(r, q)| self.pool(q.len(), |c, k| states[[r, c, k]]))
                    .collect())
            }
        }
    }

    /// Pool `n` token states (`state(token, dim)`) into one vector, normalized when configured.
    fn pool(&self, n: usize, state: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        match self.pooling {
            Pooling::Cls => v.iter_mut().enumerate().for_each(|(d, x)| *x = state(0, d)),
            Pooling::Mean => {
                for c in 0..n {
                    for (d, x) in v.iter_mut().enumerate() {
                        *x += state(c, d);
                    }
                }
                v.iter_mut().for_each(|x| *x /= n as f32);
            }
            Pooling::Max => {
                v.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                for c in 0..n {
                    for (d, x) in v.iter_mut().enumerate() {
                        *x = x.max(state(c, d));
                    }
                }
            }
        }
        if self.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

/// A tract failure as the model's error.
#[cfg(feature = "onnx")]
fn tract_err(e: TractError) -> Error {
    Error::Model {
        file: "model.onnx",
        detail: format!("{e:#}"),
    }
}

#[cfg(feature = "onnx")]
impl IdType {
    fn datum_type(self) -> DatumType {
        match self {
            IdType::I64 => i64::datum_type(),
            IdType::I32 => i32::datum_type(),
        }
    }
}
