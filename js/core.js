// The `Lorag` facade: one object that loads the models (from URLs or bytes), ingests documents, searches and
// answers, over the wasm bindings. Platform entry points (node.js, web.js) hand it the bindings and a storage.
//
// Errors are `LoragError`s with a `code`: the crate's codes (Config, NotFound, Model, …) plus Download,
// Integrity, Storage, Quota, Disposed, Crashed and Restarting from this layer.
//
// A trap in wasm (a panic, an out-of-bounds access) leaves that wasm instance unusable: whatever Rust was doing
// stopped half-way. The call that trapped throws `Crashed`; the Lorag then loads a fresh instance of the module
// and rebuilds itself there from what it was made of (the model files again, from the Cache API or their URLs
// or the bytes given; the adapters loaded; the knowledge base as of the last completed add/remove, which it
// keeps a snapshot of). Calls meanwhile throw `Restarting`; `await rag.ready` waits for the restart.

export class LoragError extends Error {
  constructor(code, message, options) {
    super(message, options);
    this.name = "LoragError";
    this.code = code;
  }
}

/// A knowledge pack's name as storage uses it: 1-128 letters, digits, '.', '_' or '-', not starting with '.'.
export function packName(name) {
  if (typeof name !== "string" || !/^[\w.-]{1,128}$/.test(name) || name.startsWith(".")) {
    throw new LoragError("Config", `pack name ${JSON.stringify(name)}: 1-128 letters, digits, '.', '_' or '-'`);
  }
  return name;
}

const isTrap = (e) => e instanceof WebAssembly.RuntimeError;

const wrap = (e) => (e instanceof Error && e.name === "LoragError" ? e : new LoragError("Internal", String(e?.message ?? e), { cause: e }));

// The files of a sentence-transformers folder: binding name → path in the folder, required or not.
const EMBEDDER_FILES = [
  ["model_onnx", "model.onnx", true],
  ["tokenizer_json", "tokenizer.json", true],
  ["config_json", "config.json", false],
  ["pooling_config_json", "1_Pooling/config.json", false],
  ["sentence_bert_config_json", "sentence_bert_config.json", false],
  ["modules_json", "modules.json", false],
];

const hex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");

/// Download `url` completely (with progress), check it, and only then hand it back (and cache it).
async function download(url, { onProgress, sha256, optional = false, cache, kind = "model file" } = {}) {
  const cached = cache ? await cache.match(url).catch(() => undefined) : undefined;
  if (cached) {
    const bytes = new Uint8Array(await cached.arrayBuffer());
    if (!sha256 || hex(await crypto.subtle.digest("SHA-256", bytes)) === sha256) {
      onProgress?.({ stage: "download", url, loaded: bytes.length, total: bytes.length, cached: true });
      return bytes;
    }
    await cache.delete(url); // a corrupt entry is never used
  }
  let res;
  try {
    res = await fetch(url);
  } catch (e) {
    throw new LoragError("Download", `${url}: ${e.message}`, { cause: e });
  }
  if (res.status === 404 && optional) return undefined;
  if (!res.ok) throw new LoragError("Download", `${url}: HTTP ${res.status} ${res.statusText}`);
  const type = res.headers.get("content-type") ?? "";
  if (type.includes("text/html")) {
    throw new LoragError("Download", `${url}: the server sent an HTML page, not the ${kind} (a login wall or a wrong URL?)`);
  }
  const total = Number(res.headers.get("content-length")) || undefined;
  const parts = [];
  let loaded = 0;
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    loaded += value.length;
    onProgress?.({ stage: "download", url, loaded, total });
  }
  if (total !== undefined && loaded !== total) {
    throw new LoragError("Download", `${url}: got ${loaded} of ${total} bytes`);
  }
  const bytes = new Uint8Array(loaded);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.length;
  }
  if (sha256) {
    const got = hex(await crypto.subtle.digest("SHA-256", bytes));
    if (got !== sha256) throw new LoragError("Integrity", `${url}: sha256 ${got}, expected ${sha256}`);
  }
  if (cache) {
    try {
      await cache.put(url, new Response(bytes, { headers: { "content-type": "application/octet-stream" } }));
    } catch (e) {
      // Quota: the model is used from memory this time; nothing half-written is left (put is atomic).
      onProgress?.({ stage: "cache", url, error: `not cached: ${e.name === "QuotaExceededError" ? "storage quota exceeded" : e.message}` });
    }
  }
  return bytes;
}

const joinUrl = (base, path) => (base.endsWith("/") ? base : base + "/") + path;

/// `source`: Uint8Array | { bytes } | { url, sha256? } | string (a URL).
async function loadOne(source, opts) {
  if (source instanceof Uint8Array) return source;
  if (source instanceof ArrayBuffer) return new Uint8Array(source);
  if (typeof source === "string") return download(source, opts);
  if (source?.bytes) return source.bytes instanceof Uint8Array ? source.bytes : new Uint8Array(source.bytes);
  if (source?.url) return download(source.url, { ...opts, sha256: source.sha256 });
  throw new LoragError("Config", `expected bytes, a URL or { url } / { bytes }, got ${typeof source}`);
}

/// The embedder's files: `{ url }` (a folder: Hugging Face `resolve/main/` URLs work), `{ files: { model_onnx,
/// tokenizer_json, … } }` (each bytes or a URL), or both (files override paths in the folder).
async function loadEmbedderFiles(spec, opts) {
  const out = {};
  for (const [key, path, required] of EMBEDDER_FILES) {
    const given = spec.files?.[key];
    if (given !== undefined) {
      out[key] = typeof given === "string" && spec.url && !/^[a-z]+:/.test(given) ? await download(joinUrl(spec.url, given), opts) : await loadOne(given, opts);
    } else if (spec.url) {
      const bytes = await download(joinUrl(spec.url, path), { ...opts, optional: !required, sha256: spec.sha256?.[key] });
      if (bytes) out[key] = bytes;
    } else if (required) {
      throw new LoragError("Config", `embedder: ${key} is missing (give { url } or files.${key})`);
    }
  }
  return out;
}

/// `loadBindings(generation)`: the wasm bindings; generation 0 the first time, then 1, 2, … for a fresh instance
/// of the module after a trap.
export function makeLorag({ loadBindings, storage }) {
  let generation = 0;
  let live; // the bindings in use
  let bindingsPromise;
  const bindings = () =>
    (bindingsPromise ??= Promise.resolve(loadBindings(0)).then((b) => (live = b)));
  // The instance `dead` trapped: a fresh one, made once however many Lorags noticed.
  const replace = async (dead) => {
    const b = await bindings();
    if (b === dead) {
      generation++;
      bindingsPromise = Promise.resolve(loadBindings(generation)).then((nb) => (live = nb));
      bindingsPromise.catch(() => (bindingsPromise = undefined));
    }
    return bindings();
  };

  // Everything a Lorag is made of on one wasm instance, from the options of `create`.
  async function build(b, opts, onProgress) {
    const cache = opts.cache === false || !globalThis.caches ? undefined : await globalThis.caches.open(opts.cacheName ?? "lorag-models-v1").catch(() => undefined);
    const dl = { onProgress, cache };
    if (!opts.embedder) throw new LoragError("Config", "create: an embedder is required ({ url } or { files })");
    const files = await loadEmbedderFiles(opts.embedder, dl);
    let embedder, chunker, kb, gen;
    try {
      embedder = new b.Embedder(files, opts.embedder.config);
      chunker = new b.Chunker(files.tokenizer_json, files.sentence_bert_config_json, opts.chunk ?? {});
      const name = opts.embedder.name ?? (opts.embedder.url ? opts.embedder.url.replace(/\/+$/, "").split("/").slice(-1)[0] : "embedder");
      const id = { name, dim: embedder.dim, hash: embedder.identity };
      kb = opts.pack ? b.KnowledgeBase.fromBytes(await loadOne(opts.pack, dl), id) : new b.KnowledgeBase(id, opts.index ?? {});
      if (opts.generator) {
        gen = new b.Generator(await loadOne(opts.generator, { ...dl, kind: "GGUF model" }));
        for (const [aname, spec] of Object.entries(opts.adapters ?? {})) {
          await loadAdapterInto(gen, aname, spec, dl);
        }
        if (opts.device) {
          const report = await gen.useDevice(opts.device);
          onProgress?.({ stage: "device", ...report });
        }
      }
      return { embedder, chunker, kb, gen };
    } catch (e) {
      for (const o of [embedder, chunker, kb, gen]) o?.free?.();
      throw e;
    }
  }

  async function loadAdapterInto(gen, name, spec, dl) {
    // spec: bytes / URL of a GGUF-LoRA, or { safetensors, config } (PEFT; each bytes or URL), or { url } of a
    // PEFT folder.
    if (spec?.safetensors || (spec?.url && spec.peft)) {
      const st = spec.safetensors ? await loadOne(spec.safetensors, dl) : await download(joinUrl(spec.url, "adapter_model.safetensors"), dl);
      const cfg = spec.config ? await loadOne(spec.config, dl) : await download(joinUrl(spec.url, "adapter_config.json"), dl);
      return gen.loadAdapter(name, st, new TextDecoder().decode(cfg));
    }
    return gen.loadAdapter(name, await loadOne(spec, dl));
  }

  class Lorag {
    #b;
    #embedder;
    #chunker;
    #kb;
    #gen;
    #name;
    #storageOpts;
    #disposed = false;
    #busy = Promise.resolve();
    #opts; // what create() was given (the pack replaced by the snapshot below)
    #adapterSpecs = new Map(); // adapters loaded after create: name → spec
    #snapshot; // the knowledge base's bytes after the last completed add/remove (when recovery is on)
    #restart = null; // the restart in progress
    #dead = null; // why this Lorag cannot be used again

    constructor(token, b, parts, opts) {
      if (token !== Lorag.#token) throw new LoragError("Config", "use Lorag.create() or Lorag.open()");
      this.#b = b;
      this.#opts = opts;
      this.#name = opts.name ?? "default";
      this.#storageOpts = opts.storage;
      this.#set(parts);
    }
    static #token = Symbol("Lorag");

    #set(parts) {
      ({ embedder: this.#embedder, chunker: this.#chunker, kb: this.#kb, gen: this.#gen } = parts);
    }

    /// `Lorag.create({ embedder, generator, adapters, device, chunk, index, cache, onProgress, pack, name,
    /// storage })`.
    /// `recover: false` turns the restart after a trap off (no knowledge-base snapshots are kept; a trap then
    /// leaves the Lorag unusable, every call throwing `Crashed`).
    static async create(opts = {}) {
      const b = await bindings();
      let parts;
      try {
        parts = await build(b, opts, opts.onProgress);
      } catch (e) {
        throw wrap(e);
      }
      const rag = new Lorag(Lorag.#token, b, parts, { ...opts });
      if (opts.pack && opts.recover !== false) {
        rag.#snapshot = opts.pack instanceof Uint8Array ? opts.pack : rag.#kb.toBytes();
      }
      return rag;
    }

    /// Reopen a saved knowledge pack: `Lorag.open(name, opts)` reads it from the storage, then as `create`.
    static async open(name, opts = {}) {
      if (!storage) throw new LoragError("Config", "no storage on this platform: pass the pack bytes as create({ pack })");
      const bytes = await storage.read(name, opts.storage);  // a missing pack is NotFound
      return Lorag.create({ ...opts, pack: bytes, name });
    }

    #check() {
      if (this.#disposed) throw new LoragError("Disposed", "this Lorag was disposed");
      if (this.#dead) throw this.#dead;
      if (this.#restart) throw new LoragError("Restarting", "the wasm engine is restarting after a trap: await rag.ready, then retry");
    }

    /// Resolves when the Lorag can be used (at once, unless it is restarting after a trap); rejects with
    /// `Crashed` when it cannot be used again.
    get ready() {
      if (this.#dead) return Promise.reject(this.#dead);
      return this.#restart ?? Promise.resolve();
    }

    /// The error to throw for `e`; a trap also starts the restart.
    #failed(e) {
      if (!isTrap(e)) return wrap(e);
      if (this.#dead || this.#restart) return new LoragError("Crashed", `the wasm engine trapped: ${e.message}`, { cause: e });
      const recover = this.#opts.recover !== false;
      const err = new LoragError(
        "Crashed",
        `the wasm engine trapped (${e.message}); ` +
          (recover
            ? "it is restarting with the models, adapters and knowledge base as of the last completed call: await rag.ready, then retry"
            : "recovery is off (create({ recover: false })): this Lorag cannot be used again"),
        { cause: e },
      );
      if (!recover) {
        this.#dead = err;
        return err;
      }
      const dead = this.#b;
      // The trapped instance's objects are not freed: freeing runs code in the instance that just trapped. The
      // whole instance goes when nothing refers to it.
      this.#set({});
      this.#restart = (async () => {
        try {
          const b = await replace(dead);
          const opts = { ...this.#opts, pack: this.#snapshot, adapters: { ...(this.#opts.adapters ?? {}), ...Object.fromEntries(this.#adapterSpecs) } };
          const parts = await build(b, opts, undefined);
          if (this.#disposed) {
            for (const o of Object.values(parts)) o?.free?.();
          } else {
            this.#b = b;
            this.#set(parts);
          }
          this.#opts.onProgress?.({ stage: "restarted", cause: e.message });
        } catch (e2) {
          this.#dead = new LoragError("Crashed", `the wasm engine trapped and could not be restarted: ${e2.message}`, { cause: e2 });
          throw this.#dead;
        } finally {
          this.#restart = null;
        }
      })();
      this.#restart.catch(() => {});
      return err;
    }

    /// `fn()` with errors wrapped and traps handled.
    #run(fn) {
      this.#check();
      try {
        return fn();
      } catch (e) {
        throw this.#failed(e);
      }
    }

    /// After a completed change to the knowledge base: the snapshot a restart rebuilds from.
    #changed() {
      if (this.#opts.recover !== false) this.#snapshot = this.#kb.toBytes();
    }

    /// Testing only: makes the wasm instance trap, as a bug in it would. Not part of the API.
    _trapForTests() {
      return this.#run(() => this.#b.__loragTrap());
    }

    #needGen() {
      this.#check();
      if (!this.#gen) throw new LoragError("Config", "no generator: pass create({ generator })");
    }

    /// Documents: `[{ id, bytes | text, metadata? }]` or `File`s. Ingest, chunk, embed (only new or changed
    /// chunks), index. Returns `{ documents, kept, embedded, removed, failed: [{ id, error }] }`.
    async add(docs, { onProgress } = {}) {
      this.#check();
      const list = Array.isArray(docs) ? docs : [docs];
      const total = { documents: 0, kept: 0, embedded: 0, removed: 0, failed: [] };
      for (let i = 0; i < list.length; i++) {
        const d = list[i];
        const id = d.id ?? d.name;
        try {
          const bytes = d.bytes ?? (d.text !== undefined ? new TextEncoder().encode(d.text) : new Uint8Array(await d.arrayBuffer()));
          const doc = this.#b.ingest(id, bytes, d.options);
          if (d.metadata) Object.assign(doc.metadata, d.metadata);
          const chunks = this.#chunker.chunk(doc);
          const s = this.#kb.upsertDocument(doc, chunks, (texts) => this.#embedder.embed(texts, "passage"));
          total.documents++;
          total.kept += s.kept;
          total.embedded += s.embedded;
          total.removed += s.removed;
        } catch (e) {
          if (isTrap(e)) throw this.#failed(e);
          total.failed.push({ id, error: wrap(e) });
        }
        onProgress?.({ stage: "index", id, done: i + 1, total: list.length });
      }
      try {
        this.#changed();
      } catch (e) {
        throw this.#failed(e);
      }
      return total;
    }

    /// Delete a document (by id) or a chunk (`doc#n`); returns the number of chunks removed.
    remove(id) {
      return this.#run(() => {
        let n = 1;
        if (this.#kb.documents().some((d) => d.id === id)) n = this.#kb.deleteDocument(id);
        else this.#kb.deleteChunk(id);
        this.#changed();
        return n;
      });
    }

    /// `search(query, { k, mode, filter, fusion, mmr_lambda, ef, min_score })` → hits `[{ chunk, score, … }]`.
    search(query, opts = {}) {
      return this.#run(() => {
        const v = opts.mode === "bm25" ? undefined : this.#embedder.embed([query], "query");
        return this.#kb.search(v, query, { k: 5, ...opts });
      });
    }

    /// Answer, streamed: `for await (const ev of rag.ask(q, opts))` yields `{ type: "token", text, id, index }`
    /// events, then one `{ type: "answer", answer }`. `opts`: `{ mode, k, search, adapters, maxTokens, generate,
    /// prompt, history, signal }` (an AbortSignal stops generation; the answer then says `aborted`).
    async *ask(question, opts = {}) {
      this.#needGen();
      const { k, maxTokens, signal, ...rest } = opts;
      const options = { ...rest, search: { ...(k ? { k } : {}), ...(opts.search ?? {}) }, generate: { ...(maxTokens ? { maxTokens } : {}), ...(opts.generate ?? {}) } };
      const gen = this.#gen;
      const answer = yield* this.#queued((emit, stopped) =>
        gen.askAsync(this.#embedder, this.#kb, question, options, (ev) => {
          emit({ type: "token", ...ev });
          return !(stopped() || signal?.aborted);
        }),
      );
      yield { type: "answer", answer };
    }

    /// Run `work(emit, stopped)` in this Lorag's turn (requests go through the generator one at a time, later ones
    /// waiting), yielding each event `work` emits as it comes; returns what `work` resolves to. `stopped()` turns
    /// true when the consumer leaves the loop early.
    async *#queued(work) {
      const queue = [];
      let wake;
      let stop = false;
      let done = false;
      let result;
      let error;
      const emit = (ev) => {
        queue.push(ev);
        wake?.();
      };
      const turn = this.#busy.then(() => work(emit, () => stop));
      this.#busy = turn.catch(() => {});
      turn.then(
        (r) => ((result = r), (done = true), wake?.()),
        (e) => ((error = e), (done = true), wake?.()),
      );
      try {
        for (;;) {
          while (queue.length) yield queue.shift();
          if (done) break;
          await new Promise((r) => (wake = r));
          wake = undefined;
        }
        if (error) throw this.#failed(error);
        return result;
      } finally {
        stop = true; // the consumer left early: stop the work
      }
    }

    /// Train a LoRA adapter on `examples` and load it at once (hot-swapped) as `opts.name` (default "trained"):
    /// `for await (const ev of rag.train(examples, opts))` yields `{ type: "progress", step, totalSteps, epoch,
    /// loss, lr, gradNorm, tokens, tokensPerS, elapsedS, etaS, evalLoss }` after each optimizer step, then one
    /// `{ type: "done", aborted, info, adapter: { config, weights }, checkpoint }` (the adapter in PEFT's format,
    /// the checkpoint for `opts.resume`). `examples`: JSONL text, or an array of `{ messages }` /
    /// `{ prompt, response, system? }`. `opts`: `{ name, lora: { rank, alpha, rslora, dropout, targets, seed },
    /// config: { lr, epochs, batchSize, maxLen, warmupSteps, schedule, weightDecay, maxGradNorm, evalFraction,
    /// seed }, resume (a checkpoint's bytes), signal }`: an aborted signal stops after the current step, and the
    /// adapter trained so far is still loaded and returned. Runs between other requests, not beside them.
    async *train(examples, opts = {}) {
      this.#needGen();
      const { name = "trained", lora, config, resume, signal } = opts;
      const data = typeof examples === "string" ? examples : examples.map((e) => JSON.stringify(e)).join("\n");
      const b = this.#b;
      const gen = this.#gen;
      const result = yield* this.#queued(async (emit, stopped) => {
        const trainer = resume ? b.Trainer.resume(gen, data, resume) : new b.Trainer(gen, data, lora ?? {}, config ?? {});
        try {
          let aborted = false;
          // Progress after each step; between steps the event loop runs (the consumer sees the event, an abort
          // message reaches a worker), then the signal is checked before the next step.
          await trainer.run(
            (p) => emit({ type: "progress", ...p }),
            () => !(aborted = stopped() || !!signal?.aborted),
          );
          const info = trainer.info;
          aborted = aborted && !info.done;
          const adapter = trainer.exportPeft();
          const checkpoint = trainer.checkpoint();
          gen.loadAdapter(name, adapter.weights, adapter.config);
          return { aborted, info, adapter, checkpoint };
        } finally {
          trainer.free();
        }
      });
      if (this.#opts.recover !== false) {
        this.#adapterSpecs.set(name, { safetensors: result.adapter.weights, config: new TextEncoder().encode(result.adapter.config) });
      }
      yield { type: "done", ...result };
    }

    /// Load (or replace) an adapter: bytes / URL of a GGUF-LoRA, or `{ safetensors, config }` (PEFT).
    async loadAdapter(name, spec, { onProgress } = {}) {
      this.#needGen();
      let info;
      try {
        info = await loadAdapterInto(this.#gen, name, spec, { onProgress });
      } catch (e) {
        throw this.#failed(e);
      }
      if (this.#opts.recover !== false) this.#adapterSpecs.set(name, spec);
      return info;
    }

    removeAdapter(name) {
      this.#needGen();
      return this.#run(() => {
        const removed = this.#gen.removeAdapter(name);
        this.#adapterSpecs.delete(name);
        if (this.#opts.adapters?.[name] !== undefined) {
          const { [name]: _, ...rest } = this.#opts.adapters;
          this.#opts.adapters = rest;
        }
        return removed;
      });
    }

    get adapters() {
      return this.#gen ? this.#run(() => this.#gen.adapters) : [];
    }

    get device() {
      return this.#gen ? this.#run(() => this.#gen.device) : { kind: "cpu" };
    }

    /// The documents: `[{ id, title, metadata }]`.
    documents() {
      return this.#run(() => this.#kb.documents());
    }

    get stats() {
      return this.#run(() => ({ documents: this.#kb.documents().length, chunks: this.#kb.length, memory: this.#kb.memory() }));
    }

    /// The knowledge pack's bytes (validated again by whatever loads them).
    toBytes() {
      return this.#run(() => this.#kb.toBytes());
    }

    /// Save the knowledge pack atomically under `name` (default: the one it was opened with) in the platform's
    /// storage. The bytes are taken before the first await: searches and asks may go on meanwhile.
    async save(name = this.#name) {
      this.#check();
      if (!storage) throw new LoragError("Config", "no storage on this platform: use toBytes()");
      const bytes = this.#run(() => this.#kb.toBytes());
      await storage.write(name, bytes, this.#storageOpts);
      return { name, bytes: bytes.length };
    }

    /// Free the wasm memory; every later call throws `Disposed`.
    dispose() {
      if (this.#disposed) return;
      this.#disposed = true;
      this.#snapshot = undefined;
      if (this.#restart || this.#dead) return; // nothing live to free (a restart frees what it built)
      for (const o of [this.#embedder, this.#chunker, this.#kb, this.#gen]) o?.free?.();
    }
  }

  return Lorag;
}
