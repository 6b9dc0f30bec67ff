// lorag's wasm generator in real headless Chromium (playwright-core, /usr/bin/chromium): the measurement of
// bench/generate-wasm.mjs (SmolLM2-135M Q4_1, peers' ~200-token prompt, 64 greedy tokens, EOS ignored, one thread).
//   scripts/build-wasm web && node bench/generate-browser.mjs [--peers=DIR] [--reps=3]
import { readFile } from "node:fs/promises";
import { chromium } from "playwright-core";
import { serve } from "../tests/browser/serve.mjs";

const root = new URL("../", import.meta.url).pathname;
const arg = (k, d) => process.argv.find((a) => a.startsWith(`--${k}=`))?.split("=")[1] ?? d;
const peers = arg("peers", root + "../shared/peers");
const lp = JSON.parse(await readFile(`${peers}/data/llm_prompt.json`, "utf8"));
const { server, origin } = await serve(root);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(600_000);
  await page.goto(`${origin}/bench/browser/generate.html`);
  await page.waitForFunction(() => typeof window.bench === "function");
  const out = await page.evaluate(([p, r, d]) => window.bench(p, r, d), [lp.prompt, Number(arg("reps", 3)), Number(arg("decode", 64))]);
  const med = (k) => [...out.runs.map((x) => x[k])].sort((a, b) => a - b)[Math.floor(out.runs.length / 2)];
  console.log(JSON.stringify({
    name: "lorag_generate_chromium_t1", browser: browser.version(), model_load_ms: +out.loadMs.toFixed(1),
    greedy_check: { got: out.check, pass: out.check === lp.greedy_check.expect_text },
    prefill_tok_s_median: med("prefill_tok_s"), decode_tok_s_median: med("decode_tok_s"), runs: out.runs,
  }, null, 1));
} finally {
  await browser.close();
  server.close();
}
