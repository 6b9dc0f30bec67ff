//! The knowledge pack: one binary snapshot of a [`KnowledgeBase`].
//!
//! ```text
//! 0   magic "LORAGKB\0"          8 bytes
//! 8   format version             u32 (little-endian, like every number here)
//! 12  byte-order mark            u32 0x01020304 (reads 0x04030201 on a big-endian writer)
//! 16  section count              u32 (≤ 16)
//! 20  reserved                   u32 0
//! 24  CRC-32 of bytes 0..24 and the section table
//! 28  section table: per section tag [u8; 4], CRC-32 u32, offset u64, length u64 (24 bytes)
//! …   sections, each where the table says, not overlapping
//! ```
//!
//! Sections: `META` (JSON: embedder identity, index config, slot count), `DOCS` (JSON: documents and their
//! slots), `CHNK` (JSON: one chunk or `null` per slot), `VECS` (f32 × dim per slot), `SEGS` (HNSW segments:
//! slot maps and neighbour arrays), `TAIL` (u32 slots), `BM25` (vocabulary, postings, lengths).
//!
//! Loading checks everything before the knowledge base exists: size cap, magic, version, byte order,
//! table bounds, every checksum, then every count and id against the others (slots, neighbour ids, chunk and
//! document ids, vector dimension, finiteness and norm, BM25 postings against the recorded lengths).
//! Failures are typed errors; nothing is allocated beyond what the bytes themselves justify.

use std::collections::{BTreeMap, HashMap};

use super::bm25::Bm25;
use super::hnsw::{Segment, M, M0};
use super::{DocEntry, DocInfo, EmbedderId, IndexConfig, KnowledgeBase};
use crate::{Chunk, Error, Limits, Result};

/// First bytes of every knowledge pack.
pub const PACK_MAGIC: &[u8; 8] = b"LORAGKB\0";
/// The format version this build writes and reads.
pub const PACK_VERSION: u32 = 1;
const BOM: u32 = 0x0102_0304;
const HEADER: usize = 28;
const ENTRY: usize = 24;
const MAX_SECTIONS: usize = 16;
const TAGS: [&str; 7] = ["META", "DOCS", "CHNK", "VECS", "SEGS", "TAIL", "BM25"];

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    embedder: EmbedderId,
    config: IndexConfig,
    slots: u64,
    writer: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DocRecord {
    info: DocInfo,
    slots: Vec<u32>,
}

fn u32s(out: &mut Vec<u8>, v: &[u32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializing plain data to JSON")
}

impl KnowledgeBase {
    /// The knowledge pack bytes (see the [format](self)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let meta = Meta {
            embedder: self.embedder.clone(),
            config: self.config.clone(),
            slots: self.chunks.len() as u64,
            writer: format!("lorag {}", crate::VERSION),
        };
        let docs: Vec<DocRecord> = self
            .docs
            .values()
            .map(|d| DocRecord {
                info: d.info.clone(),
                slots: d.slots.clone(),
            })
            .collect();
        let mut vecs = Vec::with_capacity(self.vectors.len() * 4);
        for x in &self.vectors {
            vecs.extend_from_slice(&x.to_le_bytes());
        }
        let mut segs = Vec::new();
        u32s(&mut segs, &[self.segments.len() as u32]);
        for s in &self.segments {
            u32s(&mut segs, &[s.slots.len() as u32, s.upper.len() as u32]);
            u32s(
                &mut segs,
                &s.upper
                    .iter()
                    .map(|l| (l.len() / M) as u32)
                    .collect::<Vec<_>>(),
            );
            u32s(&mut segs, &s.slots);
            u32s(&mut segs, &s.zero);
            for l in &s.upper {
                u32s(&mut segs, l);
            }
        }
        let mut tail = Vec::new();
        u32s(&mut tail, &self.tail);
        let b = &self.bm25;
        let mut bm = Vec::new();
        bm.extend_from_slice(&b.params.k1.to_le_bytes());
        bm.extend_from_slice(&b.params.b.to_le_bytes());
        u32s(&mut bm, &[b.term_names.len() as u32]);
        for t in &b.term_names {
            u32s(&mut bm, &[t.len() as u32]);
            bm.extend_from_slice(t.as_bytes());
        }
        for p in &b.postings {
            u32s(&mut bm, &[p.len() as u32]);
            for &(s, tf) in p {
                u32s(&mut bm, &[s, tf]);
            }
        }
        u32s(&mut bm, &[b.lengths.len() as u32]);
        u32s(&mut bm, &b.lengths);

        let sections: [Vec<u8>; 7] = [
            json(&meta),
            json(&docs),
            json(&self.chunks),
            vecs,
            segs,
            tail,
            bm,
        ];
        let mut out = Vec::with_capacity(
            HEADER + ENTRY * sections.len() + sections.iter().map(Vec::len).sum::<usize>(),
        );
        out.extend_from_slice(PACK_MAGIC);
        u32s(&mut out, &[PACK_VERSION, BOM, sections.len() as u32, 0, 0]);
        let mut offset = (HEADER + ENTRY * sections.len()) as u64;
        for (tag, bytes) in TAGS.iter().zip(&sections) {
            out.extend_from_slice(tag.as_bytes());
            u32s(&mut out, &[crc32fast::hash(bytes)]);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            offset += bytes.len() as u64;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&out[..24]);
        h.update(&out[HEADER..]);
        let crc = h.finalize();
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        for s in &sections {
            out.extend_from_slice(s);
        }
        out
    }

    /// Load and validate a knowledge pack with the default [`Limits`]. With `expect`, the pack must come
    /// from that embedder ([`Error::EmbedderMismatch`] otherwise).
    pub fn from_bytes(bytes: &[u8], expect: Option<&EmbedderId>) -> Result<KnowledgeBase> {
        Self::from_bytes_with_limits(bytes, expect, &Limits::default())
    }

    /// [`KnowledgeBase::from_bytes`] with explicit limits (`max_pack_bytes`).
    pub fn from_bytes_with_limits(
        bytes: &[u8],
        expect: Option<&EmbedderId>,
        limits: &Limits,
    ) -> Result<KnowledgeBase> {
        Limits::check("knowledge pack bytes", bytes.len(), limits.max_pack_bytes)?;
        let sections = read_table(bytes)?;
        let get = |tag: &'static str| sections[TAGS.iter().position(|t| *t == tag).unwrap()];

        let meta: Meta = serde_json::from_slice(get("META"))
            .map_err(|e| Error::Snapshot(format!("META section: {e}")))?;
        meta.config.validate()?;
        let dim = meta.embedder.dim as usize;
        if dim == 0 || dim > super::MAX_DIM {
            return Err(Error::Snapshot(format!("dimension {dim} out of range")));
        }
        if let Some(want) = expect {
            if !want.matches(&meta.embedder) {
                return Err(Error::EmbedderMismatch {
                    pack: meta.embedder.to_string(),
                    model: want.to_string(),
                });
            }
        }
        // Slot count against the vector bytes, before anything is allocated from it.
        let vec_bytes = get("VECS");
        let n = usize::try_from(meta.slots)
            .ok()
            .filter(|&n| n.checked_mul(dim).and_then(|x| x.checked_mul(4)) == Some(vec_bytes.len()))
            .ok_or_else(|| {
                Error::Snapshot(format!(
                    "{} slots × dimension {dim} disagree with {} vector bytes",
                    meta.slots,
                    vec_bytes.len()
                ))
            })?;
        if n > u32::MAX as usize - 1 {
            return Err(Error::Snapshot("too many slots".into()));
        }
        let vectors: Vec<f32> = vec_bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();

        let chunks: Vec<Option<Chunk>> = serde_json::from_slice(get("CHNK"))
            .map_err(|e| Error::Snapshot(format!("CHNK section: {e}")))?;
        if chunks.len() != n {
            return Err(Error::Snapshot(format!(
                "{} chunk records for {n} slots",
                chunks.len()
            )));
        }
        let mut chunk_slot = HashMap::with_capacity(n);
        let mut live = 0;
        for (s, c) in chunks.iter().enumerate() {
            let Some(c) = c else { continue };
            live += 1;
            if chunk_slot.insert(c.id.clone(), s as u32).is_some() {
                return Err(Error::Snapshot(format!("chunk id {} appears twice", c.id)));
            }
            let v = &vectors[s * dim..(s + 1) * dim];
            let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if !(norm - 1.0).abs().lt(&1e-3) {
                return Err(Error::Snapshot(format!(
                    "vector of chunk {} is not unit length (norm {norm})",
                    c.id
                )));
            }
        }

        let doc_records: Vec<DocRecord> = serde_json::from_slice(get("DOCS"))
            .map_err(|e| Error::Snapshot(format!("DOCS section: {e}")))?;
        let mut owner = vec![false; n];
        let mut docs = BTreeMap::new();
        for d in doc_records {
            for &s in &d.slots {
                let c = chunks
                    .get(s as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        Error::Snapshot(format!(
                            "document {} lists slot {s}, which holds no chunk",
                            d.info.id
                        ))
                    })?;
                if c.doc_id != d.info.id || std::mem::replace(&mut owner[s as usize], true) {
                    return Err(Error::Snapshot(format!(
                        "slot {s} is claimed by document {} but holds chunk {} of {}",
                        d.info.id, c.id, c.doc_id
                    )));
                }
            }
            let id = d.info.id.clone();
            if docs
                .insert(
                    id.clone(),
                    DocEntry {
                        info: d.info,
                        slots: d.slots,
                    },
                )
                .is_some()
            {
                return Err(Error::Snapshot(format!("document id {id} appears twice")));
            }
        }
        if let Some(s) = (0..n).find(|&s| chunks[s].is_some() && !owner[s]) {
            return Err(Error::Snapshot(format!("slot {s} belongs to no document")));
        }

        let segments = read_segments(get("SEGS"), n)?;
        let tail = read_u32s(get("TAIL"), "TAIL")?;
        let mut indexed = vec![false; n];
        for &s in segments.iter().flat_map(|g| g.slots.iter()).chain(&tail) {
            let s = s as usize;
            if s >= n || std::mem::replace(&mut indexed[s], true) {
                return Err(Error::Snapshot(format!(
                    "slot {s} is out of range or indexed twice"
                )));
            }
        }
        if let Some(&s) = tail.iter().find(|&&s| chunks[s as usize].is_none()) {
            return Err(Error::Snapshot(format!("tail slot {s} holds no chunk")));
        }
        if let Some(s) = (0..n).find(|&s| chunks[s].is_some() && !indexed[s]) {
            return Err(Error::Snapshot(format!(
                "slot {s} is in no segment and not in the tail"
            )));
        }

        let bm25 = read_bm25(get("BM25"), &chunks, meta.config.bm25)?;
        Ok(KnowledgeBase {
            dim,
            embedder: meta.embedder,
            config: meta.config,
            chunks,
            vectors,
            chunk_slot,
            docs,
            segments,
            tail,
            live,
            bm25,
        })
    }

    /// Save atomically (native): written to a temporary file beside `path`, flushed to disk, then renamed
    /// over it. An interrupted save leaves the previous pack as it was.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let bytes = self.to_bytes();
        atomic_write(path, &mut |w| w.write_all(&bytes))
    }
}

/// Write a file atomically (native): `write` fills a temporary file in the same folder, which is synced and
/// renamed over `path` only when `write` succeeded. On any error the temporary file is removed and `path`
/// is untouched.
#[cfg(not(target_arch = "wasm32"))]
pub fn atomic_write(
    path: &std::path::Path,
    write: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".{}-{nanos}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The header and section table: returns each section's bytes in [`TAGS`] order.
fn read_table(b: &[u8]) -> Result<Vec<&[u8]>> {
    let trunc = |what, needed: usize| Error::Truncated {
        what,
        needed: needed as u64,
        available: b.len() as u64,
    };
    if b.len() < HEADER {
        if !PACK_MAGIC.starts_with(&b[..b.len().min(8)]) {
            return Err(Error::Snapshot(
                "not a lorag knowledge pack (bad magic)".into(),
            ));
        }
        return Err(trunc("header", HEADER));
    }
    if &b[..8] != PACK_MAGIC {
        return Err(Error::Snapshot(
            "not a lorag knowledge pack (bad magic)".into(),
        ));
    }
    let word = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = word(8);
    if word(12) != BOM {
        return Err(Error::Snapshot(format!(
            "byte-order mark {:#010x}: written with another byte order or corrupt",
            word(12)
        )));
    }
    if version != PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: PACK_VERSION,
        });
    }
    let count = word(16) as usize;
    if count > MAX_SECTIONS {
        return Err(Error::Snapshot(format!(
            "{count} sections (at most {MAX_SECTIONS})"
        )));
    }
    let table_end = HEADER + count * ENTRY;
    if b.len() < table_end {
        return Err(trunc("section table", table_end));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..24]);
    h.update(&b[HEADER..table_end]);
    if h.finalize() != word(24) {
        return Err(Error::Checksum { section: "header" });
    }
    let mut found: Vec<Option<&[u8]>> = vec![None; TAGS.len()];
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for i in 0..count {
        let e = &b[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
        let tag = std::str::from_utf8(&e[..4]).unwrap_or("?");
        let crc = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let off = u64::from_le_bytes(e[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(e[16..24].try_into().unwrap());
        let Some(k) = TAGS.iter().position(|t| *t == tag) else {
            return Err(Error::Snapshot(format!("unknown section {tag:?}")));
        };
        let end = off.checked_add(len).filter(|&e| e <= b.len() as u64);
        let Some(end) = end else {
            return Err(Error::Truncated {
                what: TAGS[k],
                needed: off.saturating_add(len),
                available: b.len() as u64,
            });
        };
        if off < table_end as u64 || ranges.iter().any(|&(s, e)| off < e && s < end) {
            return Err(Error::Snapshot(format!("section {tag} overlaps another")));
        }
        ranges.push((off, end));
        let bytes = &b[off as usize..end as usize];
        if crc32fast::hash(bytes) != crc {
            return Err(Error::Checksum { section: TAGS[k] });
        }
        if found[k].replace(bytes).is_some() {
            return Err(Error::Snapshot(format!("section {tag} appears twice")));
        }
    }
    found
        .into_iter()
        .zip(TAGS)
        .map(|(s, t)| s.ok_or_else(|| Error::Snapshot(format!("section {t} is missing"))))
        .collect()
}

/// A little-endian reader that refuses to read (or allocate) past its bytes.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(Error::Snapshot(format!(
                "{} section: {n} more bytes needed, {} left",
                self.what,
                self.b.len()
            )));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// `count` u32s, refusing counts the remaining bytes cannot hold (before allocating).
    fn u32s(&mut self, count: usize) -> Result<Vec<u32>> {
        let bytes = count.checked_mul(4).ok_or_else(|| {
            Error::Snapshot(format!("{} section: count {count} overflows", self.what))
        })?;
        Ok(self
            .take(bytes)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
    fn done(&self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Error::Snapshot(format!(
                "{} section: {} unexpected trailing bytes",
                self.what,
                self.b.len()
            )))
        }
    }
}

fn read_u32s(b: &[u8], what: &'static str) -> Result<Vec<u32>> {
    if !b.len().is_multiple_of(4) {
        return Err(Error::Snapshot(format!(
            "{what} section length {} is not a multiple of 4",
            b.len()
        )));
    }
    Reader { b, what }.u32s(b.len() / 4)
}

fn read_segments(b: &[u8], n_slots: usize) -> Result<Vec<Segment>> {
    let mut r = Reader { b, what: "SEGS" };
    let count = r.u32()? as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        let n = r.u32()? as usize;
        let layers = r.u32()? as usize;
        let sizes = r.u32s(layers)?;
        let slots = r.u32s(n)?;
        let zero = r.u32s(
            n.checked_mul(M0)
                .ok_or_else(|| Error::Snapshot("segment size overflows".into()))?,
        )?;
        let mut upper = Vec::with_capacity(layers.min(64));
        for &len in &sizes {
            upper.push(
                r.u32s(
                    (len as usize)
                        .checked_mul(M)
                        .ok_or_else(|| Error::Snapshot("layer size overflows".into()))?,
                )?,
            );
        }
        let seg = Segment { slots, zero, upper };
        seg.validate(n_slots)?;
        out.push(seg);
    }
    r.done()?;
    Ok(out)
}

fn read_bm25(b: &[u8], chunks: &[Option<Chunk>], params: super::Bm25Params) -> Result<Bm25> {
    let mut r = Reader { b, what: "BM25" };
    let f = |x: &[u8]| f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    let (k1, bb) = (f(r.take(4)?), f(r.take(4)?));
    if k1 != params.k1 || bb != params.b {
        return Err(Error::Snapshot(
            "BM25 parameters disagree with the config".into(),
        ));
    }
    let n = chunks.len();
    let mut ix = Bm25::new(params);
    let terms = r.u32()? as usize;
    if terms > r.b.len() / 4 {
        return Err(Error::Snapshot(format!(
            "BM25 section: {terms} terms cannot fit"
        )));
    }
    for id in 0..terms {
        let len = r.u32()? as usize;
        let t = std::str::from_utf8(r.take(len)?)
            .map_err(|_| Error::Snapshot(format!("BM25 term {id} is not UTF-8")))?
            .to_string();
        if t.is_empty() || ix.terms.insert(t.clone(), id as u32).is_some() {
            return Err(Error::Snapshot(format!(
                "BM25 term {t:?} is empty or repeated"
            )));
        }
        ix.term_names.push(t);
    }
    let mut sums = vec![0u64; n];
    for id in 0..terms {
        let count = r.u32()? as usize;
        let flat = r.u32s(
            count
                .checked_mul(2)
                .ok_or_else(|| Error::Snapshot("posting count overflows".into()))?,
        )?;
        let mut list = Vec::with_capacity(count);
        let mut df = 0;
        let mut prev: Option<u32> = None;
        for p in flat.chunks_exact(2) {
            let (s, tf) = (p[0], p[1]);
            if s as usize >= n || tf == 0 || prev.is_some_and(|q| q >= s) {
                return Err(Error::Snapshot(format!(
                    "BM25 term {:?}: posting ({s}, {tf}) out of range or out of order",
                    ix.term_names[id]
                )));
            }
            prev = Some(s);
            if chunks[s as usize].is_some() {
                df += 1;
                sums[s as usize] += tf as u64;
            }
            list.push((s, tf));
        }
        ix.postings.push(list);
        ix.df.push(df);
    }
    let lens = r.u32()? as usize;
    let lengths = r.u32s(lens)?;
    r.done()?;
    if lengths.len() > n {
        return Err(Error::Snapshot("BM25 has more lengths than slots".into()));
    }
    ix.live = vec![false; lengths.len()];
    for (s, c) in chunks.iter().enumerate() {
        if c.is_none() {
            continue;
        }
        let len = lengths
            .get(s)
            .copied()
            .ok_or_else(|| Error::Snapshot(format!("BM25 has no length for live slot {s}")))?;
        if len as u64 != sums[s] {
            return Err(Error::Snapshot(format!(
                "BM25 length of slot {s} is {len} but its postings hold {}",
                sums[s]
            )));
        }
        ix.live[s] = true;
        ix.live_count += 1;
        ix.total_len += len as u64;
    }
    ix.lengths = lengths;
    Ok(ix)
}
