"""The outside reference for `strata prune --method neurons` (tests/tests/prune_neurons.rs).

    HF_HUB_OFFLINE=1 ~/.cache/strata/torch-2.11.0/bin/python tests/python/neuron_reference.py \
        HF_DIR SPARSITY MULTIPLE_OF TOKENS_JSON OUT.safetensors

Loads the DENSE model (a `strata export --format hf` directory) with transformers,
ranks each layer's MLP hidden units on its own (the L2 norm of every weight attached to
the unit: GPT-2 c_fc column + c_fc bias + c_proj row; LLaMA gate_proj row + up_proj row
+ down_proj column, in transformers' layouts), keeps round(f (1 - S) / m) m of them
(at least m, ties to the lower index), ZEROES the others in place (the dense shapes stay),
and writes "logits" [b, s, V] for the token ids in TOKENS_JSON ([[...], ...]) plus
"kept" (the kept count per layer) to OUT.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def mlp_parts(model, layer):
    """(tensor, unit dimension) of every weight attached to a hidden unit."""
    if model.config.model_type == "gpt2":
        mlp = model.transformer.h[layer].mlp
        # Conv1D stores [in, out]: c_fc [d, f] columns, c_proj [f, d] rows.
        return [(mlp.c_fc.weight, 1), (mlp.c_fc.bias, 0), (mlp.c_proj.weight, 0)]
    mlp = model.model.layers[layer].mlp
    # nn.Linear stores [out, in]: gate/up [f, d] rows, down [d, f] columns.
    return [(mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1)]


def main():
    hf_dir, sparsity, multiple, tokens, out = sys.argv[1:6]
    sparsity, multiple = float(sparsity), int(multiple)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    kept = []
    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            parts = mlp_parts(model, layer)
            score = None
            for t, dim in parts:
                sq = t.double().square()
                per_unit = sq if sq.dim() == 1 else sq.sum(dim=1 - dim)
                score = per_unit if score is None else score + per_unit
            score = score.sqrt()
            f = score.numel()
            most = f - f % multiple
            # Half away from zero, as Rust rounds.
            k = min(max(int(f * (1.0 - sparsity) / multiple + 0.5) * multiple, multiple), most)
            order = torch.argsort(score, descending=True, stable=True)
            drop = order[k:]
            for t, dim in parts:
                t.index_fill_(dim, drop, 0.0)
            kept.append(k)
        ids = torch.tensor(json.load(open(tokens)), dtype=torch.long)
        logits = model(ids).logits.float().contiguous()
    save_file({"logits": logits, "kept": torch.tensor(kept, dtype=torch.long)}, out)


if __name__ == "__main__":
    main()
