//! Retrieval evaluation on BEIR-format benchmarks: nDCG@k, recall@k, MRR@k, MAP@k, computed like
//! `pytrec_eval` (linear gains from the qrels, log2 discounts) and, as BEIR does, ignoring a retrieved
//! document whose id equals the query's id.

use std::collections::HashMap;

use crate::{Error, Result};

/// A BEIR dataset: corpus, queries and relevance judgments.
#[derive(Debug, Clone, Default)]
pub struct Beir {
    /// `(id, title + " " + text)` per document, in file order.
    pub corpus: Vec<(String, String)>,
    /// `(id, text)` per query that has judgments, in file order.
    pub queries: Vec<(String, String)>,
    /// query id → document id → relevance grade.
    pub qrels: HashMap<String, HashMap<String, i32>>,
}

fn bad(file: &'static str, line: usize, what: impl std::fmt::Display) -> Error {
    Error::Model {
        file,
        detail: format!("line {line}: {what}"),
    }
}

impl Beir {
    /// Parse `corpus.jsonl`, `queries.jsonl` and `qrels/test.tsv` (header line, `query-id corpus-id score`).
    /// Queries without judgments are dropped, as BEIR does.
    pub fn from_bytes(corpus: &[u8], queries: &[u8], qrels: &[u8]) -> Result<Self> {
        fn text<'a>(b: &'a [u8], file: &'static str) -> Result<&'a str> {
            std::str::from_utf8(b).map_err(|e| bad(file, 0, e))
        }
        let mut out = Beir::default();
        for (i, line) in text(qrels, "qrels/test.tsv")?.lines().enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            if i == 0 && f.first().is_some_and(|h| h.starts_with("query")) || line.trim().is_empty()
            {
                continue;
            }
            if f.len() < 3 {
                return Err(bad(
                    "qrels/test.tsv",
                    i + 1,
                    "expected query-id, corpus-id, score",
                ));
            }
            let score: i32 = f[2]
                .trim()
                .parse()
                .map_err(|e| bad("qrels/test.tsv", i + 1, e))?;
            out.qrels
                .entry(f[0].to_string())
                .or_default()
                .insert(f[1].to_string(), score);
        }
        let field = |v: &serde_json::Value, k: &str| {
            v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string()
        };
        for (id, v) in jsonl_records(text(corpus, "corpus.jsonl")?, "corpus.jsonl")? {
            let joined = format!("{} {}", field(&v, "title"), field(&v, "text"));
            out.corpus.push((id, joined.trim().to_string()));
        }
        for (id, v) in jsonl_records(text(queries, "queries.jsonl")?, "queries.jsonl")? {
            if out.qrels.contains_key(&id) {
                out.queries.push((id, field(&v, "text")));
            }
        }
        Ok(out)
    }
}

/// The non-empty lines of a BEIR `.jsonl` file as `(_id, record)`.
fn jsonl_records(text: &str, file: &'static str) -> Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(file, i + 1, e))?;
        let id = v
            .get("_id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad(file, i + 1, "no _id"))?;
        out.push((id.to_string(), v));
    }
    Ok(out)
}

/// Mean retrieval metrics over queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RetrievalMetrics {
    /// nDCG@10.
    pub ndcg_at_10: f64,
    /// Recall@1.
    pub recall_at_1: f64,
    /// Recall@10.
    pub recall_at_10: f64,
    /// Recall@100.
    pub recall_at_100: f64,
    /// MRR@10.
    pub mrr_at_10: f64,
    /// MAP@100.
    pub map_at_100: f64,
    /// Queries evaluated.
    pub queries: usize,
}

/// Evaluate ranked results (`query id → document ids, best first`) against `qrels`.
pub fn evaluate(
    results: &HashMap<String, Vec<String>>,
    qrels: &HashMap<String, HashMap<String, i32>>,
) -> RetrievalMetrics {
    let mut m = RetrievalMetrics::default();
    for (qid, rels) in qrels {
        let ranked: Vec<&String> = results
            .get(qid)
            .map(|r| r.iter().filter(|d| *d != qid).collect())
            .unwrap_or_default();
        let gain = |d: &String| rels.get(d).copied().unwrap_or(0).max(0) as f64;
        let relevant = rels.values().filter(|&&g| g > 0).count() as f64;
        if relevant == 0.0 {
            continue;
        }
        // nDCG@10
        let dcg: f64 = ranked
            .iter()
            .take(10)
            .enumerate()
            .map(|(i, d)| gain(d) / (i as f64 + 2.0).log2())
            .sum();
        let mut ideal: Vec<f64> = rels.values().map(|&g| g.max(0) as f64).collect();
        ideal.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let idcg: f64 = ideal
            .iter()
            .take(10)
            .enumerate()
            .map(|(i, g)| g / (i as f64 + 2.0).log2())
            .sum();
        m.ndcg_at_10 += if idcg > 0.0 { dcg / idcg } else { 0.0 };
        let hits = |k: usize| ranked.iter().take(k).filter(|d| gain(d) > 0.0).count() as f64;
        m.recall_at_1 += hits(1) / relevant;
        m.recall_at_10 += hits(10) / relevant;
        m.recall_at_100 += hits(100) / relevant;
        m.mrr_at_10 += ranked
            .iter()
            .take(10)
            .position(|d| gain(d) > 0.0)
            .map_or(0.0, |p| 1.0 / (p as f64 + 1.0));
        let mut found = 0.0;
        let mut ap = 0.0;
        for (i, d) in ranked.iter().take(100).enumerate() {
            if gain(d) > 0.0 {
                found += 1.0;
                ap += found / (i as f64 + 1.0);
            }
        }
        m.map_at_100 += ap / relevant;
        m.queries += 1;
    }
    let n = m.queries.max(1) as f64;
    m.ndcg_at_10 /= n;
    m.recall_at_1 /= n;
    m.recall_at_10 /= n;
    m.recall_at_100 /= n;
    m.mrr_at_10 /= n;
    m.map_at_100 /= n;
    m
}

/// Exact top-`k` by dot product (cosine on unit vectors): the brute-force reference for every index.
pub fn exact_top_k(base: &[Vec<f32>], query: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = base
        .iter()
        .enumerate()
        .map(|(i, v)| (i, v.iter().zip(query).map(|(a, b)| a * b).sum()))
        .collect();
    let k = k.min(scored.len());
    if k == 0 {
        return Vec::new();
    }
    scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored
}

/// SQuAD's answer normalization: lower case, punctuation removed, the articles a / an / the removed,
/// whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn best(golds: &[String], f: impl Fn(&str) -> f64) -> f64 {
    golds.iter().map(|g| f(g)).fold(0.0, f64::max)
}

/// 1 when the normalized prediction equals a normalized gold answer.
pub fn exact_match(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    best(golds, |g| f64::from(u8::from(normalize_answer(g) == p)))
}

/// 1 when a normalized gold answer occurs in the normalized prediction (on word boundaries): the fair
/// "did it say it" measure for sentence-long generated answers.
pub fn contains_answer(pred: &str, golds: &[String]) -> f64 {
    let p = format!(" {} ", normalize_answer(pred));
    best(golds, |g| {
        let g = normalize_answer(g);
        f64::from(u8::from(!g.is_empty() && p.contains(&format!(" {g} "))))
    })
}

/// SQuAD token F1 (bag of normalized words), best over the gold answers.
pub fn token_f1(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    let pt: Vec<&str> = p.split_whitespace().collect();
    best(golds, |g| {
        let g = normalize_answer(g);
        let gt: Vec<&str> = g.split_whitespace().collect();
        if pt.is_empty() || gt.is_empty() {
            return f64::from(u8::from(pt.is_empty() && gt.is_empty()));
        }
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for w in &gt {
            *counts.entry(w).or_default() += 1;
        }
        let mut common = 0;
        for w in &pt {
            if let Some(c) = counts.get_mut(w).filter(|c| **c > 0) {
                *c -= 1;
                common += 1;
            }
        }
        if common == 0 {
            return 0.0;
        }
        let (pr, rc) = (
            common as f64 / pt.len() as f64,
            common as f64 / gt.len() as f64,
        );
        2.0 * pr * rc / (pr + rc)
    })
}

/// ROUGE-L F1 (longest common subsequence of normalized words), best over the gold answers.
pub fn rouge_l(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    let pt: Vec<&str> = p.split_whitespace().collect();
    best(golds, |g| {
        let g = normalize_answer(g);
        let gt: Vec<&str> = g.split_whitespace().collect();
        if pt.is_empty() || gt.is_empty() {
            return 0.0;
        }
        let mut row = vec![0usize; gt.len() + 1];
        for a in &pt {
            let mut prev = 0;
            for (j, b) in gt.iter().enumerate() {
                let keep = row[j + 1];
                row[j + 1] = if a == b {
                    prev + 1
                } else {
                    row[j + 1].max(row[j])
                };
                prev = keep;
            }
        }
        let lcs = row[gt.len()] as f64;
        if lcs == 0.0 {
            return 0.0;
        }
        let (pr, rc) = (lcs / pt.len() as f64, lcs / gt.len() as f64);
        2.0 * pr * rc / (pr + rc)
    })
}

/// One question of a QA set (one line of its JSONL file).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QaItem {
    /// Unique id.
    pub id: String,
    /// The question.
    pub question: String,
    /// Acceptable answers (short: the fact that must be said).
    pub answers: Vec<String>,
    /// Documents that hold the answer (document ids, i.e. file names).
    #[serde(default)]
    pub sources: Vec<String>,
    /// A passage of the gold document that states the answer; a source counts as gold when its text contains
    /// it (whitespace-insensitive), else when its document is one of `sources`.
    #[serde(default)]
    pub evidence: Option<String>,
}

impl QaItem {
    /// Whether a chunk (`doc_id`, `text`) is a gold source for this question.
    pub fn is_gold(&self, doc_id: &str, text: &str) -> bool {
        let in_doc = self
            .sources
            .iter()
            .any(|s| doc_id == s || doc_id.ends_with(&format!("/{s}")));
        match &self.evidence {
            Some(e) => {
                let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
                in_doc && squash(text).contains(&squash(e))
            }
            None => in_doc,
        }
    }
}

/// Parse a QA set: JSONL, one [`QaItem`] per non-empty line; ids must be unique.
pub fn parse_qa(bytes: &[u8]) -> Result<Vec<QaItem>> {
    let text = std::str::from_utf8(bytes).map_err(|e| bad("qa set", 0, e))?;
    let mut out: Vec<QaItem> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: QaItem = serde_json::from_str(line).map_err(|e| bad("qa set", i + 1, e))?;
        if item.answers.is_empty() || item.question.trim().is_empty() {
            return Err(bad(
                "qa set",
                i + 1,
                "a question and at least one answer are needed",
            ));
        }
        if out.iter().any(|o| o.id == item.id) {
            return Err(bad("qa set", i + 1, format!("duplicate id {:?}", item.id)));
        }
        out.push(item);
    }
    Ok(out)
}

/// One answered question, scored.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QaScore {
    /// Exact match.
    pub em: f64,
    /// Token F1.
    pub f1: f64,
    /// ROUGE-L F1.
    pub rouge_l: f64,
    /// Gold answer contained in the answer.
    pub contains: f64,
    /// A gold source was among the sources given (None: no sources in this mode).
    pub source_hit: Option<bool>,
    /// The answer cites at least one source that was given.
    pub cites: bool,
    /// The answer cites a gold source.
    pub cites_gold: bool,
    /// Citations of numbers that were not given.
    pub invalid_citations: usize,
    /// Question to last token, milliseconds.
    pub latency_ms: f64,
    /// Answer tokens.
    pub answer_tokens: usize,
    /// Decoding time, milliseconds.
    pub decode_ms: f64,
}

impl QaScore {
    /// Text metrics of `answer` against the item's gold answers (the source and timing fields are the
    /// caller's).
    pub fn text(item: &QaItem, answer: &str) -> QaScore {
        QaScore {
            em: exact_match(answer, &item.answers),
            f1: token_f1(answer, &item.answers),
            rouge_l: rouge_l(answer, &item.answers),
            contains: contains_answer(answer, &item.answers),
            ..Default::default()
        }
    }
}

/// Means over a QA set.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QaSummary {
    /// Questions.
    pub questions: usize,
    /// Mean exact match.
    pub em: f64,
    /// Mean token F1.
    pub f1: f64,
    /// Mean ROUGE-L.
    pub rouge_l: f64,
    /// Share of answers containing a gold answer.
    pub contains: f64,
    /// Share of questions with a gold source among the sources given (None: no retrieval).
    pub source_recall: Option<f64>,
    /// Share of answers citing at least one given source.
    pub citation_rate: f64,
    /// Share of answers citing a gold source.
    pub cites_gold: f64,
    /// Invalid citations in all.
    pub invalid_citations: usize,
    /// Mean latency, milliseconds.
    pub latency_ms: f64,
    /// Generated tokens per second of decoding, over all answers.
    pub decode_tok_s: f64,
}

impl QaSummary {
    /// Summarize scored answers.
    pub fn of(scores: &[QaScore]) -> QaSummary {
        let n = scores.len().max(1) as f64;
        let mean = |f: &dyn Fn(&QaScore) -> f64| scores.iter().map(f).sum::<f64>() / n;
        let hits: Vec<bool> = scores.iter().filter_map(|s| s.source_hit).collect();
        let tokens: usize = scores
            .iter()
            .map(|s| s.answer_tokens.saturating_sub(1))
            .sum();
        let decode: f64 = scores.iter().map(|s| s.decode_ms).sum();
        QaSummary {
            questions: scores.len(),
            em: mean(&|s| s.em),
            f1: mean(&|s| s.f1),
            rouge_l: mean(&|s| s.rouge_l),
            contains: mean(&|s| s.contains),
            source_recall: (!hits.is_empty())
                .then(|| hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64),
            citation_rate: mean(&|s| f64::from(u8::from(s.cites))),
            cites_gold: mean(&|s| f64::from(u8::from(s.cites_gold))),
            invalid_citations: scores.iter().map(|s| s.invalid_citations).sum(),
            latency_ms: mean(&|s| s.latency_ms),
            decode_tok_s: if decode > 0.0 {
                tokens as f64 / (decode / 1e3)
            } else {
                0.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, i32)]) -> HashMap<String, i32> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn metrics_by_hand() {
        // q1: relevant a (1) and b (1); ranked [x, a, y, b]. DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3).
        // q2: relevant c; ranked [q2 (its own id, ignored), c] → c is first → nDCG 1, MRR 1.
        let qrels: HashMap<String, HashMap<String, i32>> = [
            ("q1".to_string(), map(&[("a", 1), ("b", 1)])),
            ("q2".to_string(), map(&[("c", 2)])),
        ]
        .into();
        let results: HashMap<String, Vec<String>> = [
            (
                "q1".to_string(),
                ["x", "a", "y", "b"].map(String::from).to_vec(),
            ),
            ("q2".to_string(), ["q2", "c"].map(String::from).to_vec()),
        ]
        .into();
        let m = evaluate(&results, &qrels);
        let ndcg_q1 = (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!(
            (m.ndcg_at_10 - (ndcg_q1 + 1.0) / 2.0).abs() < 1e-12,
            "{m:?}"
        );
        assert!((m.mrr_at_10 - (0.5 + 1.0) / 2.0).abs() < 1e-12);
        assert!((m.recall_at_10 - 1.0).abs() < 1e-12);
        // recall@1: q1 ranks x first (0 of 2), q2 ranks c first (1 of 1).
        assert!((m.recall_at_1 - 0.5).abs() < 1e-12);
        // AP(q1) = (1/2 + 2/4) / 2 = 0.5; AP(q2) = 1.
        assert!((m.map_at_100 - 0.75).abs() < 1e-12);
        assert_eq!(m.queries, 2);
    }

    #[test]
    fn exact_top_k_is_a_full_sort() {
        let base: Vec<Vec<f32>> = (0..50).map(|i| vec![((i * 37) % 50) as f32, 1.0]).collect();
        let q = [1.0, 0.0];
        let top = exact_top_k(&base, &q, 5);
        let mut all: Vec<(usize, f32)> = base.iter().enumerate().map(|(i, v)| (i, v[0])).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(top, all[..5].to_vec());
        assert!(exact_top_k(&base, &q, 0).is_empty());
        assert_eq!(exact_top_k(&base, &q, 500).len(), 50);
    }

    #[test]
    fn beir_parsing_and_errors() {
        let corpus = br#"{"_id": "d1", "title": "T", "text": "body"}
{"_id": "d2", "text": "only body"}"#;
        let queries = br#"{"_id": "q1", "text": "question"}
{"_id": "q9", "text": "no judgments"}"#;
        let b =
            Beir::from_bytes(corpus, queries, b"query-id\tcorpus-id\tscore\nq1\td1\t1\n").unwrap();
        assert_eq!(
            b.corpus,
            [
                ("d1".into(), "T body".into()),
                ("d2".into(), "only body".into())
            ]
        );
        assert_eq!(b.queries, [("q1".to_string(), "question".to_string())]);
        assert!(matches!(
            Beir::from_bytes(b"{not json", b"", b""),
            Err(Error::Model {
                file: "corpus.jsonl",
                ..
            })
        ));
        assert!(matches!(
            Beir::from_bytes(b"", b"", b"h\nq1\td1\tx\n"),
            Err(Error::Model {
                file: "qrels/test.tsv",
                ..
            })
        ));
    }
    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn answer_metrics_by_hand() {
        // Normalization: case, punctuation, articles, whitespace.
        assert_eq!(
            normalize_answer("  The Laser-Cutter, an induction!  "),
            "laser cutter induction"
        );
        assert_eq!(
            exact_match("The laser cutter.", &golds(&["laser cutter"])),
            1.0
        );
        assert_eq!(
            exact_match("a laser cutter here", &golds(&["laser cutter"])),
            0.0
        );
        // F1: pred {one, guest, per, visit} vs gold {one, guest}: P = 2/4, R = 2/2, F1 = 2/3.
        let f = token_f1("One guest per visit", &golds(&["one guest", "zzz"]));
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
        // Repeated words count once per occurrence: pred [a1 b a1] vs gold [a1 a1 c]: common 2, P 2/3, R 2/3.
        assert!((token_f1("x y x", &golds(&["x x z"])) - 2.0 / 3.0).abs() < 1e-12);
        // ROUGE-L: pred [w x y z] vs gold [w y q z]: LCS = w y z (3); P 3/4, R 3/4 → 0.75.
        assert!((rouge_l("w x y z", &golds(&["w y q z"])) - 0.75).abs() < 1e-12);
        // Order matters for ROUGE-L, not for F1: [z y x] vs [x y z]: LCS 1 → 1/3; F1 1.
        assert!((rouge_l("z y x", &golds(&["x y z"])) - 1.0 / 3.0).abs() < 1e-12);
        assert!((token_f1("z y x", &golds(&["x y z"])) - 1.0).abs() < 1e-12);
        // Contains: on word boundaries only.
        assert_eq!(
            contains_answer("It costs 10 euros.", &golds(&["10 euros"])),
            1.0
        );
        assert_eq!(
            contains_answer("It costs 110 euros.", &golds(&["10 euros"])),
            0.0
        );
        assert_eq!(contains_answer("anything", &golds(&["the"])), 0.0);
        assert_eq!(token_f1("", &golds(&["x"])), 0.0);
    }

    #[test]
    fn qa_sets_parse_and_refuse() {
        let ok = br#"{"id": "a", "question": "Q?", "answers": ["x"], "sources": ["faq.txt"], "evidence": "one  guest"}

{"id": "b", "question": "R?", "answers": ["y"]}"#;
        let items = parse_qa(ok).unwrap();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_gold("examples/docs/faq.txt", "may bring one\nguest per visit"));
        assert!(!items[0].is_gold("examples/docs/faq.txt", "parking"));
        assert!(!items[0].is_gold("other.txt", "one guest"));
        for bad in [
            &br#"{"id": "a", "question": "Q?", "answers": []}"#[..],
            br#"{"id": "a", "question": " ", "answers": ["x"]}"#,
            b"{\"id\": \"a\", \"question\": \"Q\", \"answers\": [\"x\"]}\n{\"id\": \"a\", \"question\": \"Q\", \"answers\": [\"x\"]}",
            b"not json",
        ] {
            assert!(matches!(parse_qa(bad), Err(Error::Model { file: "qa set", .. })));
        }
    }
}
