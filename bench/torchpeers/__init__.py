"""PyTorch peers of Strata for the side-by-side benchmarks in bench/.

They read the same YAML config as `strata launch`, build the same GPT with the same initial
weights (Strata's keyed SplitMix64 streams, ported in `rng`) and train on the same batches,
so a peer's step-1 loss equals Strata's: the two sides do equal work.
"""
