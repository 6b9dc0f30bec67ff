//! An exact fast path for BERT WordPiece tokenizers (BertNormalizer + BertPreTokenizer + WordPiece), used
//! for counting and cutting during chunking.
//!
//! The `tokenizers` crate builds a fully aligned `NormalizedString` and an `Encoding` for every call, which
//! holds chunking to about 4.5 MB/s. For BERT-style tokenizers every step is local to a run of text between
//! ASCII whitespace (normalization is per character, pre-tokenization splits on whitespace and punctuation,
//! WordPiece works per word), so each run can be tokenized on its own. Runs of pure ASCII are tokenized here
//! directly; any run with a non-ASCII byte, or that could hold an added token, goes to the `tokenizers`
//! crate unchanged. The result is identical to `Tokenizer::encode` offsets, which a differential test checks.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash: a fast non-cryptographic hasher for short keys (vocabulary pieces are not attacker-chosen keys
/// into a growing table; the set is built once from the tokenizer file).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut v = [0u8; 8];
            v[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(v))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxSet = HashSet<Box<[u8]>, BuildHasherDefault<FxHasher>>;

pub(crate) struct FastWordPiece {
    lowercase: bool,
    max_input_chars_per_word: usize,
    /// Vocabulary pieces that may start a word, and (without their `##` prefix) those that continue one.
    starts: FxSet,
    conts: FxSet,
    longest: usize,
    /// First bytes of added tokens: a run holding one goes to the slow path.
    added_first: [bool; 256],
}

impl FastWordPiece {
    /// `Some` only when the tokenizer is exactly of the supported shape.
    pub(crate) fn from_tokenizer_json(json: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        let norm = v.get("normalizer")?;
        if norm.get("type")?.as_str()? != "BertNormalizer" || !norm.get("clean_text")?.as_bool()? {
            return None;
        }
        let lowercase = norm.get("lowercase")?.as_bool()?;
        if v.get("pre_tokenizer")?.get("type")?.as_str()? != "BertPreTokenizer" {
            return None;
        }
        let model = v.get("model")?;
        if model.get("type")?.as_str()? != "WordPiece" {
            return None;
        }
        let prefix = model.get("continuing_subword_prefix")?.as_str()?;
        let max_input_chars_per_word = model.get("max_input_chars_per_word")?.as_u64()? as usize;
        let unk = model.get("unk_token")?.as_str()?;
        let vocab = model.get("vocab")?.as_object()?;
        if !vocab.contains_key(unk) || prefix.is_empty() {
            return None;
        }
        let mut added_first = [false; 256];
        for t in v.get("added_tokens")?.as_array()? {
            let content = t.get("content")?.as_str()?;
            let flag = |k: &str| t.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
            if content.is_empty()
                || content.contains(char::is_whitespace)
                || flag("lstrip")
                || flag("rstrip")
            {
                return None;
            }
            added_first[content.as_bytes()[0] as usize] = true;
            if !flag("normalized") {
                continue;
            }
            // A normalized added token matches after lowercasing: guard both cases of its first letter.
            let b = content.as_bytes()[0];
            added_first[b.to_ascii_lowercase() as usize] = true;
            added_first[b.to_ascii_uppercase() as usize] = true;
        }
        let mut starts = FxSet::default();
        let mut conts = FxSet::default();
        let mut longest = 0;
        for piece in vocab.keys() {
            longest = longest.max(piece.len());
            match piece.strip_prefix(prefix) {
                Some(rest) => {
                    conts.insert(rest.as_bytes().into());
                    // A piece that literally starts with the prefix can also start a word ("##" itself).
                    starts.insert(piece.as_bytes().into());
                }
                None => {
                    starts.insert(piece.as_bytes().into());
                }
            }
        }
        // Only the "##" prefix is handled by `conts`; other prefixes would change lookups.
        (prefix == "##").then_some(FastWordPiece {
            lowercase,
            max_input_chars_per_word,
            starts,
            conts,
            longest,
            added_first,
        })
    }

    /// Whether `run` (no ASCII whitespace inside) can take the fast path.
    pub(crate) fn accepts(&self, run: &[u8]) -> bool {
        run.iter()
            .all(|&b| b < 0x80 && !self.added_first[b as usize])
    }

    /// Token offsets of an ASCII `run` starting at byte `base`, appended to `out`.
    pub(crate) fn run_offsets(
        &self,
        run: &[u8],
        base: usize,
        out: &mut Vec<(usize, usize)>,
        word: &mut Vec<u8>,
        align: &mut Vec<u32>,
    ) {
        word.clear();
        align.clear();
        for (i, &b) in run.iter().enumerate() {
            // clean_text removes control characters (all of C0 but \t \n \r, which never reach here, and DEL).
            if b < 0x20 || b == 0x7f {
                continue;
            }
            if b.is_ascii_punctuation() {
                self.word_offsets(base, out, word, align);
                word.push(b);
                align.push(i as u32);
                self.word_offsets(base, out, word, align);
            } else {
                word.push(if self.lowercase {
                    b.to_ascii_lowercase()
                } else {
                    b
                });
                align.push(i as u32);
            }
        }
        self.word_offsets(base, out, word, align);
    }

    /// WordPiece over the pending word (greedy longest match, `[UNK]` for the whole word when a piece is
    /// missing or the word is too long), then clears it.
    fn word_offsets(
        &self,
        base: usize,
        out: &mut Vec<(usize, usize)>,
        word: &mut Vec<u8>,
        align: &mut Vec<u32>,
    ) {
        let n = word.len();
        if n == 0 {
            return;
        }
        let whole = (base + align[0] as usize, base + align[n - 1] as usize + 1);
        if n > self.max_input_chars_per_word {
            out.push(whole);
        } else {
            let mark = out.len();
            let mut start = 0;
            while start < n {
                let set = if start == 0 {
                    &self.starts
                } else {
                    &self.conts
                };
                let mut end = n.min(start + self.longest);
                while end > start && !set.contains(&word[start..end]) {
                    end -= 1;
                }
                if end == start {
                    out.truncate(mark);
                    out.push(whole);
                    break;
                }
                out.push((
                    base + align[start] as usize,
                    base + align[end - 1] as usize + 1,
                ));
                start = end;
            }
        }
        word.clear();
        align.clear();
    }
}
