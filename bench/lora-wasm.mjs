// Decoding speed with LoRA adapters in lorag's wasm build under Node, one thread, against the base: SmolLM2-135M
// Q4_1, the ~200-token prompt of peers/data/llm_prompt.json, 64 greedy tokens (end-of-sequence ignored); the
// configurations interleaved round by round, medians of --reps rounds. The adapters are the GGUF-LoRA files that
// `cargo bench --bench lora` writes to target/lora-bench/ (random; rank 8 on q,v and rank 16 on all projections).
//   cargo bench --bench lora && scripts/build-wasm nodejs && node bench/lora-wasm.mjs [--reps=5]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const peers = arg("peers", new URL("../shared/peers", root).pathname);
const lp = JSON.parse(readFileSync(`${peers}/data/llm_prompt.json`, "utf8"));
const gen = new lorag.Generator(readFileSync(new URL("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", root)));
const names = [0, 1, 2].flatMap((i) => [`r8-qv-${i}`, `r16-all-${i}`]);
for (const n of names) gen.loadAdapter(n, readFileSync(new URL(`target/lora-bench/${n}.gguf`, root)));
const configs = [
  ["base", []],
  ["1 × rank 8 q,v", ["r8-qv-0"]],
  ["1 × rank 16 all", ["r16-all-0"]],
  ["3 × rank 8 q,v", ["r8-qv-0", "r8-qv-1", "r8-qv-2"]],
  ["3 × rank 16 all", ["r16-all-0", "r16-all-1", "r16-all-2"]],
];
const prompt = gen.encode(lp.prompt);
const reps = Number(arg("reps", 5));
const dec = configs.map(() => []);
const pre = configs.map(() => []);
for (let r = 0; r < reps; r++) {
  configs.forEach(([, use], i) => {
    const out = gen.generate(prompt, {
      maxTokens: 64,
      sampler: { greedy: true },
      ignoreEos: true,
      adapters: use.map((name) => ({ name })),
    });
    dec[i].push(((out.ids.length - 1) / out.decodeMs) * 1e3);
    pre[i].push((out.promptIds.length / out.prefillMs) * 1e3);
  });
}
const med = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
const [d0, p0] = [med(dec[0]), med(pre[0])];
console.log(`wasm in Node ${process.version}; prompt ${prompt.length} tokens, 64 generated, ${reps} rounds, medians`);
console.log("adapters           decode tok/s   vs base  prefill tok/s   vs base");
configs.forEach(([label], i) => {
  const [d, p] = [med(dec[i]), med(pre[i])];
  const pct = (x, b) => `${x >= b ? "+" : ""}${((x / b - 1) * 100).toFixed(1)}%`.padStart(8);
  console.log(`${label.padEnd(18)} ${d.toFixed(1).padStart(12)} ${pct(d, d0)} ${p.toFixed(1).padStart(13)} ${pct(p, p0)}`);
});
