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
}
