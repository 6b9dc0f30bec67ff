// Node ≥ 20 entry: the wasm bindings for Node and knowledge packs stored as files (temp file + fsync + rename).
import { createRequire } from "node:module";
import { mkdir, open, readFile, rename, rm } from "node:fs/promises";
import path from "node:path";
import { makeLorag, LoragError, packName } from "./core.js";

const require = createRequire(import.meta.url);

function packPath(name, opts = {}) {
  return path.join(opts.dir ?? "lorag-data", `${packName(name)}.lorag`);
}

const files = {
  async read(name, opts) {
    const p = packPath(name, opts);
    try {
      return new Uint8Array(await readFile(p));
    } catch (e) {
      throw new LoragError(e.code === "ENOENT" ? "NotFound" : "Storage", `${p}: ${e.message}`, { cause: e });
    }
  },
  // An interrupted save leaves the previous pack as it was: the new bytes go to a temp file, are flushed, and
  // replace the pack in one rename.
  async write(name, bytes, opts) {
    const p = packPath(name, opts);
    const tmp = `${p}.${process.pid}.tmp`;
    try {
      await mkdir(path.dirname(p), { recursive: true });
      const fh = await open(tmp, "w");
      try {
        await fh.writeFile(bytes);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, p);
    } catch (e) {
      await rm(tmp, { force: true });
      throw new LoragError("Storage", `${p}: ${e.message}`, { cause: e });
    }
  },
};

// A fresh instance after a trap: the CommonJS bindings module evaluated again (it instantiates its wasm on load).
function loadBindings(generation) {
  const id = require.resolve("./node/lorag.js");
  if (generation > 0) delete require.cache[id];
  return require(id);
}

export const Lorag = makeLorag({ loadBindings, storage: files });
export { LoragError };
