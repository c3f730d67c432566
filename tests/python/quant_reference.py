"""Outside reference for Strata's weight-only int8 (`strata quantize`): PyTorch's own
per-channel symmetric qint8 quantisation (torch.ao observer + torch.quantize_per_channel).

Usage: quant_reference.py IN.safetensors OUT.safetensors
IN holds `weight` ([in, out], Strata's layout). OUT gets `codes` ([out, in], int8) and
`scales` ([out], f32) as torch computes them for the weight in nn.Linear's [out, in]
layout, with the observer's range set to [-127, 127] (symmetric, as Strata stores).
"""
import sys

import torch
from safetensors.torch import load_file, save_file
from torch.ao.quantization.observer import PerChannelMinMaxObserver


def main(src, dst):
    w = load_file(src)["weight"].t().contiguous()  # nn.Linear layout [out, in]
    obs = PerChannelMinMaxObserver(
        ch_axis=0,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        quant_min=-127,
        quant_max=127,
    )
    obs(w)
    scales, zero_points = obs.calculate_qparams()
    q = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
    save_file(
        {"codes": q.int_repr().contiguous(), "scales": scales.float().contiguous()},
        dst,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
