"""Outside reference for `strata prune`: PyTorch's own pruning of nn.Linear weights.

Usage: prune_reference.py IN.safetensors OUT.safetensors SPARSITY
IN holds `w0`, `w1`, ... in Strata's [in, out] layout. OUT gets, in nn.Linear's [out, in]
layout, `layer{i}` (torch.nn.utils.prune.l1_unstructured, amount = round(s * numel)),
`global{i}` (prune.global_unstructured with L1Unstructured over all weights) and `two4_{i}`
(torch.ao.pruning.WeightNormSparsifier, 1x4 blocks with 2 zeros per block: 2:4).
"""
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune


def linears(ws):
    out = []
    for w in ws:
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w.t())
        out.append(lin)
    return out


def main(src, dst, s):
    d = load_file(src)
    ws = [d[f"w{i}"] for i in range(len(d))]
    res = {}
    for i, lin in enumerate(linears(ws)):
        prune.l1_unstructured(lin, "weight", amount=round(s * lin.weight.numel()))
        res[f"layer{i}"] = lin.weight_mask.to(torch.uint8).contiguous()
    lins = linears(ws)
    total = sum(w.numel() for w in ws)
    prune.global_unstructured(
        [(lin, "weight") for lin in lins],
        pruning_method=prune.L1Unstructured,
        amount=round(s * total),
    )
    for i, lin in enumerate(lins):
        res[f"global{i}"] = lin.weight_mask.to(torch.uint8).contiguous()
    model = nn.Sequential(*linears(ws))
    sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sp.prepare(model, config=[{"tensor_fqn": f"{i}.weight"} for i in range(len(ws))])
    sp.step()
    for i in range(len(ws)):
        mask = model[i].parametrizations.weight[0].mask
        res[f"two4_{i}"] = mask.to(torch.uint8).contiguous()
    save_file(res, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
