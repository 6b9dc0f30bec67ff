// lorag on an edge worker (Cloudflare Workers module syntax; run locally by workerd: scripts/edge-worker).
//
//   POST /search  {"query": "...", "k"?: 5, "mode"?: "hybrid"|"hnsw"|"exact"|"bm25", "filter"?, "fusion"?,
//                  "mmrLambda"?, "minScore"?}                      → {"query", "hits": [{chunk, score, ...}]}
//   POST /ask     {"question": "...", "k"?: 4, "maxSourceChars"?: 6000, "prompt"?: PromptConfig, "stream"?: bool}
//                 → {"mode": "retrieval-only", "answer": null, "note", "messages", "sources", "dropped"}
//                 or, with "stream": true or "Accept: text/event-stream", the same as server-sent events:
//                 event "sources", event "prompt", event "done".
//   GET  /health  → {"ok", "chunks", "documents", "embedder", "wasmMemoryBytes"}
//
// The embedder (all-MiniLM-L6-v2 int8, 23 MB) and the knowledge pack (built by `lorag index`) are not in the
// bundle: they come from bindings, either data bindings holding the bytes (workerd's `data = embed "…"`) or
// an R2 bucket bound as FILES holding model.onnx, tokenizer.json, the config files and kb.lorag.
//
// No generator: SmolLM2-135M Q4_1 is 94 MB of weights alone, and a Worker has 128 MB for everything, so /ask
// returns the retrieved sources and the cited prompt (chat messages ready for any model), and says so.

import { initSync, Embedder, KnowledgeBase } from "./lorag.js";
import wasmModule from "./lorag_bg.wasm";

const MAX_BODY = 64 * 1024; // bytes of a request body
const MAX_QUERY = 2000; // characters of a query or question
const MAX_K = 50;

const FILES = {
  model_onnx: ["MODEL_ONNX", "model.onnx", true],
  tokenizer_json: ["TOKENIZER_JSON", "tokenizer.json", true],
  config_json: ["CONFIG_JSON", "config.json", false],
  pooling_config_json: ["POOLING_CONFIG_JSON", "1_Pooling/config.json", false],
  sentence_bert_config_json: ["SENTENCE_BERT_CONFIG_JSON", "sentence_bert_config.json", false],
  modules_json: ["MODULES_JSON", "modules.json", false],
};

let state = null; // Promise<{ wasm, embedder, kb }>, made by the first request

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function fileBytes(env, binding, key, required) {
  let v = env[binding];
  if (v === undefined && env.FILES && typeof env.FILES.get === "function") {
    const obj = await env.FILES.get(key);
    v = obj ? await obj.arrayBuffer() : undefined;
  }
  if (v === undefined || v === null) {
    if (required) throw new HttpError(500, "Config", `no ${binding} binding and no FILES/${key}`);
    return undefined;
  }
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  throw new HttpError(500, "Config", `${binding} is not bytes`);
}

async function load(env) {
  const wasm = initSync({ module: wasmModule });
  const files = {};
  for (const [field, [binding, key, required]] of Object.entries(FILES)) {
    const bytes = await fileBytes(env, binding, key, required);
    if (bytes) files[field] = bytes;
  }
  const embedder = new Embedder(files, null);
  const pack = await fileBytes(env, "PACK", "kb.lorag", true);
  // The pack must have been built with this embedder (dimension and model hash are checked).
  const identity = { name: "embedder", dim: embedder.dim, hash: embedder.identity };
  const kb = KnowledgeBase.fromBytes(pack, identity);
  return { wasm, embedder, kb, identity };
}

function json(status, body, headers = {}) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...headers },
  });
}

// lorag's errors come out of wasm as Error objects with `code` (see the npm package's types).
function errorResponse(e) {
  if (e instanceof HttpError) return json(e.status, { error: { code: e.code, message: e.message } });
  const code = typeof e?.code === "string" ? e.code : "Internal";
  const status = code === "Internal" ? 500 : 400;
  return json(status, { error: { code, message: String(e?.message ?? e) } });
}

async function readJson(request) {
  const type = request.headers.get("content-type") || "";
  if (!type.toLowerCase().startsWith("application/json")) {
    throw new HttpError(415, "UnsupportedMediaType", "send the body as application/json");
  }
  const declared = Number(request.headers.get("content-length") || 0);
  if (declared > MAX_BODY) throw new HttpError(413, "TooLarge", `body over ${MAX_BODY} bytes`);
  // Read at most MAX_BODY + 1 bytes, whatever the header said (it may be absent or wrong).
  const reader = request.body ? request.body.getReader() : null;
  const parts = [];
  let size = 0;
  while (reader) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > MAX_BODY) {
      await reader.cancel();
      throw new HttpError(413, "TooLarge", `body over ${MAX_BODY} bytes`);
    }
    parts.push(value);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.byteLength;
  }
  let body;
  try {
    body = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new HttpError(400, "BadRequest", `malformed JSON body: ${e.message}`);
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new HttpError(400, "BadRequest", "the body must be a JSON object");
  }
  return body;
}

function text(body, field) {
  const v = body[field];
  if (typeof v !== "string" || v.trim() === "") {
    throw new HttpError(400, "BadRequest", `"${field}" must be a non-empty string`);
  }
  if (v.length > MAX_QUERY) throw new HttpError(400, "BadRequest", `"${field}" is over ${MAX_QUERY} characters`);
  return v;
}

function searchOptions(body, defaultK) {
  const k = body.k ?? defaultK;
  if (!Number.isInteger(k) || k < 1 || k > MAX_K) {
    throw new HttpError(400, "BadRequest", `"k" must be an integer from 1 to ${MAX_K}`);
  }
  const opts = { k, mode: body.mode ?? "hybrid" };
  if (body.filter !== undefined) opts.filter = body.filter;
  if (body.fusion !== undefined) opts.fusion = body.fusion;
  if (body.ef !== undefined) opts.ef = body.ef;
  if (body.minScore !== undefined) opts.min_score = body.minScore;
  if (body.mmrLambda !== undefined) opts.mmr_lambda = body.mmrLambda;
  return opts;
}

function queryVector(s, query, mode) {
  if (mode === "bm25") return undefined;
  return s.embedder.embed([query], "query");
}

async function search(s, request) {
  const body = await readJson(request);
  const query = text(body, "query");
  const opts = searchOptions(body, 5);
  const hits = s.kb.search(queryVector(s, query, opts.mode), query, opts);
  return json(200, { query, hits });
}

const NOTE =
  "retrieval and prompt only: no generator runs in this worker (a Worker has 128 MB of memory, the smallest " +
  "supported model needs 94 MB for its weights alone). Send `messages` to a chat model; it cites the sources " +
  "as [n].";

async function ask(s, request) {
  const body = await readJson(request);
  const question = text(body, "question");
  const opts = searchOptions(body, 4);
  const maxChars = body.maxSourceChars ?? 6000;
  if (!Number.isInteger(maxChars) || maxChars < 0) {
    throw new HttpError(400, "BadRequest", `"maxSourceChars" must be a non-negative integer`);
  }
  const p = s.kb.plainPrompt(queryVector(s, question, opts.mode), question, opts, body.prompt ?? null, maxChars);
  const result = { mode: "retrieval-only", answer: null, note: NOTE, ...p };
  const wantsStream = body.stream === true || (request.headers.get("accept") || "").includes("text/event-stream");
  if (!wantsStream) return json(200, result);
  const enc = new TextEncoder();
  const event = (name, data) => enc.encode(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`);
  const stream = new ReadableStream({
    start(controller) {
      controller.enqueue(event("sources", { sources: p.sources, dropped: p.dropped }));
      controller.enqueue(event("prompt", { messages: p.messages, sourceChars: p.sourceChars }));
      controller.enqueue(event("done", { mode: result.mode, answer: null, note: NOTE }));
      controller.close();
    },
  });
  return new Response(stream, {
    headers: { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store" },
  });
}

function health(s) {
  return json(200, {
    ok: true,
    chunks: s.kb.length,
    documents: s.kb.documents().length,
    embedder: { dim: s.identity.dim, hash: s.identity.hash },
    wasmMemoryBytes: s.wasm.memory.buffer.byteLength,
  });
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const routes = { "/search": ["POST", search], "/ask": ["POST", ask], "/health": ["GET", health] };
    const route = routes[url.pathname];
    try {
      if (!route) throw new HttpError(404, "NotFound", `no route ${url.pathname}`);
      if (request.method !== route[0]) {
        return json(405, { error: { code: "MethodNotAllowed", message: `use ${route[0]}` } }, { allow: route[0] });
      }
      if (!state) {
        state = load(env);
        // A failed load is reported to every request that waited for it, and retried by the next one.
        state.catch(() => {
          state = null;
        });
      }
      return await route[1](await state, request);
    } catch (e) {
      return errorResponse(e);
    }
  },
};
