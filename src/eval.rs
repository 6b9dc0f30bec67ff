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
        for (i, line) in text(corpus, "corpus.jsonl")?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad("corpus.jsonl", i + 1, e))?;
            let id = v
                .get("_id")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("corpus.jsonl", i + 1, "no _id"))?;
            let title = v.get("title").and_then(|x| x.as_str()).unwrap_or("");
            let body = v.get("text").and_then(|x| x.as_str()).unwrap_or("");
            out.corpus
                .push((id.to_string(), format!("{title} {body}").trim().to_string()));
        }
        for (i, line) in text(queries, "queries.jsonl")?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad("queries.jsonl", i + 1, e))?;
            let id = v
                .get("_id")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("queries.jsonl", i + 1, "no _id"))?;
            if out.qrels.contains_key(id) {
                let q = v.get("text").and_then(|x| x.as_str()).unwrap_or("");
                out.queries.push((id.to_string(), q.to_string()));
            }
        }
        Ok(out)
    }
}

/// Mean retrieval metrics over queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RetrievalMetrics {
    /// nDCG@10.
    pub ndcg_at_10: f64,
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
