#!/usr/bin/env python3
"""PyTorch + PEFT reference for lorag's LoRA training (issue 10). Not part of the test run: its output is committed
as tests/fixtures/peft-train-smollm2.{json,safetensors} and tests/lora.rs (`training::matches_pytorch_peft`)
compares lorag's training against it.

What it does, independently of lorag's code:
  1. loads SmolLM2-135M-Instruct from the Q4_1 GGUF with transformers (`gguf_file=`, dequantized to float32),
     and checks the base model against ../shared/reference (llama.cpp-independent numpy forward): top-5 logits
     of "The capital of France is" within 1e-3;
  2. wraps it with PEFT (LoRA r 8, alpha 16, q_proj + v_proj, no dropout);
  3. sets the adapters to a deterministic start both sides can build: A exactly as lorag's `LoraParams::init`
     draws it (SplitMix64 seed 1, Kaiming-uniform bound 1/sqrt(in), layers in order, q then v, row-major), B
     from SplitMix64 seed 2, uniform in ±0.02, in Hugging Face row order (B = 0 would make A's first gradient
     zero and the first loss the base model's);
  4. tokenizes three short ChatML conversations (prompt and answer tokenized separately, loss on the answer
     and its <|im_end|>), and takes 3 AdamW steps on that batch (lr 1e-3 constant, betas 0.9/0.999, eps 1e-8,
     weight decay 0.1, gradient clipping at global norm 1.0), the loss being the mean cross-entropy over the
     batch's answer tokens;
  5. writes the token ids and masks, each step's loss and pre-clipping gradient norm, the loss after the last
     step, every adapter matrix's L2 change, and layers 0 and 29's adapters before and after.

With `--adapter DIR` it instead loads an adapter that `lorag train` exported (tests/fixtures/lorag-trained-qk:
rank 1 on q and k, the two matrices whose rows lorag permutes back to Hugging Face order) with
`PeftModel.from_pretrained` and writes the adapted model's next-token logits for two prompts, beside the base
model's, to OUT/peft-load-lorag-adapter.json; tests/lora.rs (`training::python_peft_reads_lorag_exports`) checks
that lorag's generator with the same adapter gives the same logits.

Usage (torch, transformers, peft, gguf, safetensors from PyPI; CPU is enough, ~1 min):
  python3 scripts/peft-reference.py models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures
  python3 scripts/peft-reference.py MODEL.gguf tests/fixtures --adapter tests/fixtures/lorag-trained-qk
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

MASK = (1 << 64) - 1
RANK, ALPHA, LR, WD, CLIP, STEPS = 8, 16.0, 1e-3, 0.1, 1.0, 3
B_AMP = np.float32(0.02)
KEEP_LAYERS = (0, 29)
CONVERSATIONS = [
    ("Answer briefly.", "What colour is the sky?", "Blue, on a clear day."),
    ("Answer briefly.", "Name a prime number.", "Seven is prime."),
    ("You sign off every answer.", "Where are the keys?", "In the top drawer. — Harbor Lane"),
]


class SplitMix64:
    """lorag's `train::Rng`: SplitMix64; `uniform` = top 24 bits / 2^24 as float32."""

    def __init__(self, seed):
        self.s = seed & MASK

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self):
        return np.float32(self.next_u64() >> 40) / np.float32(1 << 24)

    def symmetric(self, n, amp):
        """n draws of (u·2 − 1)·amp, in float32 arithmetic as lorag does it."""
        u = np.array([self.next_u64() >> 40 for _ in range(n)], dtype=np.float64)
        u = (u / float(1 << 24)).astype(np.float32)
        return (u * np.float32(2.0) - np.float32(1.0)) * np.float32(amp)


LOAD_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhere can I park my bike?<|im_end|>\n<|im_start|>assistant\n",
]


def check_adapter(gguf_path, out_dir, adapter_dir):
    from peft import PeftModel

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    base.eval()
    cases = []
    with torch.no_grad():
        for prompt in LOAD_PROMPTS:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            cases.append({"prompt": prompt, "ids": ids, "base": base(torch.tensor([ids])).logits[0, -1]})
        model = PeftModel.from_pretrained(base, adapter_dir)
        model.eval()
        for c in cases:
            adapted = model(torch.tensor([c["ids"]])).logits[0, -1]
            top = torch.topk(adapted, 5).indices.tolist()
            c["top5"] = [
                {"id": i, "adapted": round(float(adapted[i]), 5), "base": round(float(c["base"][i]), 5)} for i in top
            ]
            c["max_change"] = float((adapted - c["base"]).abs().max())
            del c["base"]
    out = {
        "note": "written by scripts/peft-reference.py --adapter (PeftModel.from_pretrained on transformers' GGUF load)",
        "adapter": os.path.relpath(os.path.abspath(adapter_dir), os.path.abspath(os.path.join(out_dir, ".."))),
        "cases": cases,
    }
    with open(os.path.join(out_dir, "peft-load-lorag-adapter.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(cases, indent=1))


def main():
    gguf_path, out_dir = sys.argv[1], sys.argv[2]
    if len(sys.argv) == 5 and sys.argv[3] == "--adapter":
        return check_adapter(gguf_path, out_dir, sys.argv[4])
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()  # no dropout anywhere; LoRA dropout is 0 too
    cfg = model.config

    # 1. The base model against the independent numpy reference.
    here = os.path.dirname(os.path.abspath(__file__))
    ref = json.load(open(os.path.join(here, "..", "..", "shared", "reference", "smollm2_135m_q4_1.json")))
    case = next(r for r in ref["results"] if r["case"] == "raw_base")
    with torch.no_grad():
        logits = model(torch.tensor([case["prompt_ids"]])).logits[0, -1]
    base_check = []
    for t in case["top5_next"]:
        got = float(logits[t["id"]])
        base_check.append({"id": t["id"], "reference": t["logit"], "transformers": round(got, 5)})
        assert abs(got - t["logit"]) < 1e-3, f"base model differs from the reference: {t} vs {got}"

    # 2. PEFT.
    lcfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none"
    )
    model = get_peft_model(model, lcfg)
    layers = model.base_model.model.model.layers

    # 3. Deterministic start.
    ra, rb = SplitMix64(1), SplitMix64(2)
    mods = []
    for i, layer in enumerate(layers):
        for tname in ("q_proj", "v_proj"):
            lin = getattr(layer.self_attn, tname)
            la, lb = lin.lora_A["default"], lin.lora_B["default"]
            out_f, in_f = lb.weight.shape[0], la.weight.shape[1]
            bound = np.float32(1.0) / np.sqrt(np.float32(in_f))
            a = ra.symmetric(RANK * in_f, bound).reshape(RANK, in_f)
            b = rb.symmetric(out_f * RANK, B_AMP).reshape(out_f, RANK)
            with torch.no_grad():
                la.weight.copy_(torch.from_numpy(a))
                lb.weight.copy_(torch.from_numpy(b))
            mods.append((i, tname, la, lb, a.copy(), b.copy()))

    # 4. The batch.
    seqs = []
    for system, user, answer in CONVERSATIONS:
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
        loss = [t + 1 >= len(p_ids) for t in range(len(ids) - 1)]
        seqs.append({"text": prompt + answer + "<|im_end|>", "ids": ids, "loss": loss})
    n_tok = sum(sum(s["loss"]) for s in seqs)

    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 * len(layers), len(params)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)

    def batch_loss(backward):
        total = 0.0
        for s in seqs:
            ids = torch.tensor([s["ids"]])
            logits = model(ids).logits[0, :-1]
            mask = torch.tensor(s["loss"])
            ce = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum") / n_tok
            if backward:
                ce.backward()
            total += float(ce)
        return total

    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(batch_loss(True))
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()
    with torch.no_grad():
        final = batch_loss(False)

    # 5. Output.
    changes, tensors = [], {}
    for i, tname, la, lb, a0, b0 in mods:
        a1 = la.weight.detach().numpy().astype(np.float32)
        b1 = lb.weight.detach().numpy().astype(np.float32)
        changes.append(
            {"layer": i, "target": tname, "a": float(np.linalg.norm(a1 - a0)), "b": float(np.linalg.norm(b1 - b0))}
        )
        if i in KEEP_LAYERS:
            stem = f"layers.{i}.{tname}"
            tensors[f"{stem}.lora_A.init"] = a0
            tensors[f"{stem}.lora_B.init"] = b0
            tensors[f"{stem}.lora_A.final"] = np.ascontiguousarray(a1)
            tensors[f"{stem}.lora_B.final"] = np.ascontiguousarray(b1)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "peft-train-smollm2.safetensors"))
    result = {
        "note": "written by scripts/peft-reference.py (PyTorch + PEFT, float32, CPU); see its docstring",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "gguf": getattr(__import__("gguf"), "__version__", "?"),
        },
        "model": name,
        "model_config": {
            "rope_theta": getattr(cfg, "rope_theta", None) or str(getattr(cfg, "rope_parameters", "")),
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "base_check": base_check,
        "lora": {"r": RANK, "alpha": ALPHA, "targets": ["q_proj", "v_proj"], "dropout": 0.0},
        "init": {"a": "SplitMix64(1), lorag LoraParams::init", "b": "SplitMix64(2), uniform ±0.02, HF rows", "b_amp": float(B_AMP)},
        "optimizer": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": WD, "max_grad_norm": CLIP, "steps": STEPS},
        "sequences": seqs,
        "loss_tokens": n_tok,
        "losses": losses,
        "grad_norms": norms,
        "final_loss": final,
        "changes": changes,
    }
    with open(os.path.join(out_dir, "peft-train-smollm2.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("base_check", "losses", "grad_norms", "final_loss", "loss_tokens")}, indent=1))


if __name__ == "__main__":
    main()
