"""The side-by-side benchmark driver behind bench/compare.py (Strata against its PyTorch
peers, interleaved). It builds nothing: it runs a given `strata` binary and the venv's
Python, and never imports torch itself."""
