// The npm package's Lorag facade (pkg/npm, from scripts/build-npm) as a Node user meets it: models loaded from
// URLs served on 127.0.0.1 (with progress, integrity checks and the typed failures of a bad URL), documents
// added, searched, asked (streamed, abortable), adapters loaded, the pack saved atomically and reopened, calls
// after dispose refused. Run by scripts/test.
import http from "node:http";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import assert from "node:assert/strict";

const root = new URL("../../", import.meta.url);
const { Lorag, LoragError } = await import(new URL("pkg/npm/node.js", root).href);
const read = (p) => readFileSync(new URL(p, root));

// A static server over models/ and ../shared/reference, plus routes that misbehave.
const server = http.createServer((req, res) => {
  const url = decodeURIComponent(req.url);
  if (url.startsWith("/html/")) {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end("<!doctype html><title>Sign in</title>");
  }
  const file = url.startsWith("/reference/")
    ? new URL("../shared/reference/" + url.slice("/reference/".length), root)
    : new URL("models/" + url.slice(1), root);
  try {
    const body = readFileSync(file);
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": body.length });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;

let passed = 0;
const test = async (name, fn) => {
  const t0 = performance.now();
  await fn();
  passed++;
  console.log(`ok - ${name} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
};

const embedderSpec = { url: `${base}/all-MiniLM-L6-v2-int8/` };
const generator = `${base}/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`;
const docs = ["handbook.md", "safety.html", "faq.txt", "courses.pdf"].map((id) => ({ id, bytes: read(`examples/docs/${id}`) }));
const dir = mkdtempSync(path.join(tmpdir(), "lorag-"));

let rag;
await test("create from URLs with progress; add the examples; search", async () => {
  const events = [];
  rag = await Lorag.create({ embedder: embedderSpec, generator, device: "auto", storage: { dir }, onProgress: (e) => events.push(e) });
  const downloads = events.filter((e) => e.stage === "download");
  // Every required file arrives whole: its last event has loaded = total = the file's size.
  for (const [url, file] of [
    [`${base}/all-MiniLM-L6-v2-int8/model.onnx`, "models/all-MiniLM-L6-v2-int8/model.onnx"],
    [generator, "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"],
  ]) {
    const last = downloads.filter((e) => e.url === url).at(-1);
    assert.equal(last.loaded, read(file).length);
    assert.equal(last.total, last.loaded);
  }
  assert.equal(events.find((e) => e.stage === "device").kind, "cpu"); // Node: no WebGPU
  const indexed = [];
  const stats = await rag.add(docs, { onProgress: (e) => indexed.push(e.done) });
  assert.deepEqual(indexed, [1, 2, 3, 4]);
  assert.equal(stats.documents, 4);
  assert.equal(stats.failed.length, 0);
  assert.equal(rag.stats.chunks, stats.embedded);
  // Adding the same documents again embeds nothing.
  const again = await rag.add(docs);
  assert.equal(again.embedded, 0);
  assert.equal(again.kept, stats.embedded);
  const hits = rag.search("Where is the nearest defibrillator?", { k: 2 });
  assert.equal(hits[0].chunk.doc_id, "safety.html");
  assert.ok(hits[0].chunk.text.includes("pharmacy at 9 Harbor Lane"));
  // A broken document is reported, the rest still go in.
  const mixed = await rag.add([{ id: "bad.pdf", bytes: new Uint8Array([37, 80, 68, 70, 0]) }, { id: "note.txt", text: "The bike rack is behind the building." }]);
  assert.equal(mixed.documents, 1);
  assert.equal(mixed.failed[0].id, "bad.pdf");
  assert.ok(mixed.failed[0].error instanceof Error && mixed.failed[0].error.code === "Malformed", mixed.failed[0].error.code);
  assert.equal(rag.remove("note.txt"), 1);
});

await test("ask streams tokens then the answer with its sources", async () => {
  let text = "";
  let answer;
  for await (const ev of rag.ask("How much does a replacement key fob cost?", { k: 2, maxTokens: 8 })) {
    if (ev.type === "token") text += ev.text;
    else answer = ev.answer;
  }
  assert.equal(text.trim(), answer.text);
  assert.ok(answer.answerTokens > 0 && answer.answerTokens <= 8);
  const gold = answer.sources.find((s) => s.docId === "faq.txt");
  assert.ok(gold && gold.text.includes("A replacement fob costs 10 euros."));
  // Two asks at once are served one after the other, each complete (base mode: short prompts, quick in the debug
  // build the tests use).
  const collect = async (q) => {
    let a;
    for await (const ev of rag.ask(q, { mode: "base", maxTokens: 4 })) if (ev.type === "answer") a = ev.answer;
    return a;
  };
  const [x, y] = await Promise.all([collect("Can I bring a guest?"), collect("Is there parking?")]);
  assert.equal(x.question, "Can I bring a guest?");
  assert.equal(y.question, "Is there parking?");
});

await test("abort: an AbortSignal or leaving the loop stops generation", async () => {
  const ctl = new AbortController();
  let n = 0;
  let answer;
  for await (const ev of rag.ask("What should I do if there is a fire?", { mode: "base", maxTokens: 32, signal: ctl.signal })) {
    if (ev.type === "token" && ++n === 3) ctl.abort();
    if (ev.type === "answer") answer = ev.answer;
  }
  assert.equal(answer.stopReason.kind, "aborted");
  // The abort lands within one token: the loop sees token 3 while token 4 may already be computed.
  assert.ok(answer.answerTokens >= 3 && answer.answerTokens <= 4, `${answer.answerTokens}`);
  for await (const ev of rag.ask("What should I do if there is a fire?", { mode: "base", maxTokens: 32 })) {
    if (ev.type === "token") break; // leaving early must not wedge the next request
  }
  // The next request is served (the abandoned one was stopped, not left holding the generator).
  for await (const ev of rag.ask("Is there parking?", { mode: "base", maxTokens: 2 })) if (ev.type === "answer") assert.ok(ev.answer.answerTokens <= 2);
});

await test("adapters from URLs: PEFT and GGUF-LoRA; hybrid mode; typed refusals", async () => {
  const info = await rag.loadAdapter("peft", { url: `${base}/reference/lora-synthetic-smollm2`, peft: true });
  assert.deepEqual(info.targets, ["q", "v"]);
  await rag.loadAdapter("gguf", `${base}/reference/lora-synthetic-smollm2/smollm2-135m-synthetic-lora-f32.gguf`);
  assert.deepEqual(rag.adapters.map((a) => a.name).sort(), ["gguf", "peft"]);
  let answer;
  for await (const ev of rag.ask("Can I bring a guest?", { mode: "hybrid", k: 1, adapters: [{ name: "peft" }], maxTokens: 2 })) if (ev.type === "answer") answer = ev.answer;
  assert.deepEqual(answer.adapters, [{ name: "peft", weight: 1 }]);
  assert.ok(answer.sources.length > 0);
  await assert.rejects(async () => {
    for await (const _ of rag.ask("q", { mode: "finetuned" }));
  }, (e) => e instanceof LoragError || e.code === "Config");
  await assert.rejects(rag.loadAdapter("x", `${base}/reference/nope.gguf`), (e) => e.code === "Download");
  await assert.rejects(rag.loadAdapter("x", new Uint8Array([1, 2, 3])), (e) => e.code === "Adapter");
  assert.equal(rag.removeAdapter("gguf"), true);
});

await test("train an adapter: progress, abort, resume to the same weights, loaded at once; bad data refused", async () => {
  // Six short examples teaching a sign-off: 1 held out, 5 trained in steps of 2 (3 steps, one epoch).
  const examples = ["kites", "knots", "glue", "saws", "yarn", "clay"].map((t) => ({
    system: "Be brief.",
    prompt: `One tip about ${t}?`,
    response: `Go slowly with ${t}. — Harbor Lane`,
  }));
  const lora = { rank: 4, seed: 3 };
  const config = { lr: 1e-3, epochs: 1, batchSize: 2, evalFraction: 0.2, seed: 2 };
  const run = async (opts, stopAfter) => {
    const progress = [];
    let done;
    const ctl = new AbortController();
    for await (const ev of rag.train(examples, { lora, config, ...opts, signal: ctl.signal })) {
      if (ev.type === "progress") {
        progress.push(ev);
        if (progress.length === stopAfter) ctl.abort();
      } else done = ev;
    }
    return { progress, done };
  };
  const whole = await run({ name: "whole" });
  assert.deepEqual(whole.progress.map((p) => p.step), [1, 2, 3]);
  for (const p of whole.progress) {
    assert.equal(p.totalSteps, 3);
    assert.ok(Number.isFinite(p.loss) && p.loss > 0 && p.gradNorm > 0 && p.tokensPerS > 0, JSON.stringify(p));
  }
  assert.ok(whole.progress[2].evalLoss > 0, "held-out loss at the end of the epoch");
  assert.equal(whole.done.aborted, false);
  assert.equal(whole.done.info.done, true);
  const cfg = JSON.parse(whole.done.adapter.config);
  assert.equal(cfg.r, 4);
  assert.deepEqual(cfg.target_modules, ["q_proj", "v_proj"]);
  // Stopped after one step, then resumed from the checkpoint: the same adapter, byte for byte.
  const first = await run({ name: "resumed" }, 1);
  assert.deepEqual(first.progress.map((p) => p.step), [1]);
  assert.equal(first.done.aborted, true);
  const rest = await run({ name: "resumed", resume: first.done.checkpoint });
  assert.deepEqual(rest.progress.map((p) => p.step), [2, 3]);
  assert.deepEqual(Buffer.from(rest.done.adapter.weights), Buffer.from(whole.done.adapter.weights));
  // Loaded at once: listed, and used by ask.
  const names = rag.adapters.map((a) => a.name);
  assert.ok(names.includes("whole") && names.includes("resumed"), names.join());
  let answer;
  for await (const ev of rag.ask("Any tip about kites?", { mode: "hybrid", k: 1, adapters: [{ name: "whole" }], maxTokens: 2 })) if (ev.type === "answer") answer = ev.answer;
  assert.deepEqual(answer.adapters, [{ name: "whole", weight: 1 }]);
  // Bad data: a typed error naming the line; nothing loaded under that name.
  await assert.rejects(async () => {
    for await (const _ of rag.train('{"prompt": "a", "response": "b"}\nnot json', { name: "bad" }));
  }, (e) => e.name === "LoragError" && e.code === "Config" && /line 2/.test(e.message));
  assert.ok(!rag.adapters.some((a) => a.name === "bad"));
  rag.removeAdapter("whole");
  rag.removeAdapter("resumed");
});

await test("save atomically, reopen, same results; a corrupt pack is refused", async () => {
  const before = rag.search("laser cutter induction", { k: 3 }).map((h) => h.chunk.id);
  const saved = await rag.save("makerspace");
  assert.ok(saved.bytes > 1000);
  assert.deepEqual(readdirSync(dir), ["makerspace.lorag"]); // no temp file left behind
  const again = await Lorag.open("makerspace", { embedder: embedderSpec, storage: { dir } });
  assert.deepEqual(again.search("laser cutter induction", { k: 3 }).map((h) => h.chunk.id), before);
  assert.equal(again.stats.chunks, rag.stats.chunks);
  again.dispose();
  const bytes = readFileSync(path.join(dir, "makerspace.lorag"));
  bytes[bytes.length - 10] ^= 0xff;
  writeFileSync(path.join(dir, "broken.lorag"), bytes);
  await assert.rejects(Lorag.open("broken", { embedder: embedderSpec, storage: { dir } }), (e) => e.code === "Checksum");
  await assert.rejects(Lorag.open("absent", { embedder: embedderSpec, storage: { dir } }), (e) => e.code === "NotFound");
  await assert.rejects(rag.save("../escape"), (e) => e.code === "Config");
});

await test("bad model URLs and bytes: typed errors, nothing half-loaded", async () => {
  await assert.rejects(Lorag.create({ embedder: { url: `${base}/nothing-here/` } }), (e) => e.code === "Download" && /404/.test(e.message));
  await assert.rejects(Lorag.create({ embedder: { url: `${base}/html/x/` } }), (e) => e.code === "Download" && /HTML/.test(e.message));
  const onnx = read("models/all-MiniLM-L6-v2-int8/model.onnx");
  const good = createHash("sha256").update(onnx).digest("hex");
  await assert.rejects(
    Lorag.create({ embedder: { ...embedderSpec, sha256: { model_onnx: good.replace(/^./, (c) => (c === "0" ? "1" : "0")) } } }),
    (e) => e.code === "Integrity",
  );
  const ok = await Lorag.create({ embedder: { ...embedderSpec, sha256: { model_onnx: good } } });
  ok.dispose();
  await assert.rejects(Lorag.create({ embedder: embedderSpec, generator: new Uint8Array([71, 71, 85, 70, 3, 0]) }), (e) => e.code === "Model");
  await assert.rejects(Lorag.create({}), (e) => e.code === "Config");
});

await test("a trap in wasm: Crashed, then a restart on a fresh instance with nothing lost", async () => {
  const before = rag.search("laser cutter induction", { k: 3 }).map((h) => h.chunk.id);
  const { chunks, documents } = rag.stats;
  const adapters = rag.adapters.map((a) => a.name);
  assert.throws(() => rag._trapForTests(), (e) => e.code === "Crashed" && e.cause instanceof WebAssembly.RuntimeError);
  assert.throws(() => rag.search("x"), (e) => e.code === "Restarting");
  await rag.ready;
  assert.deepEqual(rag.search("laser cutter induction", { k: 3 }).map((h) => h.chunk.id), before);
  assert.deepEqual([rag.stats.chunks, rag.stats.documents], [chunks, documents]);
  assert.deepEqual(rag.adapters.map((a) => a.name), adapters);
  // The new instance answers, adds and removes.
  let answer;
  for await (const ev of rag.ask("Can I bring a guest?", { k: 1, adapters: [{ name: "peft" }], mode: "hybrid", maxTokens: 2 })) if (ev.type === "answer") answer = ev.answer;
  assert.ok(answer.sources.length === 1 && answer.answerTokens > 0);
  assert.equal((await rag.add({ id: "note.txt", text: "The bike rack is behind the building." })).documents, 1);
  // A second trap restarts from the latest completed change (the note is there).
  assert.throws(() => rag._trapForTests(), (e) => e.code === "Crashed");
  await rag.ready;
  assert.equal(rag.search("bike rack", { k: 1, mode: "bm25" })[0].chunk.doc_id, "note.txt");
  assert.equal(rag.remove("note.txt"), 1);
  // With recovery off a trap is final, and says so.
  const fragile = await Lorag.create({ embedder: embedderSpec, recover: false });
  assert.throws(() => fragile._trapForTests(), (e) => e.code === "Crashed" && /recovery is off/.test(e.message));
  assert.throws(() => fragile.search("x"), (e) => e.code === "Crashed");
  await assert.rejects(fragile.ready, (e) => e.code === "Crashed");
  fragile.dispose();
});

await test("dispose: every later call is refused with Disposed", async () => {
  rag.dispose();
  rag.dispose(); // twice is fine
  assert.throws(() => rag.search("x"), (e) => e.code === "Disposed");
  assert.throws(() => rag.toBytes(), (e) => e.code === "Disposed");
  await assert.rejects(rag.add(docs), (e) => e.code === "Disposed");
  await assert.rejects(rag.save(), (e) => e.code === "Disposed");
  await assert.rejects(async () => {
    for await (const _ of rag.ask("x"));
  }, (e) => e.code === "Disposed");
});

server.close();
console.log(`${passed} Lorag package tests passed`);
