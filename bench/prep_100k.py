"""100,000 real-text vectors for the HNSW benchmark (issue: "on 100,000 real-text vectors, chunk smaller").

SciFact's 5,183 abstracts, one paragraph each, are chunked by lorag itself into ~14-token chunks
(`lorag chunk --size 14 --overlap 0 --json`), the first 100,000 chunks are embedded with all-MiniLM-L6-v2 int8 by
onnxruntime (Python; the same model and pooling lorag matches within 1e-4), and the 1,109 SciFact claim vectors of
../shared/peers/data serve as queries. Exact top-10 by inner product (numpy) is the ground truth. Output, in the
peers' format (little-endian f32 rows of 384, i32 top-10 rows): OUT/vec_chunks100k_{base,query}.f32, _gt.i32.

  python3 -m venv V && V/bin/pip install onnxruntime tokenizers numpy
  cargo build --release --features cli
  V/bin/python bench/prep_100k.py OUT_DIR            # OUT_DIR: the data/ folder of a writable copy of ../shared/peers
"""
import json, os, subprocess, sys, tempfile, time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models/all-MiniLM-L6-v2-int8")
SHARED = os.path.join(ROOT, "../shared")
OUT = sys.argv[1]
N, DIM, K = 100_000, 384, 10

abstracts = [json.loads(l)["text"] for l in open(os.path.join(SHARED, "data/scifact/corpus.jsonl"))]
with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("\n\n".join(a.replace("\n", " ") for a in abstracts))
    corpus = f.name
t = time.time()
out = subprocess.run([os.path.join(ROOT, "target/release/lorag"), "chunk", corpus, "--tokenizer", MODEL,
                      "--size", "14", "--overlap", "0", "--json"], check=True, capture_output=True).stdout
chunks = [c["text"] for c in json.loads(out)]
print(f"{len(chunks)} chunks in {time.time() - t:.1f} s", file=sys.stderr)
assert len(chunks) >= N, "fewer chunks than wanted"
chunks = chunks[:N]

tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
tok.no_padding()
tok.enable_truncation(max_length=256)
so = ort.SessionOptions()
so.intra_op_num_threads = os.cpu_count()
sess = ort.InferenceSession(os.path.join(MODEL, "model.onnx"), so, providers=["CPUExecutionProvider"])
ids = [e.ids for e in tok.encode_batch(chunks)]
order = np.argsort([len(i) for i in ids])
base = np.zeros((N, DIM), np.float32)
t = time.time()
for s in range(0, N, 64):
    sel = order[s:s + 64]
    L = max(len(ids[j]) for j in sel)
    ii = np.zeros((len(sel), L), np.int64)
    am = np.zeros_like(ii)
    for r, j in enumerate(sel):
        ii[r, :len(ids[j])] = ids[j]
        am[r, :len(ids[j])] = 1
    h = sess.run(None, {"input_ids": ii, "attention_mask": am, "token_type_ids": np.zeros_like(ii)})[0]
    m = am[..., None].astype(np.float32)
    base[sel] = (h * m).sum(1) / m.sum(1)
base /= np.linalg.norm(base, axis=1, keepdims=True)
print(f"embedded {N} chunks in {time.time() - t:.1f} s", file=sys.stderr)
query = np.fromfile(os.path.join(SHARED, "peers/data/vec_scifact_query.f32"), np.float32).reshape(-1, DIM)
scores = query @ base.T
gt = np.argsort(-scores, axis=1, kind="stable")[:, :K].astype(np.int32)
os.makedirs(OUT, exist_ok=True)
base.tofile(os.path.join(OUT, "vec_chunks100k_base.f32"))
query.tofile(os.path.join(OUT, "vec_chunks100k_query.f32"))
gt.tofile(os.path.join(OUT, "vec_chunks100k_gt.i32"))
print(f"wrote {OUT}/vec_chunks100k_*", file=sys.stderr)
