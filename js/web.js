// Browser entry (a page or a module Worker; Vite and webpack take it too): the `web` wasm build, initialized on
// first use, and knowledge packs in the browser's storage (browser-storage.js: OPFS, or IndexedDB).
import init, * as bindings from "./web/lorag.js";
import { makeLorag, LoragError } from "./core.js";
import { browserStorage } from "./browser-storage.js";

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
  storage: browserStorage,
});
export { LoragError };
