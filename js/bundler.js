// Bundler entry (Vite, webpack): the `bundler` wasm build, which the bundler instantiates.
import * as bindings from "./bundler/lorag.js";
import { makeLorag, LoragError } from "./core.js";

export const Lorag = makeLorag({ loadBindings: async () => bindings, storage: undefined });
export { LoragError };
