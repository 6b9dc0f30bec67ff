// The app both bundlers build (tests/bundlers/run.mjs): `import { Lorag } from "lorag"` as a web developer writes
// it, resolved by the bundler to the package's browser entry (or, where the build ignores the `browser` condition,
// to its bundler entry); the embedder from URLs on the page's origin, the bundled documents added, searched, the
// knowledge base saved by name and opened again. The result goes to window.result for the test driver.
import { Lorag } from "lorag";

window.result = (async () => {
  try {
    const rag = await Lorag.create({ embedder: { url: `${location.origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false });
    const docs = await Promise.all(
      ["handbook.md", "safety.html", "faq.txt"].map(async (id) => ({ id, bytes: new Uint8Array(await (await fetch(`/examples/docs/${id}`)).arrayBuffer()) })),
    );
    const added = await rag.add(docs);
    const query = "Where is the nearest defibrillator?";
    const hits = rag.search(query, { k: 2 }).map((h) => h.chunk.id);
    // The knowledge base saved in the browser's storage by name and opened again from it.
    await rag.save("bundled");
    rag.dispose();
    const again = await Lorag.open("bundled", { embedder: { url: `${location.origin}/models/all-MiniLM-L6-v2-int8/` }, cache: false });
    const reopened = again.search(query, { k: 2 }).map((h) => h.chunk.id);
    again.dispose();
    const wasm = performance.getEntriesByType("resource").filter((e) => e.name.endsWith(".wasm")).map((e) => new URL(e.name).pathname);
    return { ok: true, documents: added.documents, hits, reopened, wasm };
  } catch (e) {
    return { ok: false, error: `${e.code ?? e.name}: ${e.message}` };
  }
})();
