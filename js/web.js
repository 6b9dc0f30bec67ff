// Browser entry (a page or a module Worker, no bundler): the `web` wasm build, initialized on first use.
// Knowledge packs: toBytes() / create({ pack }) for now; OPFS / IndexedDB storage comes with the web app.
import init, * as bindings from "./web/lorag.js";
import { makeLorag, LoragError } from "./core.js";

export const Lorag = makeLorag({
  loadBindings: async () => {
    await init();
    return bindings;
  },
  storage: undefined,
});
export { LoragError };
