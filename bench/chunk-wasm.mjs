// Chunking throughput of the wasm build in Node on plain prose (SciFact abstracts), the same input and tokenizer
// as the native criterion bench (benches/chunking.rs). Needs scripts/build-wasm nodejs and scripts/fetch-models.
//   node bench/chunk-wasm.mjs [path/to/corpus.jsonl]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const corpus = process.argv[2] ?? new URL("../shared/data/scifact/corpus.jsonl", root).pathname;
const prose = readFileSync(corpus, "utf8")
  .split("\n")
  .filter(Boolean)
  .map((l) => JSON.parse(l))
  .map((d) => `${d.title}\n${d.text}\n\n`)
  .join("");
const bytes = new TextEncoder().encode(prose);
const model = new URL("models/all-MiniLM-L6-v2-int8/", root);
const tokens = new lorag.Chunker(readFileSync(new URL("tokenizer.json", model)), readFileSync(new URL("sentence_bert_config.json", model)), {});
const chars = new lorag.Chunker(undefined, undefined, {});

function run(name, chunker, reps = 5) {
  chunker.chunkBytes("warmup.txt", bytes, {});
  const times = [];
  let n = 0;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    n = chunker.chunkBytes("prose.txt", bytes, {}).length;
    times.push((performance.now() - t0) / 1000);
  }
  times.sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)];
  const mibs = bytes.length / 2 ** 20 / median;
  console.log(JSON.stringify({ bench: name, bytes: bytes.length, chunks: n, median_s: +median.toFixed(3), MiB_per_s: +mibs.toFixed(2) }));
}
run("wasm ingest+chunk tokens (MiniLM), incl. JS conversion of the chunks", tokens);
run("wasm ingest+chunk chars, incl. JS conversion of the chunks", chars);
