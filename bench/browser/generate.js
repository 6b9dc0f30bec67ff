// The generator benchmark inside a page: the same measurement as bench/generate-wasm.mjs (Node), run by
// bench/generate-browser.mjs in headless Chromium. Main thread, one thread.
import init, { Generator } from "/pkg/web/lorag.js";

window.bench = async (prompt, reps, decode) => {
  await init();
  const t0 = performance.now();
  const bytes = new Uint8Array(await (await fetch("/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")).arrayBuffer());
  const gen = new Generator(bytes);
  const loadMs = performance.now() - t0;
  const greedy = { sampler: { greedy: true }, ignoreEos: true };
  const check = gen.generate(gen.encode("The capital of France is"), { ...greedy, maxTokens: 1 }).text;
  const ids = gen.encode(prompt);
  const runs = [];
  for (let r = 0; r < reps; r++) {
    const out = gen.generate(ids, { ...greedy, maxTokens: decode });
    runs.push({
      prompt_n: out.promptIds.length,
      prefill_tok_s: +((out.promptIds.length / out.prefillMs) * 1e3).toFixed(1),
      predicted_n: out.ids.length,
      decode_tok_s: +(((out.ids.length - 1) / out.decodeMs) * 1e3).toFixed(2),
      text_head: out.text.slice(0, 60),
    });
  }
  return { loadMs, check, runs };
};
