//! Choosing the next token from the logits: greedy, or temperature with top-k / top-p / min-p, after repetition,
//! presence and frequency penalties, from an explicitly seeded generator (same seed, same tokens).

use crate::{Error, Result};

/// How the next token is chosen. `Default` is llama.cpp's usual chat setting with a fixed seed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SamplerConfig {
    /// Always take the most likely token (after penalties); the other sampling fields are then ignored.
    pub greedy: bool,
    /// Softmax temperature; finite and > 0.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to at least p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens seen in the last `repeat_last_n` by this (1 = off).
    pub repeat_penalty: f32,
    /// Subtract this from the logits of tokens seen in the window (0 = off).
    pub presence_penalty: f32,
    /// Subtract this × the count of each token seen in the window (0 = off).
    pub frequency_penalty: f32,
    /// How many of the last tokens (prompt included) the penalties look at.
    pub repeat_last_n: usize,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            greedy: false,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding, no penalties.
    pub fn greedy() -> Self {
        SamplerConfig {
            greedy: true,
            ..Default::default()
        }
    }

    /// Greedy with every penalty off: the next token is the argmax of the logits alone (what a device can
    /// choose without the history).
    pub fn plain_greedy(&self) -> bool {
        self.greedy
            && self.repeat_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }

    /// `Err(Config)` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let f = |ok: bool, what: &str, v: f32| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "sampler: {what} = {v} is out of range"
                )))
            }
        };
        f(
            self.temperature.is_finite() && self.temperature > 0.0,
            "temperature (must be finite and > 0; use greedy for argmax)",
            self.temperature,
        )?;
        f(
            (0.0..=1.0).contains(&self.top_p) && self.top_p > 0.0,
            "top_p (0 < p ≤ 1)",
            self.top_p,
        )?;
        f(
            (0.0..=1.0).contains(&self.min_p),
            "min_p (0 ≤ p ≤ 1)",
            self.min_p,
        )?;
        f(
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0,
            "repeat_penalty (> 0)",
            self.repeat_penalty,
        )?;
        f(
            self.presence_penalty.is_finite(),
            "presence_penalty",
            self.presence_penalty,
        )?;
        f(
            self.frequency_penalty.is_finite(),
            "frequency_penalty",
            self.frequency_penalty,
        )?;
        Ok(())
    }
}

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A sampler: its configuration and random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    idx: Vec<u32>,
}

impl Sampler {
    /// A sampler; `Err(Config)` when a field is out of range.
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Sampler {
            cfg,
            rng: Rng::new(cfg.seed),
            idx: Vec::new(),
        })
    }

    /// Apply the penalties for the tokens in `history` (only its last `repeat_last_n`) to `logits`, in place.
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        if c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
            return;
        }
        let window = &history[history.len().saturating_sub(c.repeat_last_n)..];
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if *l > 0.0 {
                *l /= c.repeat_penalty;
            } else {
                *l *= c.repeat_penalty;
            }
            *l -= c.presence_penalty + c.frequency_penalty * n as f32;
        }
    }

    /// The next token from `logits` (penalties for `history` applied first). Ties go to the lower id.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        if self.cfg.greedy {
            return argmax(logits);
        }
        let c = self.cfg;
        let n = logits.len();
        // Candidates in descending logit order (ties: lower id first); top-k bounds the sort.
        self.idx.clear();
        self.idx.extend(0..n as u32);
        let key = |i: &u32| (std::cmp::Reverse(OrdF32(logits[*i as usize])), *i);
        let k = if c.top_k == 0 { n } else { c.top_k.min(n) };
        if k < n {
            self.idx.select_nth_unstable_by_key(k - 1, key);
            self.idx.truncate(k);
        }
        self.idx.sort_unstable_by_key(key);
        let vals: Vec<f32> = self.idx.iter().map(|&i| logits[i as usize]).collect();
        self.idx[draw(&c, &mut self.rng, &vals)]
    }

    /// Whether [`Sampler::sample_top`] can stand in for [`Sampler::sample`] given the `k` largest logits: not
    /// greedy, no penalty (they change logits outside the candidates), and a top-k of 1..=k.
    pub fn top_k_suffices(&self, k: usize) -> bool {
        let c = &self.cfg;
        !c.greedy
            && (1..=k).contains(&c.top_k)
            && c.repeat_penalty == 1.0
            && c.presence_penalty == 0.0
            && c.frequency_penalty == 0.0
    }

    /// The next token from the candidates only: `top` holds the largest min(top_k, vocabulary) logits as (id,
    /// logit), in [`Sampler::sample`]'s order (descending by `f32::total_cmp`, ties to the lower id). The same
    /// token, and the same random state after, as `sample` on all the logits, where
    /// [`Sampler::top_k_suffices`] says so (and `top` is not empty).
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> u32 {
        let vals: Vec<f32> = top.iter().map(|t| t.1).collect();
        top[draw(&self.cfg, &mut self.rng, &vals)].0
    }
}

/// Sampling's draw among the candidates `vals` (sorted, the largest first): softmax at the temperature, top-p,
/// min-p, one random number; the chosen candidate's index.
fn draw(c: &SamplerConfig, rng: &mut Rng, vals: &[f32]) -> usize {
    let max = vals[0];
    let mut p: Vec<f64> = vals
        .iter()
        .map(|&l| (((l - max) / c.temperature) as f64).exp())
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    // top-p: the smallest prefix reaching p.
    let mut keep = p.len();
    if c.top_p < 1.0 {
        let mut acc = 0.0;
        for (j, &x) in p.iter().enumerate() {
            acc += x;
            if acc >= c.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
    }
    // min-p: relative to the most likely token.
    if c.min_p > 0.0 {
        let floor = p[0] * c.min_p as f64;
        keep = keep.min(p.iter().take_while(|&&x| x >= floor).count().max(1));
    }
    let total: f64 = p[..keep].iter().sum();
    let mut r = rng.next_f64() * total;
    for (j, &pj) in p[..keep].iter().enumerate() {
        r -= pj;
        if r < 0.0 {
            return j;
        }
    }
    keep - 1
}

/// Total order on f32 (`total_cmp`) for sorting logits.
#[derive(Clone, Copy)]
struct OrdF32(f32);
impl PartialEq for OrdF32 {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for OrdF32 {}
impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OrdF32 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest values with their indices, descending (ties: lower index first).
pub fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let key = |i: &u32| (std::cmp::Reverse(OrdF32(v[*i as usize])), *i);
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by_key(k - 1, key);
        idx.truncate(k);
    }
    idx.sort_unstable_by_key(key);
    idx.into_iter().map(|i| (i, v[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    // In wasm the same tests run under wasm-bindgen-test (Node and headless Chromium): the simd128 kernels.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_distribution_is_respected() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), -50.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let run = |cfg| {
            let mut s = Sampler::new(cfg).unwrap();
            (0..6000)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(cfg);
        assert_eq!(a, run(cfg));
        // Probabilities 1/6, 2/6, 3/6, ~0: counts within 5 standard deviations.
        for (t, p) in [(0u32, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let n = a.iter().filter(|&&x| x == t).count() as f64;
            let sd = (6000.0f64 * p * (1.0 - p)).sqrt();
            assert!((n - 6000.0 * p).abs() < 5.0 * sd, "token {t}: {n}");
        }
        assert!(!a.contains(&3));
        let other = run(SamplerConfig { seed: 8, ..cfg });
        assert_ne!(a, other);
    }

    #[test]
    fn top_k_top_p_min_p_cut_the_tail() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let only = |cfg: SamplerConfig| {
            let mut s = Sampler::new(cfg).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..2000 {
                seen.insert(s.sample(&mut logits.clone(), &[]));
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        let base = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        assert_eq!(only(SamplerConfig { top_k: 2, ..base }), vec![0, 1]);
        // p = e^-i / Σ: 0.636, 0.234, 0.086, …: top_p 0.8 keeps two, 0.9 three.
        assert_eq!(only(SamplerConfig { top_p: 0.8, ..base }), vec![0, 1]);
        assert_eq!(only(SamplerConfig { top_p: 0.9, ..base }), vec![0, 1, 2]);
        // min_p 0.3: e^-1 = 0.37 stays, e^-2 = 0.135 goes.
        assert_eq!(only(SamplerConfig { min_p: 0.3, ..base }), vec![0, 1]);
    }

    /// `sample_top` on the top-k candidates (what a device hands back) against `sample` on all the logits:
    /// the same token at every step of a long run, so the same random state too; ties by the hundred (logits
    /// on a grid of 0.25), a NaN and ±∞ among them, k from 1 to beyond the vocabulary.
    #[test]
    fn candidates_alone_draw_as_all_the_logits() {
        let mut state = 0x1234_5678u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for (k, temperature, top_p, min_p) in [
            (40, 0.8, 0.95, 0.05),
            (1, 1.0, 1.0, 0.0),
            (64, 2.5, 1.0, 0.0),
            (7, 0.3, 0.5, 0.2),
            (600, 1.0, 0.9, 0.0),
        ] {
            let cfg = SamplerConfig {
                top_k: k,
                temperature,
                top_p,
                min_p,
                seed: k as u64,
                ..Default::default()
            };
            let (mut all, mut top) = (Sampler::new(cfg).unwrap(), Sampler::new(cfg).unwrap());
            assert!(all.top_k_suffices(k) && !all.top_k_suffices(k - 1));
            let mut tokens = std::collections::HashSet::new();
            for step in 0..300 {
                let mut logits: Vec<f32> = (0..500).map(|_| (next() % 40) as f32 * 0.25).collect();
                if step % 50 == 7 {
                    logits[10] = f32::NAN;
                }
                if step % 50 == 8 {
                    logits[3] = f32::INFINITY;
                    logits[499] = f32::NEG_INFINITY;
                }
                let cands = top_k(&logits, k);
                let want = all.sample(&mut logits, &[]);
                assert_eq!(top.sample_top(&cands), want, "k {k}, step {step}");
                tokens.insert(want);
            }
            assert!(
                tokens.len() > if k == 1 { 0 } else { 5 },
                "k {k}: {tokens:?}"
            );
        }
        // What they cannot stand in for: greedy, penalties, no top-k.
        let no = |cfg: SamplerConfig| !Sampler::new(cfg).unwrap().top_k_suffices(64);
        assert!(no(SamplerConfig::greedy()));
        assert!(no(SamplerConfig {
            repeat_penalty: 1.1,
            ..Default::default()
        }));
        assert!(no(SamplerConfig {
            presence_penalty: 0.5,
            ..Default::default()
        }));
        assert!(no(SamplerConfig {
            frequency_penalty: -0.5,
            ..Default::default()
        }));
        assert!(no(SamplerConfig {
            top_k: 0,
            ..Default::default()
        }));
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let s = Sampler::new(SamplerConfig {
            greedy: true,
            repeat_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        })
        .unwrap();
        let mut l = [4.0f32, -4.0, 4.0];
        s.penalize(&mut l, &[0, 1, 1]);
        assert_eq!(l, [4.0 / 2.0 - 0.5 - 0.25, -4.0 * 2.0 - 0.5 - 0.5, 4.0]);
    }

    #[test]
    fn bad_settings_are_refused() {
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let e = Sampler::new(SamplerConfig {
                temperature: t,
                ..Default::default()
            });
            assert!(matches!(e, Err(Error::Config(_))), "{t}");
        }
        assert!(Sampler::new(SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}
