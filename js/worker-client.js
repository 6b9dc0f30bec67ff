// `lorag/worker`, the page side: the Lorag API with every call sent to a worker running worker.js.
//   const rag = await LoragWorker.create(opts, { worker: new Worker(new URL("lorag/worker.js", import.meta.url), { type: "module" }) });
// Options and documents must be structured-cloneable (no functions except onProgress, which stays here).
import { LoragError } from "./core.js";

const toError = (e) => new LoragError(e.code, e.message);
let nextId = 1; // unique across every client in this page, so replies on a shared port find their request

export class LoragWorker {
  #port;
  #handle;
  #pending = new Map(); // id → { onMessage }

  constructor(port, handle) {
    this.#port = port;
    this.#handle = handle;
  }

  static #connect(worker) {
    const port = worker.port ?? worker; // SharedWorker or Worker
    port.start?.();
    return port;
  }

  static async #open(method, opts = {}, { worker } = {}) {
    if (!worker) throw new LoragError("Config", "pass { worker }: a Worker or SharedWorker running lorag's worker.js");
    const port = LoragWorker.#connect(worker);
    const { onProgress, ...rest } = opts;
    const client = new LoragWorker(port, 0);
    client.#listen();
    const handle = await client.#call(method, [rest], { onProgress });
    client.#handle = handle;
    return client;
  }

  static create(opts, init) {
    return LoragWorker.#open("create", opts, init);
  }

  static open(name, opts, init) {
    return LoragWorker.#open("open", { ...opts, name }, init);
  }

  #listen() {
    const prev = this.#port.onmessage;
    this.#port.onmessage = (e) => {
      const p = this.#pending.get(e.data?.id);
      if (p) p.onMessage(e.data);
      else prev?.(e);
    };
  }

  #send(method, args, transfer) {
    const id = nextId++;
    this.#port.postMessage({ id, method, handle: this.#handle, args }, transfer ?? []);
    return id;
  }

  #call(method, args = [], { onProgress } = {}) {
    return new Promise((resolve, reject) => {
      const id = this.#send(method, args);
      this.#pending.set(id, {
        onMessage: (m) => {
          if (m.type === "progress") return onProgress?.(m.ev);
          this.#pending.delete(id);
          if (m.type === "error") reject(toError(m.error));
          else resolve(m.value);
        },
      });
    });
  }

  add(docs, opts = {}) {
    return this.#call("add", [docs], opts);
  }
  remove(id) {
    return this.#call("remove", [id]);
  }
  search(query, opts) {
    return this.#call("search", [query, opts]);
  }
  loadAdapter(name, spec) {
    return this.#call("loadAdapter", [name, spec]);
  }
  removeAdapter(name) {
    return this.#call("removeAdapter", [name]);
  }
  save(name) {
    return this.#call("save", name === undefined ? [] : [name]);
  }
  toBytes() {
    return this.#call("toBytes");
  }
  stats() {
    return this.#call("stats");
  }
  documents() {
    return this.#call("documents");
  }
  adapters() {
    return this.#call("adapters");
  }
  device() {
    return this.#call("device");
  }
  dispose() {
    return this.#call("dispose");
  }

  /// Streamed like Lorag.ask; `opts.signal` (an AbortSignal) or leaving the loop aborts in the worker.
  ask(question, opts = {}) {
    return this.#stream("ask", question, opts);
  }

  /// Streamed like Lorag.train; `opts.signal` or leaving the loop stops it after the current step.
  train(examples, opts = {}) {
    return this.#stream("train", examples, opts);
  }

  async *#stream(method, first, opts) {
    const { signal, ...rest } = opts;
    const events = [];
    let wake;
    let end;
    const id = this.#send(method, [first, rest]);
    const abort = () => this.#port.postMessage({ method: "abort", handle: this.#handle, target: id });
    signal?.addEventListener("abort", abort, { once: true });
    this.#pending.set(id, {
      onMessage: (m) => {
        if (m.type === "event") events.push(m.ev);
        else {
          this.#pending.delete(id);
          end = m;
        }
        wake?.();
      },
    });
    try {
      for (;;) {
        while (events.length) yield events.shift();
        if (end) break;
        await new Promise((r) => (wake = r));
        wake = undefined;
      }
      if (end.type === "error") throw toError(end.error);
    } finally {
      signal?.removeEventListener("abort", abort);
      if (!end) abort();
    }
  }
}

export { LoragError };
