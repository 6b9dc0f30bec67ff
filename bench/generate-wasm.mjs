// lorag's wasm generator in Node, measured the way ../shared/peers/bench/wllama.mjs measures wllama: SmolLM2-135M
// Q4_1, the ~200-token prompt of peers/data/llm_prompt.json, 64 greedy tokens with end-of-sequence ignored, one
// thread, median and best of --reps runs. Prefill = prompt tokens / prompt time; decode = (tokens - 1) / time after
// the first token (llama.cpp's predicted_per_second counts the same way).
//   scripts/build-wasm nodejs && node bench/generate-wasm.mjs [--peers=DIR] [--reps=3] [--decode=64]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const peers = arg("peers", new URL("../shared/peers", root).pathname);
const lp = JSON.parse(readFileSync(`${peers}/data/llm_prompt.json`, "utf8"));
const file = new URL("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", root);

const t0 = performance.now();
const gen = new lorag.Generator(readFileSync(file));
const loadMs = performance.now() - t0;
const greedy = { sampler: { greedy: true }, ignoreEos: true };

const chk = gen.generate(gen.encode(lp.greedy_check.prompt), { ...greedy, maxTokens: 1 });
const prompt = gen.encode(lp.prompt);
const runs = [];
for (let r = 0; r < Number(arg("reps", 3)); r++) {
  const t = performance.now();
  const out = gen.generate(prompt, { ...greedy, maxTokens: Number(arg("decode", 64)) });
  runs.push({
    wall_ms: +(performance.now() - t).toFixed(1),
    prompt_n: out.promptIds.length,
    prompt_ms: +out.prefillMs.toFixed(1),
    prefill_tok_s: +((out.promptIds.length / out.prefillMs) * 1e3).toFixed(1),
    predicted_n: out.ids.length,
    decode_tok_s: +(((out.ids.length - 1) / out.decodeMs) * 1e3).toFixed(2),
    text_head: out.text.slice(0, 60),
  });
}
const med = (k) => [...runs.map((x) => x[k])].sort((a, b) => a - b)[Math.floor(runs.length / 2)];
const best = (k) => Math.max(...runs.map((x) => x[k]));
console.log(
  JSON.stringify(
    {
      name: "lorag_generate_wasm_t1",
      node: process.version,
      model: "SmolLM2-135M-Instruct.Q4_1.gguf",
      model_load_ms: +loadMs.toFixed(1),
      greedy_check: { got: chk.text, pass: chk.text === lp.greedy_check.expect_text },
      prompt_tokens: prompt.length,
      prefill_tok_s_median: med("prefill_tok_s"),
      prefill_tok_s_best: best("prefill_tok_s"),
      decode_tok_s_median: med("decode_tok_s"),
      decode_tok_s_best: best("decode_tok_s"),
      peak_rss_mib: +(process.resourceUsage().maxRSS / 1024).toFixed(1),
      runs,
    },
    null,
    1,
  ),
);
