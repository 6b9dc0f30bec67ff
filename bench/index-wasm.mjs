// lorag's knowledge base (wasm, Node, one thread) measured the way ../shared/peers/bench/vector_wasm.mjs measures
// hnswlib-wasm, edgevec and voy: same vectors (peers/data: 20,000 random unit vectors + 1,000 queries, and the
// 5,183 SciFact MiniLM embeddings + 1,109 claims, d = 384), same exact top-10 ground truth, k = 10, queries one
// at a time, recall@10 and queries/s at ef 50/100/200. Build = adding every vector + compact() (one HNSW segment,
// efConstruction 200, instant-distance's M = 32). Run it right after the peer script so the ratio is taken under
// the same load:
//   scripts/build-wasm nodejs
//   (cd COPY_OF_PEERS && node bench/vector_wasm.mjs --peer=hnswlib-wasm) && node bench/index-wasm.mjs --peers=COPY_OF_PEERS
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const peers = arg("peers", new URL("../shared/peers", root).pathname);
const DIM = 384, K = 10;
const EFS = String(arg("efs", "50,100,200")).split(",").map(Number);
const readF32 = (f) => {
  const b = readFileSync(`${peers}/data/${f}`);
  const data = new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
  return { n: data.length / DIM, row: (i) => data.subarray(i * DIM, (i + 1) * DIM) };
};
const readI32 = (f) => {
  const b = readFileSync(`${peers}/data/${f}`);
  const data = new Int32Array(b.buffer, b.byteOffset, b.byteLength / 4);
  return { n: data.length / K, row: (i) => data.subarray(i * K, (i + 1) * K) };
};
const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;

function timeQueries(Q, fn) {
  for (let i = 0; i < Math.min(50, Q.n); i++) fn(Q.row(i));
  const found = new Array(Q.n), chunkMs = [];
  const t = performance.now();
  for (let c = 0; c < Q.n; c += 100) {
    const tc = performance.now();
    for (let i = c; i < Math.min(Q.n, c + 100); i++) found[i] = fn(Q.row(i));
    if (c + 100 <= Q.n) chunkMs.push(performance.now() - tc);
  }
  const s = (performance.now() - t) / 1000;
  const med = [...chunkMs].sort((a, b) => a - b)[Math.floor(chunkMs.length / 2)];
  return { found, qps: round(Q.n / s, 1), qps_median_chunk: round(100000 / med, 1), ms_per_query: round((s * 1000) / Q.n, 4) };
}

const out = [];
for (const ds of String(arg("datasets", "random,scifact")).split(",")) {
  const B = readF32(`vec_${ds}_base.f32`), Q = readF32(`vec_${ds}_query.f32`), GT = readI32(`vec_${ds}_gt.i32`);
  const rss0 = process.memoryUsage().rss;
  const t = performance.now();
  // The tail is sealed once, by compact(), rather than every 1,024 vectors.
  const kb = new lorag.KnowledgeBase({ name: "bench", dim: DIM, hash: ds }, { tail_threshold: 1 << 30 });
  const chunk = (i) => ({ id: `${i}#0`, doc_id: String(i), index: 0, span: { start: 0, end: 0 }, source_span: null,
    pages: null, heading_path: [], size: 0, text: "", hash: String(i), prefix_headings: false });
  for (let i = 0; i < B.n; i++) kb.addDocument({ id: String(i) }, [chunk(i)], B.row(i));
  kb.compact();
  const buildS = (performance.now() - t) / 1000;
  const rssDelta = round((process.memoryUsage().rss - rss0) / 2 ** 20, 1);
  const rows = [];
  for (const ef of EFS) {
    const opts = { k: K, mode: "hnsw", ef };
    const r = timeQueries(Q, (q) => kb.searchIds(q, undefined, opts).map((id) => parseInt(id, 10)));
    let hit = 0;
    for (let q = 0; q < GT.n; q++) { const g = new Set(GT.row(q)); for (const id of r.found[q]) if (g.has(id)) hit++; }
    rows.push({ ef, qps: r.qps, qps_median_chunk: r.qps_median_chunk, ms_per_query: r.ms_per_query, recall_at_10: round(hit / (GT.n * K), 4) });
  }
  const exact = timeQueries(Q, (q) => kb.searchIds(q, undefined, { k: K, mode: "exact" }));
  out.push({ dataset: ds, n_base: B.n, n_query: Q.n, build_seconds: round(buildS, 3), rss_delta_after_build_mib: rssDelta,
    memory: kb.memory(), search: rows, exact_qps: exact.qps });
  console.error(`lorag ${ds}: build ${buildS.toFixed(2)} s, exact ${exact.qps} q/s`, rows);
}
console.log(JSON.stringify({ name: "index_lorag_wasm", date: new Date().toISOString(), node: process.version, results: out }, null, 1));
