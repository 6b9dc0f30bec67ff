// lorag's wasm embedder in Node, measured the way ../shared/peers/bench/ort_web.mjs measures onnxruntime-web:
// same model (all-MiniLM-L6-v2 int8), same pre-tokenized inputs (peers/data: 200 short sentences at batch 1,
// 256 SciFact passages ≤256 tokens at batch 16/32, padded to the longest in each batch, corpus order),
// tokenization not timed, mean pooling + L2 normalization timed (inside lorag). One thread.
//   scripts/build-wasm nodejs && node bench/embed-wasm.mjs [--peers=DIR] [--batches=16,32] [--warmup=10]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const peers = arg("peers", new URL("../shared/peers", root).pathname);
const data = (f) => JSON.parse(readFileSync(`${peers}/data/${f}`, "utf8"));
const dir = new URL("models/all-MiniLM-L6-v2-int8/", root);
const read = (f) => readFileSync(new URL(f, dir));

const t0 = performance.now();
const embedder = new lorag.Embedder(
  {
    model_onnx: read("model.onnx"),
    tokenizer_json: read("tokenizer.json"),
    config_json: read("config.json"),
    pooling_config_json: read("1_Pooling/config.json"),
    sentence_bert_config_json: read("sentence_bert_config.json"),
    modules_json: read("modules.json"),
  },
  { batch_size: 1024 }, // batches are formed here, as in the peer script
);
const loadMs = performance.now() - t0;

const embed = (list) => embedder.embedIds(new Uint32Array(list.flat()), new Uint32Array(list.map((x) => x.length)));
const p50 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// (a) short sentences, batch 1
const short = data("short_sentences.json");
for (let i = 0; i < Number(arg("warmup", 10)); i++) embed([short.ids[i % short.ids.length]]);
const lat = [];
const tA = performance.now();
for (const ids of short.ids) {
  const t = performance.now();
  embed([ids]);
  lat.push(performance.now() - t);
}
const shortSec = (performance.now() - tA) / 1000;

// (b) passages, batch 16 / 32
const pass = data("passages_256.json");
const base = new Float32Array(readFileSync(`${peers}/data/vec_scifact_base.f32`).buffer.slice(0));
const passages = [];
for (const bs of arg("batches", "16,32").split(",").map(Number)) {
  embed(pass.ids.slice(0, bs)); // warmup
  const all = new Float32Array(pass.ids.length * 384);
  const batchMs = [];
  const tB = performance.now();
  for (let a = 0; a < pass.ids.length; a += bs) {
    const t = performance.now();
    all.set(embed(pass.ids.slice(a, a + bs)), a * 384);
    batchMs.push(performance.now() - t);
  }
  const sec = (performance.now() - tB) / 1000;
  let diff = 0;
  for (let i = 0; i < all.length; i++) diff = Math.max(diff, Math.abs(all[i] - base[i]));
  passages.push({
    batch: bs,
    n: pass.ids.length,
    emb_per_s: +(pass.ids.length / sec).toFixed(2),
    emb_per_s_median_batch: +((1000 * bs) / p50(batchMs)).toFixed(2),
    seconds: +sec.toFixed(2),
    max_abs_diff_vs_ort_python: +diff.toExponential(2),
  });
}
// Where the time goes: one batch of 16 passages, per tract operator.
const batch = pass.ids.slice(0, 16);
embedder.profileIds(new Uint32Array(batch.flat()), new Uint32Array(batch.map((x) => x.length)));
const prof = embedder.profileIds(new Uint32Array(batch.flat()), new Uint32Array(batch.map((x) => x.length)));
const totalMs = prof.reduce((a, [, ms]) => a + ms, 0);
const one = [short.ids[0]];
embedder.profileIds(new Uint32Array(one.flat()), new Uint32Array([one[0].length]));
const profShort = embedder.profileIds(new Uint32Array(one.flat()), new Uint32Array([one[0].length]));
const profile = prof.slice(0, 12).map(([op, ms, nodes]) => ({ op, ms: +ms.toFixed(1), share: +(ms / totalMs).toFixed(3), nodes }));
console.log(
  JSON.stringify(
    {
      name: "lorag_wasm_embed_t1",
      engine: `lorag wasm (${embedder.engine} engine, simd128) in Node ${process.version}`,
      load_ms: +loadMs.toFixed(1),
      short: { batch: 1, n: short.ids.length, emb_per_s: +(short.ids.length / shortSec).toFixed(1), p50_ms: +p50(lat).toFixed(2) },
      passages,
      profile_batch16_total_ms: +totalMs.toFixed(1),
      profile_batch16: profile,
      profile_short: profShort.map(([op, ms, nodes]) => ({ op, ms: +ms.toFixed(2), nodes })),
    },
    null,
    1,
  ),
);
