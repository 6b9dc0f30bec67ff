// `lorag/worker`, the worker side: load it as a module Worker (or SharedWorker, to serve several tabs) and talk
// to it with LoragWorker from worker-client.js. All compute runs here, off the page's main thread. Requests from
// every connected page are served one at a time, in arrival order; `ask` streams its events back as messages and
// can be aborted.
import { Lorag } from "./web.js";

const instances = new Map(); // handle → Lorag
let nextHandle = 1;
let queue = Promise.resolve();

const errorOf = (e) => ({ code: e?.code ?? "Internal", message: String(e?.message ?? e), name: e?.name ?? "Error" });

function serve(port) {
  const aborts = new Map(); // this port's request id → AbortController
  port.onmessage = ({ data }) => {
    const { id, method, handle, args = [] } = data ?? {};
    const reply = (msg, transfer) => port.postMessage({ id, ...msg }, transfer ?? []);
    if (method === "abort") {
      aborts.get(data.target)?.abort();
      return;
    }
    const ctl = new AbortController();
    aborts.set(id, ctl);
    queue = queue.then(async () => {
      try {
        if (method === "create" || method === "open") {
          const [opts = {}] = args;
          const onProgress = (ev) => reply({ type: "progress", ev });
          const rag = method === "create" ? await Lorag.create({ ...opts, onProgress }) : await Lorag.open(opts.name, { ...opts, onProgress });
          const h = nextHandle++;
          instances.set(h, rag);
          return reply({ type: "result", value: h });
        }
        const rag = instances.get(handle);
        if (!rag) throw Object.assign(new Error(`no Lorag with handle ${handle} (disposed?)`), { code: "Disposed" });
        // After a trap the Lorag restarts itself; requests queued behind the one that trapped wait for it.
        if (method !== "dispose") await rag.ready;
        switch (method) {
          case "ask": {
            const [q, opts = {}] = args;
            for await (const ev of rag.ask(q, { ...opts, signal: ctl.signal })) reply({ type: "event", ev });
            return reply({ type: "result", value: null });
          }
          case "train": {
            const [examples, opts = {}] = args;
            for await (const ev of rag.train(examples, { ...opts, signal: ctl.signal })) {
              const transfer = ev.type === "done" ? [ev.adapter.weights.buffer, ev.checkpoint.buffer] : [];
              reply({ type: "event", ev }, transfer);
            }
            return reply({ type: "result", value: null });
          }
          case "add": {
            const [docs, opts = {}] = args;
            return reply({ type: "result", value: await rag.add(docs, { ...opts, onProgress: (ev) => reply({ type: "progress", ev }) }) });
          }
          case "toBytes": {
            const bytes = rag.toBytes();
            return reply({ type: "result", value: bytes }, [bytes.buffer]);
          }
          case "dispose":
            rag.dispose();
            instances.delete(handle);
            return reply({ type: "result", value: null });
          case "adapters":
          case "device":
          case "stats":
            return reply({ type: "result", value: rag[method] });
          case "search":
          case "documents":
          case "remove":
          case "removeAdapter":
          case "loadAdapter":
          case "save":
            return reply({ type: "result", value: await rag[method](...args) });
          default:
            throw Object.assign(new Error(`unknown method ${method}`), { code: "Config" });
        }
      } catch (e) {
        reply({ type: "error", error: errorOf(e) });
      } finally {
        aborts.delete(id);
      }
    });
  };
}

if (typeof self.onconnect !== "undefined" || "SharedWorkerGlobalScope" in self) {
  self.onconnect = (e) => {
    const port = e.ports[0];
    serve(port);
    port.start?.();
  };
} else {
  serve(self);
}
