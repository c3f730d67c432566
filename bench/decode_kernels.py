#!/usr/bin/env python3
"""Batch-1 decode, kernels only: the linear layers of one token of a GPT, 1 thread.

Times, for every linear layer of every block of the model (`--d-model`, `--d-ff`,
`--layers`; default the 113M GPT of bench/gpt-113m.yaml), one matrix-vector product with
  * fp32 (`torch.nn.functional.linear`),
  * weight-only int8 with bf16 activations (`torch._weight_int8pack_mm`: the kernel
    `strata quantize` models run on),
  * torch.ao dynamic int8 (fbgemm: int8 activations, VNNI dot products: the PyTorch
    baseline's int8 path),
interleaved, median of `--rounds`. It says how fast batch-1 decode can be on this machine
before attention, norms and per-token overhead, and which int8 kernel is faster.

    ~/.cache/strata/torch-2.11.0/bin/python bench/decode_kernels.py
"""
import argparse, json, time, warnings

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    d, f = a.d_model, a.d_ff
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)] * a.layers  # (in, out) of qkv, proj, fc1, fc2
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=gen) for i, o in shapes]
    scales = [w.abs().amax(1) / 127 for w in ws]
    qs = [(w / s[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous() for w, s in zip(ws, scales)]
    sb = [s.bfloat16() for s in scales]
    lins = []
    for (i, o), w in zip(shapes, ws):
        lin = torch.nn.Linear(i, o)
        lin.weight.data.copy_(w)
        lins.append(lin)
    ao = torch.ao.quantization.quantize_dynamic(torch.nn.ModuleList(lins), {torch.nn.Linear}, dtype=torch.qint8)
    xs = [torch.ones(1, i) for i, _ in shapes]
    xb = [x.bfloat16() for x in xs]
    kernels = {
        "fp32": lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)],
        "int8pack_bf16": lambda: [torch._weight_int8pack_mm(x, q, s) for x, q, s in zip(xb, qs, sb)],
        "torch_ao_int8": lambda: [m(x) for x, m in zip(xs, ao)],
    }
    times = {k: [] for k in kernels}
    with torch.inference_mode():
        for run in kernels.values():
            run()
        for _ in range(a.rounds):
            for k, run in kernels.items():
                t = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
    params = sum(w.numel() for w in ws)
    out = {"linear_params": params, "rounds": a.rounds}
    for k, v in times.items():
        med = sorted(v)[len(v) // 2]
        out[k] = {"ms_per_token": round(1e3 * med, 2), "tokens_per_s_bound": round(1 / med, 1)}
    out["fp32_weight_GBps"] = round(params * 4 / sorted(times["fp32"])[a.rounds // 2] / 1e9, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
