// Knowledge packs in a browser (the browser entry, web.js, and the bundler entry, bundler.js): in the Origin
// Private File System (atomic: createWritable writes a swap file that replaces the pack only on close; an
// interrupted save leaves the previous pack), or in IndexedDB where OPFS cannot write.
import { LoragError, packName } from "./core.js";

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

// IndexedDB, where OPFS is missing or cannot write here (older browsers; Safari's pages before createWritable):
// one object store of packs keyed "dir/name". A save is one put in one transaction: it commits whole or not at
// all, so a quota error or an interrupted save leaves the previous pack.
const idb = {
  open() {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open("lorag", 1);
      req.onupgradeneeded = () => req.result.createObjectStore("packs");
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error("the lorag database is blocked by another tab's older version"));
    });
  },
  key: (name, opts = {}) => `${opts.dir ? packName(opts.dir) : ""}/${packName(name)}`,
  async read(name, opts) {
    const key = idb.key(name, opts);
    let db;
    try {
      db = await idb.open();
      const value = await new Promise((resolve, reject) => {
        const req = db.transaction("packs", "readonly").objectStore("packs").get(key);
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
      if (value === undefined) throw new LoragError("NotFound", `IndexedDB ${key}: no such pack`);
      return new Uint8Array(value);
    } catch (e) {
      if (e instanceof LoragError) throw e;
      throw new LoragError("Storage", `IndexedDB ${key}: ${e?.message ?? e}`, { cause: e });
    } finally {
      db?.close();
    }
  },
  async write(name, bytes, opts) {
    const key = idb.key(name, opts);
    let db;
    try {
      db = await idb.open();
      await new Promise((resolve, reject) => {
        const tx = db.transaction("packs", "readwrite", { durability: "strict" });
        tx.objectStore("packs").put(bytes.slice().buffer, key);
        tx.oncomplete = () => resolve();
        tx.onabort = () => reject(tx.error ?? new Error("transaction aborted"));
        tx.onerror = () => reject(tx.error);
      });
    } catch (e) {
      const quota = e?.name === "QuotaExceededError";
      throw new LoragError(quota ? "Quota" : "Storage", `IndexedDB ${key}: ${quota ? "storage quota exceeded; the previous pack is intact" : e?.message ?? e}`, { cause: e });
    } finally {
      db?.close();
    }
  },
};

const hasOpfs = () => !!globalThis.navigator?.storage?.getDirectory;
const hasIdb = () => !!globalThis.indexedDB;

// `storage: { backend }` in create/open options: "opfs", "indexeddb", or (default) OPFS where it can write and
// IndexedDB otherwise; a pack not found in OPFS is looked for in IndexedDB.
const storage = {
  async read(name, opts = {}) {
    if (opts.backend === "indexeddb" || (!opts.backend && !hasOpfs())) return idb.read(name, opts);
    try {
      return await opfs.read(name, opts);
    } catch (e) {
      if (opts.backend === "opfs" || !hasIdb() || !["NotFound", "Storage"].includes(e.code)) throw e;
      return idb.read(name, opts).catch((e2) => {
        throw e2.code === "NotFound" && e.code !== "NotFound" ? e : e2;
      });
    }
  },
  async write(name, bytes, opts = {}) {
    if (opts.backend === "indexeddb" || (!opts.backend && !hasOpfs())) return idb.write(name, bytes, opts);
    try {
      return await opfs.write(name, bytes, opts);
    } catch (e) {
      // OPFS present but unable to write here (no createWritable): IndexedDB, unless OPFS was asked for.
      if (opts.backend === "opfs" || !hasIdb() || e.code !== "Storage" || !/createWritable/.test(e.message)) throw e;
      return idb.write(name, bytes, opts);
    }
  },
};

/// The storage for makeLorag, or undefined where this global scope has neither OPFS nor IndexedDB (a bundle
/// run outside a browser): there save/open say so and packs go through toBytes() / create({ pack }).
export const browserStorage = hasOpfs() || hasIdb() ? storage : undefined;
