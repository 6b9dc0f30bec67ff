// Module worker: loads the wasm (pkg/web), takes model bytes over fetch, embeds and chunks off the main thread.
import init, { Embedder, Chunker, version } from "/pkg/web/lorag.js";

self.onmessage = async ({ data }) => {
  try {
    await init();
    const get = async (p) => new Uint8Array(await (await fetch(p)).arrayBuffer());
    const dir = "/models/all-MiniLM-L6-v2-int8/";
    const embedder = new Embedder({
      model_onnx: await get(dir + "model.onnx"),
      tokenizer_json: await get(dir + "tokenizer.json"),
      config_json: await get(dir + "config.json"),
      pooling_config_json: await get(dir + "1_Pooling/config.json"),
      sentence_bert_config_json: await get(dir + "sentence_bert_config.json"),
      modules_json: await get(dir + "modules.json"),
    });
    const vectors = embedder.embed(data.texts, "passage");
    const chunker = new Chunker(await get(dir + "tokenizer.json"), await get(dir + "sentence_bert_config.json"), { size: 64, overlap: 8 });
    const chunks = chunker.chunkBytes("courses.pdf", await get("/examples/docs/courses.pdf"), {});
    self.postMessage({ ok: true, version: version(), dim: embedder.dim, vectors: Array.from(vectors), chunks: chunks.length, inWorker: typeof window === "undefined" });
  } catch (e) {
    self.postMessage({ ok: false, error: String(e && e.stack || e) });
  }
};
