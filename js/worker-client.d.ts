import type { AskEvent, AskOptions, CreateOptions, DocumentInput, ProgressEvent, SearchOptions, AdapterSpec, TrainEvent, TrainExample, TrainOptions } from "./index.js";
export { LoragError } from "./index.js";

/** The Lorag API with all compute in a Worker (or a SharedWorker serving several tabs) running lorag's worker.js. */
export declare class LoragWorker {
  static create(options: CreateOptions, init: { worker: Worker | SharedWorker }): Promise<LoragWorker>;
  static open(name: string, options: CreateOptions, init: { worker: Worker | SharedWorker }): Promise<LoragWorker>;
  add(docs: DocumentInput | DocumentInput[], options?: { onProgress?: (ev: ProgressEvent) => void }): Promise<{ documents: number; kept: number; embedded: number; removed: number; failed: { id: string; error: { code: string; message: string } }[] }>;
  remove(id: string): Promise<number>;
  search(query: string, options?: SearchOptions): Promise<{ chunk: Record<string, unknown>; score: number }[]>;
  ask(question: string, options?: AskOptions): AsyncGenerator<AskEvent>;
  loadAdapter(name: string, spec: AdapterSpec): Promise<Record<string, unknown>>;
  /** Lorag.train in the worker: progress events streamed back; `signal` or leaving the loop stops it after the current step. */
  train(examples: string | TrainExample[], options?: TrainOptions): AsyncGenerator<TrainEvent>;
  removeAdapter(name: string): Promise<boolean>;
  save(name?: string): Promise<{ name: string; bytes: number }>;
  toBytes(): Promise<Uint8Array>;
  stats(): Promise<{ documents: number; chunks: number; memory: Record<string, number> }>;
  adapters(): Promise<Record<string, unknown>[]>;
  documents(): Promise<{ id: string; title: string | null; metadata: Record<string, string> }[]>;
  device(): Promise<{ kind: "cpu" | "gpu"; name?: string; notice?: string; submissions?: number; submitUs?: number }>;
  dispose(): Promise<void>;
}
