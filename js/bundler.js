// Bundler entry (Vite, webpack): the `bundler` wasm build, which the bundler instantiates.
import * as bindings from "./bundler/lorag.js";
import { makeLorag, LoragError } from "./core.js";

// The bundler instantiates the wasm once: after a trap there is no fresh instance to restart on (the Lorag
// reports Crashed; reload the page).
export const Lorag = makeLorag({
  loadBindings: async (generation) => {
    if (generation > 0) throw new LoragError("Crashed", "the bundler build cannot start a fresh wasm instance: reload the page");
    return bindings;
  },
  storage: undefined,
});
export { LoragError };
