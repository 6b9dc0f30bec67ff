// LoRA training speed and memory in wasm (Node 20, one thread): SmolLM2-135M Q4_1, the bundled sign-off set
// (examples/train/signoff.jsonl), rank 8 on q,v, batches of 4, max 256 tokens, the CLI's defaults otherwise.
// Runs --steps optimizer steps (default 10), then reports training tokens/s, the wall time projected for the
// whole run (200 examples × 3 epochs: 135 steps + 3 held-out evaluations, evaluations timed here too), the wasm
// memory and the process's peak RSS.
//   scripts/build-wasm nodejs && node bench/train-wasm.mjs [--steps=10]
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const root = new URL("../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const steps = Number(arg("steps", 10));

const gen = new lorag.Generator(readFileSync(new URL("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", root)));
const data = readFileSync(new URL("examples/train/signoff.jsonl", root), "utf8");
const trainer = new lorag.Trainer(gen, data, {}, {});
const info = trainer.info;
let t = performance.now();
const evalLoss = trainer.evalLoss();
const evalMs = performance.now() - t;
t = performance.now();
let last;
await trainer.run((p) => {
  last = p;
  return p.step < steps;
});
const ms = performance.now() - t;
const perStep = ms / last.step;
const projected = (perStep * info.totalSteps + evalMs * (info.config.epochs + 1)) / 1000;
console.log(
  JSON.stringify(
    {
      steps: last.step,
      totalSteps: info.totalSteps,
      trainExamples: info.trainExamples,
      evalExamples: info.evalExamples,
      parameters: info.parameters,
      tokens: last.tokens,
      tokensPerS: +(last.tokens / (ms / 1000)).toFixed(1),
      msPerStep: +perStep.toFixed(0),
      evalMs: +evalMs.toFixed(0),
      heldOutLossBefore: +evalLoss.toFixed(4),
      lossAtLastStep: +last.loss.toFixed(4),
      projectedWholeRunS: +projected.toFixed(0),
      wasmMemoryMiB: +(lorag.wasmMemoryBytes() / 2 ** 20).toFixed(1),
      peakRssMiB: +(process.resourceUsage().maxRSS / 1024).toFixed(1),
    },
    null,
    1,
  ),
);
