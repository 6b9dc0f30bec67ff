//! Sealed HNSW segments. instant-distance builds the graph (in batch, with its neighbour-selection heuristic);
//! the graph is then copied out into flat neighbour arrays that this module searches, validates and stores in
//! a knowledge pack. Owning the search lets a query choose its own `ef`, skip tombstones and apply metadata
//! filters during traversal, and lets a loaded pack be checked (every neighbour id in range) before use.
//!
//! Layout, as instant-distance builds it: node ids (`pid`s) are ordered by layer, highest first, so layer
//! `l ≥ 1` holds the nodes `0..len_l`; node 0 is the entry point. Layer 0 has up to [`M0`] neighbours per node,
//! upper layers up to [`M`]; unused entries are [`NONE`].

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::simd::dot;
use crate::{Error, Result};

/// Neighbours per node on the upper layers (instant-distance's `M`).
pub const M: usize = 32;
/// Neighbours per node on layer 0 (`2 M`).
pub const M0: usize = 2 * M;
/// An unused neighbour entry.
pub const NONE: u32 = u32::MAX;

/// One sealed HNSW graph over a fixed set of slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// `pid → slot` (the row of the vector in the knowledge base).
    pub slots: Vec<u32>,
    /// Layer 0: `slots.len() × M0` neighbour pids.
    pub zero: Vec<u32>,
    /// Layers 1..: `upper[l - 1]` holds `len_l × M` neighbour pids, `len_l` decreasing.
    pub upper: Vec<Vec<u32>>,
}

/// A point handed to instant-distance: its slot and its vector. Serializes as the slot alone, which is how
/// the built graph is read back (see [`Segment::build`]).
#[derive(Clone)]
struct Pt<'a> {
    slot: u32,
    v: &'a [f32],
}

impl instant_distance::Point for Pt<'_> {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot(self.v, other.v)
    }
}

impl serde::Serialize for Pt<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u32(self.slot)
    }
}

/// instant-distance's `Hnsw` as its serde derive writes it (node arrays as sequences of ids).
#[derive(serde::Deserialize)]
struct Mirror {
    points: Vec<u32>,
    zero: Vec<Vec<u32>>,
    layers: Vec<Vec<Vec<u32>>>,
}

/// Total order on f32 for the heaps (NaN cannot occur: vectors are checked finite at insert).
#[derive(Clone, Copy, PartialEq)]
struct D(f32, u32);
impl Eq for D {}
impl PartialOrd for D {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for D {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

fn internal(detail: impl std::fmt::Display) -> Error {
    Error::Snapshot(format!("hnsw: {detail}"))
}

impl Segment {
    /// Build a graph over `slots` (rows of `vectors`, `dim` wide). Same inputs and seed ⇒ same graph: the
    /// build runs on one thread unless `threads > 1` (faster natively, but the insertion order, and so the
    /// graph, then depends on scheduling).
    pub fn build(
        vectors: &[f32],
        dim: usize,
        slots: &[u32],
        ef_construction: usize,
        seed: u64,
        threads: usize,
    ) -> Result<Segment> {
        let points: Vec<Pt> = slots
            .iter()
            .map(|&s| Pt {
                slot: s,
                v: &vectors[s as usize * dim..(s as usize + 1) * dim],
            })
            .collect();
        let builder = instant_distance::Builder::default()
            .ef_construction(ef_construction.max(1))
            .seed(seed);
        let build = move || builder.build_hnsw(points).0;
        let hnsw = run_with_threads(threads.max(1), build);
        let json = serde_json::to_vec(&hnsw).map_err(internal)?;
        drop(hnsw);
        let mirror: Mirror = serde_json::from_slice(&json).map_err(internal)?;
        drop(json);
        let n = mirror.points.len();
        let mut zero = Vec::with_capacity(n * M0);
        for node in &mirror.zero {
            if node.len() != M0 {
                return Err(internal("unexpected layer-0 width"));
            }
            zero.extend_from_slice(node);
        }
        let upper = mirror
            .layers
            .iter()
            .map(|layer| {
                let mut flat = Vec::with_capacity(layer.len() * M);
                for node in layer {
                    if node.len() != M {
                        return Err(internal("unexpected upper-layer width"));
                    }
                    flat.extend_from_slice(node);
                }
                Ok(flat)
            })
            .collect::<Result<Vec<_>>>()?;
        let seg = Segment {
            slots: mirror.points,
            zero,
            upper,
        };
        seg.validate(u32::MAX as usize)?;
        Ok(seg)
    }

    /// Nodes in the segment.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Structural checks, run on every graph built or loaded: array sizes agree, layer sizes decrease, every
    /// neighbour id is [`NONE`] or a node of its layer, every slot is `< n_slots`.
    pub fn validate(&self, n_slots: usize) -> Result<()> {
        let n = self.slots.len();
        let bad = |what: String| Err(Error::Snapshot(format!("hnsw segment: {what}")));
        if n.checked_mul(M0) != Some(self.zero.len()) {
            return bad(format!(
                "layer 0 has {} entries for {n} nodes",
                self.zero.len()
            ));
        }
        if let Some(&s) = self.slots.iter().find(|&&s| s as usize >= n_slots) {
            return bad(format!("slot {s} out of range ({n_slots} slots)"));
        }
        if let Some(&p) = self.zero.iter().find(|&&p| p != NONE && p as usize >= n) {
            return bad(format!("layer-0 neighbour {p} out of range ({n} nodes)"));
        }
        let mut prev = n;
        for (l, layer) in self.upper.iter().enumerate() {
            if layer.len() % M != 0 || layer.len() / M > prev || layer.is_empty() {
                return bad(format!("layer {} has a bad size ({})", l + 1, layer.len()));
            }
            let len = layer.len() / M;
            if let Some(&p) = layer.iter().find(|&&p| p != NONE && p as usize >= len) {
                return bad(format!(
                    "layer {} neighbour {p} out of range ({len} nodes)",
                    l + 1
                ));
            }
            prev = len;
        }
        Ok(())
    }

    /// The `ef` nearest accepted nodes to `q` (unit vector), as `(score = dot, slot)`, best first.
    /// Traversal goes through every node; only nodes for which `accept(slot)` holds enter the results.
    /// When few nodes are accepted the search widens until it has `ef` of them (at worst every node).
    pub fn search(
        &self,
        q: &[f32],
        vectors: &[f32],
        dim: usize,
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<(f32, u32)> {
        let n = self.slots.len();
        if n == 0 || ef == 0 {
            return Vec::new();
        }
        let dist = |pid: u32| {
            let s = self.slots[pid as usize] as usize;
            1.0 - dot(q, &vectors[s * dim..(s + 1) * dim])
        };
        // Greedy descent through the upper layers.
        let mut ep = 0u32;
        let mut ep_d = dist(0);
        for layer in self.upper.iter().rev() {
            loop {
                let mut moved = false;
                let base = ep as usize * M;
                for &nb in &layer[base..base + M] {
                    if nb == NONE {
                        break;
                    }
                    let d = dist(nb);
                    if d < ep_d {
                        ep_d = d;
                        ep = nb;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        // Beam search on layer 0.
        let mut visited = vec![0u64; n.div_ceil(64)];
        let mut seen = |p: u32| {
            let (w, b) = (p as usize / 64, 1u64 << (p % 64));
            let was = visited[w] & b != 0;
            visited[w] |= b;
            was
        };
        seen(ep);
        let mut candidates = BinaryHeap::new(); // min-heap through Reverse
        let mut results: BinaryHeap<D> = BinaryHeap::with_capacity(ef + 1); // max-heap: worst on top
        candidates.push(std::cmp::Reverse(D(ep_d, ep)));
        if accept(self.slots[ep as usize]) {
            results.push(D(ep_d, ep));
        }
        while let Some(std::cmp::Reverse(D(cd, c))) = candidates.pop() {
            if results.len() >= ef && cd > results.peek().map_or(f32::INFINITY, |w| w.0) {
                break;
            }
            let base = c as usize * M0;
            for &nb in &self.zero[base..base + M0] {
                if nb == NONE {
                    break;
                }
                if seen(nb) {
                    continue;
                }
                let d = dist(nb);
                let worst = results.peek().map_or(f32::INFINITY, |w| w.0);
                if results.len() < ef || d < worst {
                    candidates.push(std::cmp::Reverse(D(d, nb)));
                    if accept(self.slots[nb as usize]) {
                        results.push(D(d, nb));
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<(f32, u32)> = results
            .into_iter()
            .map(|D(d, p)| (1.0 - d, self.slots[p as usize]))
            .collect();
        out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out
    }

    /// Bytes held by the graph (neighbour arrays and the slot map).
    pub fn memory_bytes(&self) -> usize {
        4 * (self.slots.len() + self.zero.len() + self.upper.iter().map(Vec::len).sum::<usize>())
    }
}

/// Run `f` on a rayon pool of `threads` threads (one thread: a fixed insertion order, so a reproducible
/// graph). Where threads cannot be started (wasm32 without threads) rayon runs on the calling thread anyway.
fn run_with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        for row in v.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[test]
    fn same_seed_same_graph_and_valid() {
        let (n, dim) = (600, 16);
        let v = unit_vectors(n, dim, 7);
        let slots: Vec<u32> = (0..n as u32).collect();
        let a = Segment::build(&v, dim, &slots, 64, 42, 1).unwrap();
        let b = Segment::build(&v, dim, &slots, 64, 42, 1).unwrap();
        assert_eq!(a, b);
        a.validate(n).unwrap();
        assert_eq!(a.len(), n);
        let mut sorted = a.slots.clone();
        sorted.sort();
        assert_eq!(sorted, slots, "every slot is a node exactly once");
        let c = Segment::build(&v, dim, &slots, 64, 43, 1).unwrap();
        assert_ne!(a, c, "another seed, another graph");
    }

    #[test]
    fn search_finds_exact_neighbours_and_respects_accept() {
        let (n, dim) = (2000, 24);
        let v = unit_vectors(n, dim, 3);
        let slots: Vec<u32> = (0..n as u32).collect();
        let seg = Segment::build(&v, dim, &slots, 100, 1, 1).unwrap();
        let queries = unit_vectors(50, dim, 99);
        let mut hits = 0;
        for q in queries.chunks(dim) {
            let mut exact: Vec<(f32, u32)> = (0..n)
                .map(|i| (dot(q, &v[i * dim..(i + 1) * dim]), i as u32))
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let got = seg.search(q, &v, dim, 100, &|_| true);
            let top: Vec<u32> = got.iter().take(10).map(|x| x.1).collect();
            hits += exact[..10].iter().filter(|e| top.contains(&e.1)).count();
            // Only even slots accepted: every result is even, and they are the best even ones.
            let even = seg.search(q, &v, dim, 100, &|s| s % 2 == 0);
            assert!(even.iter().all(|x| x.1 % 2 == 0));
            let best_even = exact.iter().find(|e| e.1 % 2 == 0).unwrap().1;
            assert_eq!(even[0].1, best_even);
        }
        assert!(
            hits as f64 / 500.0 >= 0.95,
            "recall@10 {}",
            hits as f64 / 500.0
        );
        // An accept that refuses everything explores the whole graph and returns nothing.
        assert!(seg
            .search(&queries[..dim], &v, dim, 10, &|_| false)
            .is_empty());
    }

    #[test]
    fn validate_refuses_out_of_range_neighbours() {
        let (n, dim) = (200, 8);
        let v = unit_vectors(n, dim, 5);
        let slots: Vec<u32> = (0..n as u32).collect();
        let seg = Segment::build(&v, dim, &slots, 32, 1, 1).unwrap();
        let mut bad = seg.clone();
        bad.zero[5] = n as u32;
        assert!(matches!(bad.validate(n), Err(Error::Snapshot(_))));
        let mut bad = seg.clone();
        bad.slots[0] = n as u32;
        assert!(bad.validate(n).is_err());
        let mut bad = seg.clone();
        bad.zero.pop();
        assert!(bad.validate(n).is_err());
        if let Some(layer) = seg.upper.first() {
            let mut bad = seg.clone();
            bad.upper[0][0] = (layer.len() / M) as u32;
            assert!(bad.validate(n).is_err());
        }
    }
}
