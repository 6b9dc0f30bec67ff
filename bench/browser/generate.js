// The generator benchmark inside a page: the same measurement as bench/generate-wasm.mjs (Node), run by
// bench/generate-browser.mjs in headless Chromium. Main thread, one thread. `device`: "cpu" (the synchronous
// CPU path, `generate`) or "gpu" (WebGPU through `useDevice("gpu")` and `generateAsync`), in the same page.
// `sample`: the default sampler (seeded) instead of greedy decoding for the measured requests.
import init, { Generator } from "/pkg/web/lorag.js";

window.bench = async (prompt, reps, decode, device = "cpu", sample = false) => {
  await init();
  const t0 = performance.now();
  const bytes = new Uint8Array(await (await fetch("/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")).arrayBuffer());
  const gen = new Generator(bytes);
  const loadMs = performance.now() - t0;
  let report = { kind: "cpu" };
  if (device !== "cpu") report = await gen.useDevice(device);
  const run = (ids, opts) => (device === "cpu" ? gen.generate(ids, opts) : gen.generateAsync(ids, opts));
  const greedy = { sampler: { greedy: true }, ignoreEos: true };
  const measured = sample ? { sampler: {}, ignoreEos: true } : greedy;
  const check = (await run(gen.encode("The capital of France is"), { ...greedy, maxTokens: 1 })).text;
  const ids = gen.encode(prompt);
  const runs = [];
  let firstIds;
  // On the GPU, the host's time in the prompt's submissions alone (a one-token request), to take out of each run's.
  let prefillHost = 0;
  if (report.kind === "gpu") {
    const before = gen.device;
    await run(ids, { ...measured, maxTokens: 1 });
    prefillHost = gen.device.submitUs - before.submitUs;
  }
  for (let r = 0; r < reps; r++) {
    const before = gen.device;
    const out = await run(ids, { ...measured, maxTokens: decode });
    const after = gen.device;
    firstIds ??= Array.from(out.ids);
    runs.push({
      prompt_n: out.promptIds.length,
      prefill_tok_s: +((out.promptIds.length / out.prefillMs) * 1e3).toFixed(1),
      predicted_n: out.ids.length,
      decode_tok_s: +(((out.ids.length - 1) / out.decodeMs) * 1e3).toFixed(2),
      text_head: out.text.slice(0, 60),
      ...(after.kind === "gpu" && {
        submissions: after.submissions - before.submissions,
        // The host's time recording and submitting the decoding steps (the request's less the prompt's alone),
        // per token fed back: with a GPU fast enough, decoding cannot go faster than this.
        host_submit_us_per_step: +((after.submitUs - before.submitUs - prefillHost) / (out.ids.length - 1)).toFixed(1),
      }),
    });
  }
  return { loadMs, device: report, check, runs, ids: firstIds };
};
