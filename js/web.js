// Browser entry (a page or a module Worker, no bundler): the `web` wasm build, initialized on first use, and
// knowledge packs in the Origin Private File System (atomic: createWritable writes a swap file that replaces the
// pack only on close; an interrupted save leaves the previous pack).
import init, * as bindings from "./web/lorag.js";
import { makeLorag, LoragError, packName } from "./core.js";

async function folder(opts = {}) {
  const root = await navigator.storage.getDirectory();
  return opts.dir ? root.getDirectoryHandle(packName(opts.dir), { create: true }) : root;
}

const opfs = {
  async read(name, opts) {
    const file = `${packName(name)}.lorag`;
    try {
      const handle = await (await folder(opts)).getFileHandle(file);
      return new Uint8Array(await (await handle.getFile()).arrayBuffer());
    } catch (e) {
      throw new LoragError(e.name === "NotFoundError" ? "NotFound" : "Storage", `OPFS ${file}: ${e.message}`, { cause: e });
    }
  },
  async write(name, bytes, opts) {
    const file = `${packName(name)}.lorag`;
    let w;
    try {
      const handle = await (await folder(opts)).getFileHandle(file, { create: true });
      if (!handle.createWritable) throw new LoragError("Storage", "this browser has no OPFS createWritable here: use toBytes()");
      w = await handle.createWritable();
      await w.write(bytes);
      await w.close();
    } catch (e) {
      await w?.abort().catch(() => {});
      if (e instanceof LoragError) throw e;
      const quota = e.name === "QuotaExceededError";
      throw new LoragError(quota ? "Quota" : "Storage", `OPFS ${file}: ${quota ? "storage quota exceeded; the previous pack is intact" : e.message}`, { cause: e });
    }
  },
};

export const Lorag = makeLorag({
  // A fresh instance after a trap: the module imported again under another URL (same file), so that it has
  // its own wasm instance. Bundlers are told to leave this import alone: in a bundled app the file is not there,
  // the restart fails and the Lorag reports Crashed for good (reload the page), as with the bundler entry.
  loadBindings: async (generation) => {
    if (generation === 0) {
      await init();
      return bindings;
    }
    const fresh = await import(/* @vite-ignore */ /* webpackIgnore: true */ `./web/lorag.js?instance=${generation}`);
    await fresh.default();
    return fresh;
  },
  storage: globalThis.navigator?.storage?.getDirectory ? opfs : undefined,
});
export { LoragError };
