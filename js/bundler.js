// Bundler entry (bundlers that do not resolve the package's `browser` condition; Vite and webpack for the web take
// web.js): the `bundler` wasm build, which the bundler instantiates; packs in the browser's storage as web.js's.
import * as bindings from "./bundler/lorag.js";
import { makeLorag, LoragError } from "./core.js";
import { browserStorage } from "./browser-storage.js";

// The bundler instantiates the wasm once: after a trap there is no fresh instance to restart on (the Lorag
// reports Crashed; reload the page).
export const Lorag = makeLorag({
  loadBindings: async (generation) => {
    if (generation > 0) throw new LoragError("Crashed", "the bundler build cannot start a fresh wasm instance: reload the page");
    return bindings;
  },
  storage: browserStorage,
});
export { LoragError };
