// The offline Q&A page: documents in, questions answered from them, everything in this tab (a Worker runs the
// models). All document and model text is shown with textContent; nothing is ever parsed as HTML.
import { LoragWorker } from "./pkg/worker-client.js";

const $ = (id) => document.getElementById(id);
const abs = (p) => new URL(p, location.href).href;
const MODELS = {
  embedder: { url: abs("/models/all-MiniLM-L6-v2-int8/"), name: "all-MiniLM-L6-v2-int8" },
  generator: abs("/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
};
const EXAMPLES = ["handbook.md", "safety.html", "faq.txt", "courses.pdf"];
const PACK = "www";

let rag;
let controller;
// The worker lives under the app (www/pkg, copied by scripts/build-npm) so the service worker's scope covers it
// and its imports are served offline too.
const worker = new Worker("./pkg/worker.js", { type: "module" });
if ("serviceWorker" in navigator) navigator.serviceWorker.register("sw.js").catch((e) => say(`offline mode unavailable: ${e.message}`));

function say(text) {
  $("status").textContent = text;
}

function onProgress(ev) {
  const p = $("progress");
  if (ev.stage === "download" && ev.total) {
    p.hidden = false;
    p.max = ev.total;
    p.value = ev.loaded;
    say(`${ev.cached ? "loading from cache" : "downloading"} ${ev.url.split("/").pop()}`);
  } else if (ev.stage === "index") {
    p.hidden = false;
    p.max = ev.total;
    p.value = ev.done;
    say(`indexed ${ev.id} (${ev.done}/${ev.total})`);
  } else if (ev.stage === "cache") {
    say(ev.error);
  }
}

async function refreshDocs() {
  const list = $("doclist");
  list.replaceChildren();
  for (const d of await rag.documents()) {
    const li = document.createElement("li");
    li.textContent = d.title ? `${d.title} (${d.id})` : d.id;
    list.append(li);
  }
  const s = await rag.stats();
  say(`${s.documents} documents, ${s.chunks} chunks`);
  $("progress").hidden = true;
}

async function addFiles(items) {
  const docs = [];
  for (const f of items) docs.push({ id: f.name, bytes: new Uint8Array(await f.arrayBuffer()) });
  const r = await rag.add(docs, { onProgress });
  for (const f of r.failed) say(`${f.id}: ${f.error.message}`);
  await rag.save(PACK);
  await refreshDocs();
  if (r.failed.length) say(r.failed.map((f) => `${f.id}: ${f.error.message}`).join("; "));
}

function showPassage(source) {
  const q = $("passage");
  q.hidden = false;
  q.textContent = `[${source.number}] ${source.title ?? source.docId}\n\n${source.text}`;
}

function renderAnswer(answer) {
  // The answer with each [n] made clickable; text stays text.
  const box = $("answer");
  box.replaceChildren();
  let at = 0;
  for (const c of answer.citations) {
    if (c.at.start < at) continue; // one group cites several numbers
    box.append(document.createTextNode(answer.text.slice(at, c.at.start)));
    const span = document.createElement("span");
    span.className = "cite";
    span.textContent = answer.text.slice(c.at.start, c.at.end);
    const src = answer.sources.find((s) => s.number === c.number);
    if (src) span.addEventListener("click", () => showPassage(src));
    else span.title = "not one of the sources";
    box.append(span);
    at = c.at.end;
  }
  box.append(document.createTextNode(answer.text.slice(at)));
  const cited = new Set(answer.citations.map((c) => c.number));
  const list = $("sources");
  list.replaceChildren();
  for (const s of answer.sources) {
    const li = document.createElement("li");
    if (cited.has(s.number)) li.className = "cited";
    const b = document.createElement("button");
    b.type = "button";
    const heading = s.headingPath.filter((h) => h !== s.title).join(" › ");
    const page = s.pages ? `, page ${s.pages[0]}` : "";
    b.textContent = `${s.title ?? s.docId}${heading ? " › " + heading : ""} (${s.docId}${page})`;
    b.addEventListener("click", () => showPassage(s));
    li.append(b);
    list.append(li);
  }
  say(`${answer.promptTokens} prompt tokens, ${answer.answerTokens} answer tokens, ${(answer.timings.totalMs / 1000).toFixed(1)} s`);
}

// An adapter from the user's files: a GGUF-LoRA file, or a PEFT pair (adapter_model.safetensors with its
// adapter_config.json), loaded in the worker under the file's name; it enables the adapter modes.
async function addAdapter(files) {
  const status = $("adapter-status");
  const gguf = files.find((f) => f.name.endsWith(".gguf"));
  const st = files.find((f) => f.name.endsWith(".safetensors"));
  const cfg = files.find((f) => f.name.endsWith(".json"));
  const bytes = async (f) => new Uint8Array(await f.arrayBuffer());
  let name;
  let spec;
  if (gguf) {
    name = gguf.name.replace(/\.gguf$/, "");
    spec = await bytes(gguf);
  } else if (st && cfg) {
    name = st.name === "adapter_model.safetensors" ? "adapter" : st.name.replace(/\.safetensors$/, "");
    spec = { safetensors: await bytes(st), config: await bytes(cfg) };
  } else {
    status.textContent = "choose a .gguf LoRA, or adapter_model.safetensors together with adapter_config.json";
    return;
  }
  try {
    const info = await rag.loadAdapter(name, spec);
    const rank = info.rank[0] === info.rank[1] ? info.rank[0] : info.rank.join("–");
    offerAdapter(name, `${name}: ${info.format} rank ${rank} on ${info.targets.join(", ")} (${info.layers} layers)`);
  } catch (e) {
    status.textContent = `${e.code ?? "Error"}: ${e.message}`;
  }
}

// An adapter loaded in the worker: selected in the picker, the adapter modes enabled.
function offerAdapter(name, description) {
  const sel = $("adapter");
  if (![...sel.options].some((o) => o.value === name)) {
    if (!sel.options[0].value) sel.replaceChildren();
    const o = document.createElement("option");
    o.value = name;
    o.textContent = name;
    sel.append(o);
  }
  sel.value = name;
  sel.disabled = false;
  for (const m of ["hybrid", "finetuned"]) $("mode").querySelector(`option[value=${m}]`).disabled = false;
  $("adapter-status").textContent = description;
}

// Fine-tuning: the user's examples train a LoRA adapter in the worker (progress after every step, Stop ends it
// after the current one and keeps what was learned); the result is loaded as the adapter "trained" (hot-swapped:
// the next question can use it) and offered as PEFT files to download.
let training;
async function train() {
  const file = $("train-file").files[0];
  const status = $("train-status");
  if (!file) {
    status.textContent = "choose a JSONL file of examples first";
    return;
  }
  const epochs = Math.max(1, Math.min(20, Math.round(Number($("train-epochs").value) || 1)));
  training = new AbortController();
  $("train-go").disabled = true;
  $("train-stop").disabled = false;
  const bar = $("train-progress");
  bar.hidden = false;
  bar.value = 0;
  status.textContent = "preparing the examples…";
  try {
    let done;
    for await (const ev of rag.train(await file.text(), { name: "trained", config: { epochs }, signal: training.signal })) {
      if (ev.type === "progress") {
        bar.max = ev.totalSteps;
        bar.value = ev.step;
        const held = ev.evalLoss == null ? "" : `, held-out loss ${ev.evalLoss.toFixed(3)}`;
        status.textContent = `step ${ev.step}/${ev.totalSteps} (epoch ${ev.epoch}): loss ${ev.loss.toFixed(3)}${held}, ${Math.round(ev.tokensPerS)} tokens/s, about ${Math.round(ev.etaS)} s left`;
      } else {
        done = ev;
      }
    }
    const { info, adapter } = done;
    const targets = info.lora.targets.join(", ");
    offerAdapter("trained", `trained: rank ${info.lora.rank} on ${targets}, ${info.step} of ${info.totalSteps} steps`);
    for (const [id, bytes, type] of [["train-weights", adapter.weights, "application/octet-stream"], ["train-config", adapter.config, "application/json"]]) {
      const a = $(id);
      if (a.href) URL.revokeObjectURL(a.href);
      a.href = URL.createObjectURL(new Blob([bytes], { type }));
    }
    $("train-files").hidden = false;
    status.textContent = `${done.aborted ? "stopped" : "done"} after ${info.step} of ${info.totalSteps} steps on ${info.trainExamples} examples (${info.evalExamples} more held out for evaluation): the adapter "trained" is loaded`;
  } catch (e) {
    status.textContent = `${e.code ?? "Error"}: ${e.message}`;
  } finally {
    bar.hidden = true;
    $("train-go").disabled = false;
    $("train-stop").disabled = true;
  }
}

async function ask(e) {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("go").disabled = true;
  $("stop").disabled = false;
  $("answer").replaceChildren();
  $("sources").replaceChildren();
  $("passage").hidden = true;
  controller = new AbortController();
  const text = document.createTextNode("");
  $("answer").append(text);
  try {
    const mode = $("mode").value;
    const adapters = mode === "hybrid" || mode === "finetuned" ? [{ name: $("adapter").value }] : [];
    const maxTokens = Math.max(1, Math.min(1024, Math.round(Number($("max-tokens").value) || 128)));
    for await (const ev of rag.ask(question, { mode, adapters, k: 4, maxTokens, signal: controller.signal })) {
      if (ev.type === "token") text.appendData(ev.text);
      else renderAnswer(ev.answer);
    }
  } catch (err) {
    say(`${err.code ?? "Error"}: ${err.message}`);
  } finally {
    $("go").disabled = false;
    $("stop").disabled = true;
  }
}

async function start() {
  const opts = { ...MODELS, device: "auto", onProgress };
  try {
    rag = await LoragWorker.open(PACK, opts, { worker });
  } catch (e) {
    if (e.code !== "NotFound") say(`saved documents could not be opened (${e.code}): starting empty`);
    rag = await LoragWorker.create(opts, { worker });
  }
  const dev = await rag.device();
  $("device").textContent = dev.kind === "gpu" ? `Running on WebGPU: ${dev.name}` : `Running on the CPU (WebAssembly)${dev.notice ? ": " + dev.notice : ""}`;
  await refreshDocs();
  $("go").disabled = false;
  $("train-go").disabled = false;
}

$("ask").addEventListener("submit", ask);
$("stop").addEventListener("click", () => controller?.abort());
$("files").addEventListener("change", (e) => addFiles([...e.target.files]));
$("adapter-files").addEventListener("change", (e) => addAdapter([...e.target.files]));
$("train-go").addEventListener("click", train);
$("train-stop").addEventListener("click", () => training?.abort());
$("examples").addEventListener("click", async () => {
  const files = await Promise.all(EXAMPLES.map(async (n) => new File([await (await fetch(`/examples/docs/${n}`)).arrayBuffer()], n)));
  await addFiles(files);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  addFiles([...e.dataTransfer.files]);
});
start().catch((e) => say(`could not start (${e.code ?? e.name}): ${e.message}`));
