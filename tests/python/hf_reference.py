"""The outside reference for Strata's Hugging Face tests: transformers + PyTorch autograd.

Run with the cached venv (scripts/setup.sh installs transformers into it), offline:

    HF_HUB_OFFLINE=1 ~/.cache/strata/torch-2.11.0/bin/python tests/python/hf_reference.py JOBS.json

JOBS.json is a list of jobs, run in order in one process (importing torch and
transformers once costs seconds). Each job is an object with an "op":

* {"op": "make", "arch": "gpt2" | "llama", "config": {...}, "seed": N, "out": DIR,
   "perturb": true}
  builds a randomly initialised GPT2LMHeadModel / LlamaForCausalLM from the config
  fields (nothing is downloaded) and saves it with save_pretrained (safetensors). With
  "perturb", every parameter gets N(0, 0.02) noise added, so that biases and norm
  weights (initialised to 0 and 1) are not trivial and a mapping error shows.

* {"op": "run", "model": DIR, "tokens": {"inputs": [[...]], "targets": [[...]]},
   "out": FILE, "backward": true}
  loads DIR with from_pretrained (fp32, eager attention, eval mode: no dropout) and
  writes FILE (safetensors) with "logits" [b, s, V], "loss" (mean cross-entropy of the
  logits against the targets, as Strata computes it) and, with "backward", "grad.NAME"
  for every parameter after loss.backward(); the file's metadata holds the loading info
  ("missing_keys", "unexpected_keys", "mismatched_keys" as JSON lists) and "loss" as text.

* {"op": "generate", "model": DIR, "prompts": [[...], ...], "max_new_tokens": N, "out": FILE}
  loads DIR as "run" does and writes FILE (JSON) with "tokens": for each prompt, the N
  new ids of model.generate(do_sample=False) (greedy; no end-of-sequence stop).
"""

import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

MODELS = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM)}


def make(job):
    config_cls, model_cls = MODELS[job["arch"]]
    torch.manual_seed(job.get("seed", 0))
    model = model_cls(config_cls(**job["config"])).float()
    if job.get("perturb", True):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(job["out"], safe_serialization=True)


def as_list(keys):
    return json.dumps(sorted(str(k) for k in keys))


def run(job):
    model, info = AutoModelForCausalLM.from_pretrained(
        job["model"],
        output_loading_info=True,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    inputs = torch.tensor(job["tokens"]["inputs"], dtype=torch.long)
    targets = torch.tensor(job["tokens"]["targets"], dtype=torch.long)
    backward = job.get("backward", False)
    with torch.set_grad_enabled(backward):
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    out = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape([])}
    if backward:
        loss.backward()
        for name, p in model.named_parameters():
            out["grad." + name] = p.grad.detach().contiguous()
    meta = {
        "missing_keys": as_list(info.get("missing_keys", [])),
        "unexpected_keys": as_list(info.get("unexpected_keys", [])),
        "mismatched_keys": as_list(info.get("mismatched_keys", [])),
        "loss": repr(loss.item()),
        "model_class": type(model).__name__,
    }
    save_file(out, job["out"], metadata=meta)


def generate(job):
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    n = job["max_new_tokens"]
    tokens = []
    for prompt in job["prompts"]:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
            )
        tokens.append(out[0, len(prompt):].tolist())
    with open(job["out"], "w") as f:
        json.dump({"tokens": tokens}, f)


def main():
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        {"make": make, "run": run, "generate": generate}[job["op"]](job)


if __name__ == "__main__":
    main()
