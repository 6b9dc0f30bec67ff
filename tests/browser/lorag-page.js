// The page side of tests/browser/lorag.mjs: the npm package's LoragWorker driving pkg/npm/worker.js in a module
// Worker (or a SharedWorker), exposed to the test driver as window.run(kind).
import { LoragWorker } from "/pkg/npm/worker-client.js";

const origin = location.origin;
const docs = ["handbook.md", "safety.html", "faq.txt", "courses.pdf"];

window.run = async (kind) => {
  const out = { progress: [], events: [] };
  try {
    const worker = kind === "shared" ? new SharedWorker("/pkg/npm/worker.js", { type: "module", name: "lorag" }) : new Worker("/pkg/npm/worker.js", { type: "module" });
    const t0 = performance.now();
    const rag = await LoragWorker.create(
      {
        embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` },
        generator: `${origin}/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`,
        device: "cpu",
        cache: kind !== "nocache",
        onProgress: (ev) => out.progress.push(ev.stage),
      },
      { worker },
    );
    out.createMs = performance.now() - t0;
    const bytes = await Promise.all(docs.map(async (id) => ({ id, bytes: new Uint8Array(await (await fetch(`/examples/docs/${id}`)).arrayBuffer()) })));
    out.added = await rag.add(bytes);
    out.hits = (await rag.search("Where is the nearest defibrillator?", { k: 2 })).map((h) => h.chunk.id);
    // Streamed: the page's main thread keeps running while the worker generates.
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    for await (const ev of rag.ask("How much does a replacement key fob cost?", { k: 2, maxTokens: 8 })) {
      out.events.push(ev.type === "token" ? { type: "token", text: ev.text, ticks } : { type: "answer", answer: ev.answer });
    }
    clearInterval(timer);
    // Abort from the page.
    const ctl = new AbortController();
    let n = 0;
    for await (const ev of rag.ask("What should I do if there is a fire?", { mode: "base", maxTokens: 32, signal: ctl.signal })) {
      if (ev.type === "token" && ++n === 2) ctl.abort();
      if (ev.type === "answer") out.aborted = ev.answer;
    }
    // Training in the worker: progress streamed to the page (whose timer keeps firing), stopped from the page
    // after the first step, the adapter so far loaded in the worker and used by ask.
    const examples = ["kites", "knots", "glue", "saws", "yarn", "clay"].map((t) => ({ system: "Be brief.", prompt: `A tip about ${t}?`, response: `Go slowly. — Harbor Lane` }));
    const tctl = new AbortController();
    ticks = 0;
    const ttimer = setInterval(() => ticks++, 5);
    out.training = [];
    for await (const ev of rag.train(examples, { name: "signoff", lora: { rank: 2 }, config: { lr: 1e-3, epochs: 1, batchSize: 1, evalFraction: 0 }, signal: tctl.signal })) {
      if (ev.type === "progress") {
        out.training.push({ step: ev.step, totalSteps: ev.totalSteps, loss: ev.loss, ticks });
        tctl.abort();
      } else out.trained = { aborted: ev.aborted, step: ev.info.step, config: JSON.parse(ev.adapter.config), weightBytes: ev.adapter.weights.byteLength, checkpointBytes: ev.checkpoint.byteLength, ticks };
    }
    clearInterval(ttimer);
    for await (const ev of rag.ask("A tip about clay?", { mode: "hybrid", k: 1, adapters: [{ name: "signoff" }], maxTokens: 2 })) {
      if (ev.type === "answer") out.trainedAnswerAdapters = ev.answer.adapters;
    }
    // Typed errors cross the worker boundary.
    try {
      for await (const _ of rag.ask("q", { mode: "finetuned" }));
    } catch (e) {
      out.error = { name: e.name, code: e.code };
    }
    // OPFS: save atomically, reopen in the worker, same search.
    out.saved = await rag.save("makerspace");
    const again = await LoragWorker.open("makerspace", { embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` } }, { worker });
    out.reopenedHits = (await again.search("Where is the nearest defibrillator?", { k: 2 })).map((h) => h.chunk.id);
    await again.dispose();
    try {
      await LoragWorker.open("absent", { embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` } }, { worker });
    } catch (e) {
      out.missing = e.code;
    }
    await rag.dispose();
    try {
      await rag.search("x");
    } catch (e) {
      out.afterDispose = e.code;
    }
    out.ok = true;
  } catch (e) {
    out.ok = false;
    out.error = `${e.code ?? e.name}: ${e.message}`;
  }
  return out;
};

// Several tabs, one SharedWorker: each page gets its own Lorag in the same worker; requests are served in order.
window.runShared = async (question) => {
  try {
    const worker = new SharedWorker("/pkg/npm/worker.js", { type: "module", name: "lorag-shared" });
    const rag = await LoragWorker.create({ embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false }, { worker });
    const added = [];
    for (const id of docs) {
      const bytes = new Uint8Array(await (await fetch(`/examples/docs/${id}`)).arrayBuffer());
      added.push((await rag.add([{ id, bytes }])).documents);
    }
    const hits = (await rag.search(question, { k: 1, mode: "exact" })).map((h) => h.chunk.id);
    await rag.dispose();
    return { ok: true, added, hits };
  } catch (e) {
    return { ok: false, error: `${e.code ?? e.name}: ${e.message}` };
  }
};

// Knowledge packs in IndexedDB (where OPFS cannot write): saved in the worker, found by the page in the "lorag"
// database, reopened with the same results; a missing pack is NotFound.
window.runIdb = async () => {
  try {
    const worker = new Worker("/pkg/npm/worker.js", { type: "module" });
    const spec = { embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false, storage: { backend: "indexeddb", dir: "tests" } };
    const rag = await LoragWorker.create(spec, { worker });
    const bytes = new Uint8Array(await (await fetch("/examples/docs/safety.html")).arrayBuffer());
    await rag.add([{ id: "safety.html", bytes }]);
    const q = "Where is the nearest defibrillator?";
    const hits = (await rag.search(q, { k: 2 })).map((h) => h.chunk.id);
    const saved = await rag.save("idbpack");
    const again = await LoragWorker.open("idbpack", spec, { worker });
    const reopened = (await again.search(q, { k: 2 })).map((h) => h.chunk.id);
    let missing;
    try {
      await LoragWorker.open("absent", spec, { worker });
    } catch (e) {
      missing = e.code;
    }
    const stored = await new Promise((resolve, reject) => {
      const req = indexedDB.open("lorag");
      req.onsuccess = () => {
        const get = req.result.transaction("packs").objectStore("packs").get("tests/idbpack");
        get.onsuccess = () => (resolve(get.result?.byteLength ?? null), req.result.close());
        get.onerror = () => reject(get.error);
      };
      req.onerror = () => reject(req.error);
    });
    await again.dispose();
    await rag.dispose();
    worker.terminate();
    return { ok: true, hits, reopened, saved, missing, stored };
  } catch (e) {
    return { ok: false, error: `${e.code ?? e.name}: ${e.message}` };
  }
};

// An interrupted save leaves the previous pack, in OPFS and in IndexedDB: the npm package's browser entry on this
// page (not the Worker, so the page can break the storage calls it makes). A pack with faq.txt is saved; then
// safety.html is added and a second save is cut off half-way: OPFS's writable stream takes half the bytes and then
// fails (as when a tab dies mid-write), IndexedDB's transaction is aborted after the put. The save must fail with a
// typed error, and reopening must give the first pack: its documents and its search hits.
function interrupt(backend) {
  if (backend === "opfs") {
    const proto = FileSystemWritableFileStream.prototype;
    const write = proto.write;
    proto.write = async function (data) {
      await write.call(this, data.slice(0, data.byteLength >> 1));
      throw new DOMException("simulated crash half-way through the save", "UnknownError");
    };
    return () => (proto.write = write);
  }
  const proto = IDBObjectStore.prototype;
  const put = proto.put;
  proto.put = function (...args) {
    const req = put.apply(this, args);
    this.transaction.abort();
    return req;
  };
  return () => (proto.put = put);
}

const doc = async (id) => ({ id, bytes: new Uint8Array(await (await fetch(`/examples/docs/${id}`)).arrayBuffer()) });

window.runAtomic = async () => {
  const { Lorag } = await import("/pkg/npm/web.js");
  const q = "Where is the nearest defibrillator?";
  const out = {};
  try {
    for (const backend of ["opfs", "indexeddb"]) {
      const spec = { embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false, storage: { backend, dir: "atomic" } };
      const rag = await Lorag.create(spec);
      await rag.add([await doc("faq.txt")]);
      const hits = (await rag.search(q, { k: 1 })).map((h) => h.chunk.id);
      const first = await rag.save("pack");
      await rag.add([await doc("safety.html")]);
      const changed = (await rag.search(q, { k: 1 })).map((h) => h.chunk.id);
      const restore = interrupt(backend);
      let failed;
      try {
        await rag.save("pack");
      } catch (e) {
        failed = `${e.code}: ${e.message}`;
      } finally {
        restore();
      }
      const again = await Lorag.open("pack", spec);
      out[backend] = {
        first: first.bytes,
        failed,
        hits,
        changed,
        reopened: (await again.search(q, { k: 1 })).map((h) => h.chunk.id),
        docs: (await again.documents()).map((d) => d.id),
      };
      await again.dispose();
      await rag.dispose();
    }
    return { ok: true, ...out };
  } catch (e) {
    return { ok: false, error: `${e.code ?? e.name}: ${e.message}` };
  }
};

// A trap in wasm on a page (the package's browser entry, unbundled): the call that trapped throws Crashed, calls
// meanwhile throw Restarting, and after `ready` a fresh instance has the knowledge base as of the last completed
// change: the same hits, and a document added after the restart survives a second trap.
window.runTrap = async () => {
  const { Lorag } = await import("/pkg/npm/web.js");
  const codes = [];
  const code = (f) => {
    try {
      f();
      codes.push("none");
    } catch (e) {
      codes.push(e.code);
    }
  };
  try {
    const events = [];
    const rag = await Lorag.create({ embedder: { url: `${origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false, onProgress: (ev) => events.push(ev.stage) });
    await rag.add([await doc("safety.html"), await doc("faq.txt")]);
    const q = "Where is the nearest defibrillator?";
    const before = rag.search(q, { k: 3 }).map((h) => h.chunk.id);
    code(() => rag._trapForTests());
    code(() => rag.search(q));
    await rag.ready;
    const after = rag.search(q, { k: 3 }).map((h) => h.chunk.id);
    await rag.add({ id: "note.txt", text: "The bike rack is behind the building." });
    code(() => rag._trapForTests());
    await rag.ready;
    const note = rag.search("bike rack", { k: 1, mode: "bm25" })[0]?.chunk.doc_id;
    const stats = rag.stats;
    rag.dispose();
    return { ok: true, codes, before, after, note, documents: stats.documents, restarted: events.filter((e) => e === "restarted").length };
  } catch (e) {
    return { ok: false, error: `${e.code ?? e.name}: ${e.message}` };
  }
};
