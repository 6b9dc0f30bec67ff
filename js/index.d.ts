// Types for the `lorag` package (the Lorag facade; the low-level classes are typed in ./node/lorag.d.ts etc.).

export type Bytes = Uint8Array | ArrayBuffer;
/** Bytes, a URL, `{ url, sha256? }` (checked before use and before caching) or `{ bytes }`. */
export type Source = Bytes | string | { url: string; sha256?: string } | { bytes: Bytes };

export interface EmbedderSpec {
  /** A sentence-transformers folder URL (Hugging Face `…/resolve/main/` works): model.onnx, tokenizer.json, configs. */
  url?: string;
  /** Files by binding name; a relative string is a path inside `url`. */
  files?: Partial<Record<"model_onnx" | "tokenizer_json" | "config_json" | "pooling_config_json" | "sentence_bert_config_json" | "modules_json", Source>>;
  /** sha256 (hex) per file name, checked before use. */
  sha256?: Partial<Record<string, string>>;
  /** Identity recorded in knowledge packs (default: the folder's name). */
  name?: string;
  config?: {
    normalize?: boolean; query_prefix?: string; passage_prefix?: string; batch_size?: number; max_seq_length?: number;
    /** What runs the model: "native" (lorag's BERT encoder; the default for the BERT graphs it recognizes) or "tract". */
    engine?: "native" | "tract";
  };
}

/** A GGUF-LoRA file, or PEFT's two files. */
export type AdapterSpec = Source | { safetensors: Source; config: Source } | { url: string; peft: true };

export type ProgressEvent =
  | { stage: "download"; url: string; loaded: number; total?: number; cached?: boolean }
  | { stage: "cache"; url: string; error: string }
  | { stage: "device"; kind: "cpu" | "gpu"; name?: string; backend?: string; software?: boolean; subgroups?: boolean; notice?: string; submissions?: number; submitUs?: number }
  | { stage: "index"; id: string; done: number; total: number }
  | { stage: "restarted"; cause: string };

export interface CreateOptions {
  embedder: EmbedderSpec;
  generator?: Source;
  adapters?: Record<string, AdapterSpec>;
  device?: "auto" | "gpu" | "cpu";
  chunk?: { size?: number; overlap?: number; prefix_headings?: boolean };
  index?: Record<string, unknown>;
  /** A knowledge pack to start from (validated; must come from the same embedder). */
  pack?: Source;
  /** Name under which save() stores the pack (default "default"). */
  name?: string;
  /** Node: `{ dir }` for packs (default ./lorag-data). */
  storage?: { dir?: string };
  /** Cache downloaded models in the Cache API where there is one (default true). */
  cache?: boolean;
  cacheName?: string;
  /**
   * Restart on a fresh wasm instance after a trap (default true): the Lorag keeps a copy of its knowledge pack
   * after every completed add/remove to rebuild from. `false`: no copy; a trap leaves it unusable (`Crashed`).
   */
  recover?: boolean;
  onProgress?: (ev: ProgressEvent) => void;
}

export interface DocumentInput {
  id: string;
  bytes?: Uint8Array;
  text?: string;
  metadata?: Record<string, string>;
}

export interface SearchOptions {
  k?: number;
  mode?: "hybrid" | "exact" | "hnsw" | "bm25";
  ef?: number;
  min_score?: number;
  filter?: unknown;
  fusion?: unknown;
  mmr_lambda?: number;
}

export interface Source_ {
  number: number; chunkId: string; docId: string; title: string | null; headingPath: string[];
  pages: [number, number] | null; span: { start: number; end: number }; score: number; text: string; trimmed: boolean;
}
export interface Citation {
  number: number; at: { start: number; end: number }; chunkId: string | null; docId: string | null;
  span: { start: number; end: number } | null; pages: [number, number] | null;
}
export interface Answer {
  question: string; mode: Mode; text: string; sources: Source_[]; citations: Citation[]; dropped: string[];
  retrieved: { chunkId: string; score: number }[]; messages: { role: string; content: string }[];
  promptTokens: number; answerTokens: number; context: number;
  stopReason: { kind: "eos" | "stop" | "maxTokens" | "contextFull" | "aborted"; value?: string };
  timings: { retrievalMs: number; promptMs: number; prefillMs: number; decodeMs: number; totalMs: number };
  adapters: { name: string; weight: number }[];
}
export type Mode = "base" | "rag" | "finetuned" | "hybrid";
export interface AskOptions {
  mode?: Mode;
  k?: number;
  search?: SearchOptions;
  adapters?: { name: string; weight?: number }[];
  maxTokens?: number;
  generate?: Record<string, unknown>;
  prompt?: Record<string, unknown>;
  history?: { role: "user" | "assistant"; content: string }[];
  queryTurns?: number;
  signal?: AbortSignal;
}
export type AskEvent = { type: "token"; text: string; id: number | null; index: number } | { type: "answer"; answer: Answer };

/** One training example: a chat (as `lorag log export` writes) or a prompt/response pair. */
export type TrainExample = { messages: { role: "system" | "user" | "assistant"; content: string }[] } | { prompt: string; response: string; system?: string };
export interface TrainOptions {
  /** The adapter's name in the generator (default "trained"; replaced if it exists). */
  name?: string;
  /** Defaults: rank 8, alpha 16, q,v, no dropout, seed 1. */
  lora?: { rank?: number; alpha?: number; rslora?: boolean; dropout?: number; targets?: ("q" | "k" | "v" | "o" | "gate" | "up" | "down")[]; seed?: number };
  /** Defaults: lr 2e-4, linear decay, 3 epochs, batch 4, maxLen 256, clipping 1.0, 10 % held out. */
  config?: {
    lr?: number; weightDecay?: number; betas?: [number, number]; eps?: number; warmupSteps?: number;
    schedule?: "linear" | "cosine" | "constant"; epochs?: number; batchSize?: number; maxLen?: number;
    maxGradNorm?: number; evalFraction?: number; seed?: number;
  };
  /** A checkpoint from an earlier run's "done" event (same model and examples): go on from there. */
  resume?: Uint8Array;
  /** Stops after the current step; the adapter trained so far is still loaded and returned. */
  signal?: AbortSignal;
}
export type TrainEvent =
  | { type: "progress"; step: number; totalSteps: number; epoch: number; loss: number; lr: number; gradNorm: number; tokens: number; tokensPerS: number; elapsedS: number; etaS: number; evalLoss: number | null }
  | { type: "done"; aborted: boolean; info: Record<string, unknown>; adapter: { config: string; weights: Uint8Array }; checkpoint: Uint8Array };

export declare class LoragError extends Error {
  name: "LoragError";
  /**
   * The crate's codes (Config, NotFound, Model, ContextOverflow, …) and this layer's: Download, Integrity, Storage,
   * Quota, Disposed, Crashed (the wasm instance trapped during this call; the Lorag restarts itself unless
   * `recover: false`), Restarting (called during that restart: `await rag.ready`).
   */
  code: string;
}

export declare class Lorag {
  static create(options: CreateOptions): Promise<Lorag>;
  /** Node: the pack saved under `name`. */
  static open(name: string, options: CreateOptions): Promise<Lorag>;
  add(docs: DocumentInput | File | (DocumentInput | File)[], options?: { onProgress?: (ev: ProgressEvent) => void }):
    Promise<{ documents: number; kept: number; embedded: number; removed: number; failed: { id: string; error: LoragError }[] }>;
  remove(id: string): number;
  search(query: string, options?: SearchOptions): { chunk: Record<string, unknown>; score: number; vector_score?: number; keyword_score?: number }[];
  ask(question: string, options?: AskOptions): AsyncGenerator<AskEvent>;
  loadAdapter(name: string, spec: AdapterSpec, options?: { onProgress?: (ev: ProgressEvent) => void }): Promise<Record<string, unknown>>;
  /** Train a LoRA adapter on the examples (in this thread: use LoragWorker to keep a page responsive) and load it. */
  train(examples: string | TrainExample[], options?: TrainOptions): AsyncGenerator<TrainEvent>;
  removeAdapter(name: string): boolean;
  readonly adapters: Record<string, unknown>[];
  readonly device: { kind: "cpu" | "gpu"; name?: string; notice?: string; submissions?: number; submitUs?: number };
  documents(): { id: string; title: string | null; metadata: Record<string, string> }[];
  readonly stats: { documents: number; chunks: number; memory: Record<string, number> };
  toBytes(): Uint8Array;
  save(name?: string): Promise<{ name: string; bytes: number }>;
  /** Resolves when usable (at once unless restarting after a trap); rejects with `Crashed` when it never will be. */
  readonly ready: Promise<void>;
  dispose(): void;
}
