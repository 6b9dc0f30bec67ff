//! The generator's tokenizer, built from the GGUF metadata alone (`tokenizer.ggml.*`): no extra file.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3, Qwen2, GPT-2 style vocabularies) is run by the
//! `tokenizers` crate, configured exactly as the model's own `tokenizer.json` would be: the pre-tokenizer named by
//! `tokenizer.ggml.pre` (SmolLM's single digits + GPT-2 regex, Llama 3's and Qwen2's split patterns), the vocabulary
//! and merges from the file, and control / user-defined tokens (`token_type` 3 and 4) as added tokens matched whole.
//!
//! Decoding does not go through `tokenizers`: each token's bytes are precomputed (byte-level characters mapped back
//! to bytes), so a stream of tokens becomes a stream of bytes and text is emitted only at UTF-8 boundaries.

use super::gguf::{Gguf, Value};
use crate::{Error, Result};

fn bad(detail: impl Into<String>) -> Error {
    Error::Model {
        file: "model.gguf",
        detail: detail.into(),
    }
}

/// Token types as GGUF stores them (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// An ordinary vocabulary entry.
    Normal,
    /// The unknown token.
    Unknown,
    /// A control token (`<|im_start|>`, `<|eot_id|>`, …): never produced from plain text unless specials are parsed.
    Control,
    /// A user-defined token, matched whole in text.
    UserDefined,
    /// Unused slot.
    Unused,
    /// A raw byte token (`<0x0A>`).
    Byte,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer for a GGUF model.
pub struct GgufTokenizer {
    /// Parses control and user-defined tokens in text (chat templates' output).
    special: tokenizers::Tokenizer,
    /// Treats all text as text: `<|im_start|>` in a document is just characters.
    plain: tokenizers::Tokenizer,
    bytes: Vec<Vec<u8>>,
    types: Vec<TokenType>,
    tokens: Vec<String>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// End-of-turn token (`<|eot_id|>`, `<end_of_turn>`, `<|im_end|>`), when the file names one or it can be told.
    pub eot: Option<u32>,
    /// Whether a BOS token goes before the prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// The pre-tokenizer kind (`tokenizer.ggml.pre`).
    pub pre: String,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.tokens.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .finish()
    }
}

/// GPT-2's byte ↔ printable-character table: bytes that are printable map to themselves, the others to U+0100….
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

impl GgufTokenizer {
    /// Build from a parsed GGUF header.
    pub fn from_gguf(g: &Gguf) -> Result<GgufTokenizer> {
        let model = g.str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model {model:?} is not supported yet (byte-level BPE, \"gpt2\", is)"
            )));
        }
        let tokens = match g.get("tokenizer.ggml.tokens") {
            Some(Value::StrArray(t)) if !t.is_empty() => t.clone(),
            _ => {
                return Err(bad(
                    "tokenizer.ggml.tokens is missing or not a string array",
                ))
            }
        };
        let n = tokens.len();
        let types: Vec<TokenType> = match g.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; n],
            Some(Value::IntArray(t)) if t.len() == n => t
                .iter()
                .map(|&t| match t {
                    2 => TokenType::Unknown,
                    3 => TokenType::Control,
                    4 => TokenType::UserDefined,
                    5 => TokenType::Unused,
                    6 => TokenType::Byte,
                    _ => TokenType::Normal,
                })
                .collect(),
            Some(_) => {
                return Err(bad(format!(
                    "tokenizer.ggml.token_type is not an integer array of {n} entries"
                )))
            }
        };
        let merges = match g.get("tokenizer.ggml.merges") {
            Some(Value::StrArray(m)) => m.as_slice(),
            None => &[],
            Some(_) => return Err(bad("tokenizer.ggml.merges is not a string array")),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match g.u64(key)? {
                None => Ok(None),
                Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                Some(i) => Err(bad(format!("{key} = {i} is outside the vocabulary of {n}"))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut eot = id("tokenizer.ggml.eot_token_id")?;
        if eot.is_none() {
            eot = ["<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>"]
                .iter()
                .find_map(|t| tokens.iter().position(|x| x == t))
                .filter(|&i| types[i] == TokenType::Control)
                .map(|i| i as u32);
        }
        let add_bos = g.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let pre = g.str("tokenizer.ggml.pre")?.unwrap_or("default").to_owned();

        let (pre_tok, ignore_merges) = match pre.as_str() {
            "smollm" => (
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
                false,
            ),
            "default" | "gpt-2" | "gpt2" => (
                serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
                false,
            ),
            "llama-bpe" | "llama3" | "llama-v3" => (split_then_bytes(LLAMA3_SPLIT), true),
            "qwen2" => (split_then_bytes(QWEN2_SPLIT), false),
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.pre {other:?} is not supported (smollm, gpt-2, llama-bpe and qwen2 are)"
                )))
            }
        };

        let mut vocab = serde_json::Map::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.clone(), i.into()).is_some() {
                return Err(bad(format!("token {t:?} appears twice in the vocabulary")));
            }
        }
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for m in merges {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                bad(format!(
                    "merge {m:?} is not two tokens separated by a space"
                ))
            })?;
            merge_pairs.push(serde_json::json!([a, b]));
        }
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types[*i], TokenType::Control | TokenType::UserDefined))
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": types[i] == TokenType::Control})
            })
            .collect();
        let build = |added: &[serde_json::Value]| -> Result<tokenizers::Tokenizer> {
            let json = serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tok, "post_processor": null, "decoder": null,
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": ignore_merges, "vocab": vocab, "merges": merge_pairs}
            });
            json.to_string()
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| {
                    bad(format!(
                        "cannot build the tokenizer from the GGUF vocabulary: {e}"
                    ))
                })
        };
        let special = build(&added)?;
        let plain = build(&[])?;

        let mut inverse = std::collections::HashMap::with_capacity(256);
        for (b, c) in byte_to_char().iter().enumerate() {
            inverse.insert(*c, b as u8);
        }
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                TokenType::Normal | TokenType::Unknown | TokenType::Byte => {
                    // Byte-level characters back to bytes; a character outside the table is kept as UTF-8.
                    let mut out = Vec::with_capacity(t.len());
                    for c in t.chars() {
                        match inverse.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend(c.to_string().as_bytes()),
                        }
                    }
                    out
                }
                _ => t.as_bytes().to_vec(),
            })
            .collect();
        Ok(GgufTokenizer {
            special,
            plain,
            bytes,
            types,
            tokens,
            bos,
            eos,
            eot,
            add_bos,
            pre,
        })
    }

    /// Vocabulary size.
    pub fn vocab_len(&self) -> usize {
        self.tokens.len()
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the text (`<|im_start|>`) become those
    /// tokens (what a rendered chat template needs); without it they are plain characters (what untrusted text
    /// needs). No BOS is added here.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let t = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        t.encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The bytes a token stands for (control tokens: their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map_or(&[][..], |b| b.as_slice())
    }

    /// The token's vocabulary string (`ĠParis`).
    pub fn token_str(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", |s| s.as_str())
    }

    /// The token's type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether generating this token ends the answer (EOS or end of turn).
    pub fn is_end(&self, id: u32) -> bool {
        Some(id) == self.eos || Some(id) == self.eot
    }

    /// Text of a sequence of tokens (invalid UTF-8 replaced with U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut b = Vec::new();
        for &i in ids {
            b.extend_from_slice(self.token_bytes(i));
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    /// The texts of the control and user-defined tokens (what special-token parsing matches in text).
    pub fn control_strings(&self) -> impl Iterator<Item = &str> {
        self.tokens
            .iter()
            .zip(&self.types)
            .filter(|(t, ty)| {
                matches!(ty, TokenType::Control | TokenType::UserDefined) && t.chars().count() > 1
            })
            .map(|(t, _)| t.as_str())
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }
}

fn split_then_bytes(pattern: &str) -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
}

/// Turns a stream of token bytes into text at UTF-8 boundaries (a token may end inside a character).
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add a token's bytes; returns the text that is complete now.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }
    /// The end of the stream: what is left, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
