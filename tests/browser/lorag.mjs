// The npm package in real headless Chromium (playwright-core, /usr/bin/chromium), pages on 127.0.0.1 under a
// strict CSP: LoragWorker (lorag/worker) drives a module Worker that downloads the models over HTTP, indexes the
// bundled documents, searches and answers (streamed to the page while its main thread keeps running), aborts,
// trains a LoRA adapter (progress streamed, stopped from the page, then used),
// passes typed errors back, and saves / reopens the pack in OPFS. Needs scripts/build-npm [--dev]. Run by
// scripts/test.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { serve } from "./serve.mjs";

const root = new URL("../../", import.meta.url).pathname;
const { server, origin } = await serve(root);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  await page.goto(`${origin}/tests/browser/lorag.html`);
  const out = await page.evaluate(() => window.run("dedicated"));
  assert.ok(out.ok, out.error);
  assert.ok(out.progress.includes("download") && out.progress.includes("device"), out.progress.join());
  assert.equal(out.added.documents, 4);
  assert.equal(out.added.failed.length, 0);
  assert.match(out.hits[0], /^safety\.html#/);
  const tokens = out.events.filter((e) => e.type === "token");
  const answer = out.events.at(-1).answer;
  assert.equal(out.events.at(-1).type, "answer");
  assert.ok(tokens.length > 0);
  assert.equal(tokens.map((t) => t.text).join("").trim(), answer.text);
  assert.ok(answer.sources.some((s) => s.docId === "faq.txt" && s.text.includes("A replacement fob costs 10 euros.")));
  // The page's timer kept firing while the worker generated: the main thread was free.
  assert.ok(tokens.at(-1).ticks > tokens[0].ticks, `ticks ${tokens[0].ticks} → ${tokens.at(-1).ticks}`);
  assert.equal(out.aborted.stopReason.kind, "aborted");
  // Stopped, not run to its 32 tokens: the abort crosses to the worker while a token or two more are in flight.
  assert.ok(out.aborted.answerTokens >= 2 && out.aborted.answerTokens < 32, `${out.aborted.answerTokens}`);
  // Training in the worker: stopped from the page at the first progress event, which reaches the worker within
  // a step or two (the abort crosses while the next step runs); the page stayed responsive.
  const steps = out.training.map((t) => t.step);
  assert.ok(steps.length <= 2 && steps.every((s, i) => s === i + 1), steps.join());
  assert.ok(out.training.every((t) => t.totalSteps === 6 && t.loss > 0));
  assert.equal(out.trained.aborted, true);
  assert.equal(out.trained.step, steps.length);
  assert.equal(out.trained.config.r, 2);
  assert.ok(out.trained.weightBytes > 0 && out.trained.checkpointBytes > out.trained.weightBytes);
  assert.ok(out.trained.ticks > 0, "the page's timer fired while the worker trained");
  assert.deepEqual(out.trainedAnswerAdapters, [{ name: "signoff", weight: 1 }]);
  assert.deepEqual(out.error, { name: "LoragError", code: "Config" });
  assert.ok(out.saved.bytes > 1000);
  assert.deepEqual(out.reopenedHits, out.hits);
  assert.equal(out.missing, "NotFound");
  assert.equal(out.afterDispose, "Disposed");
  // Two tabs on one SharedWorker at the same time: both served, each with its own knowledge base.
  const second = await browser.newPage();
  second.on("pageerror", (e) => errors.push(String(e)));
  await second.goto(`${origin}/tests/browser/lorag.html`);
  const [a, b] = await Promise.all([
    page.evaluate(() => window.runShared("Where is the nearest defibrillator?")),
    second.evaluate(() => window.runShared("Is there parking? Where is the public garage?")),
  ]);
  assert.ok(a.ok, a.error);
  assert.ok(b.ok, b.error);
  assert.deepEqual([a.added, b.added], [[1, 1, 1, 1], [1, 1, 1, 1]]);
  assert.match(a.hits[0], /^safety\.html#/);
  assert.match(b.hits[0], /^faq\.txt#/);
  // Packs in IndexedDB: saved whole, found under the key, reopened with the same hits.
  const idb = await page.evaluate(() => window.runIdb());
  assert.ok(idb.ok, idb.error);
  assert.match(idb.hits[0], /^safety\.html#/);
  assert.deepEqual(idb.reopened, idb.hits);
  assert.equal(idb.stored, idb.saved.bytes);
  assert.equal(idb.missing, "NotFound");
  // An interrupted save (OPFS stream cut off half-way, IndexedDB transaction aborted) is a typed error and leaves
  // the previous pack: reopened, it has its one document and its search hit.
  const atomic = await page.evaluate(() => window.runAtomic());
  assert.ok(atomic.ok, atomic.error);
  for (const backend of ["opfs", "indexeddb"]) {
    const r = atomic[backend];
    assert.match(r.failed ?? "", /^Storage: /, `${backend}: ${r.failed}`);
    assert.match(r.changed[0], /^safety\.html#/, backend); // the unsaved state differs from the saved one
    assert.deepEqual(r.docs, ["faq.txt"], backend);
    assert.deepEqual(r.reopened, r.hits, backend);
  }
  // A trap on the page: Crashed, Restarting meanwhile, then a fresh instance with nothing lost, twice.
  const logged = errors.length;
  const trap = await page.evaluate(() => window.runTrap());
  assert.ok(trap.ok, trap.error);
  // The panic hook logs each deliberate trap to the console; nothing else may appear.
  assert.deepEqual(errors.splice(logged).filter((e) => !/deliberate trap/.test(e)), []);
  assert.deepEqual(trap.codes, ["Crashed", "Restarting", "Crashed"]);
  assert.match(trap.before[0], /^safety\.html#/);
  assert.deepEqual(trap.after, trap.before);
  assert.equal(trap.note, "note.txt");
  assert.equal(trap.documents, 3);
  assert.equal(trap.restarted, 2);
  assert.deepEqual(errors, []);
  console.log(
    `ok - the npm package in a Worker in ${browser.version()}: models over HTTP (${(out.createMs / 1000).toFixed(1)} s), ` +
      `4 documents, search, ${tokens.length} streamed tokens, abort, a LoRA training step (stopped from the page), typed errors, OPFS and IndexedDB save and reopen, an interrupted save leaving the previous pack in both, a trap restarting with nothing lost; two tabs on one SharedWorker`,
  );
} finally {
  await browser.close();
  server.close();
}
