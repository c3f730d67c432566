#!/usr/bin/env python3
"""Strata against fair PyTorch peers on this machine, interleaved, with the ratio tables of
issues 12 (training) and 10 (decoding). Builds nothing; see bench/README.md.

    python3 bench/compare.py train  --strata target/release/strata [--reps 3 --steps 12]
    python3 bench/compare.py decode --strata target/release/strata [--checkpoint demo:fp32=DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from driver import decode, train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    train.add_args(sub.add_parser("train", help="training tokens/s and MFU per layout"))
    decode.add_args(sub.add_parser("decode", help="prefill/decode tokens/s, fp32 and int8"))
    args = ap.parse_args()
    if not os.access(args.strata, os.X_OK):
        raise SystemExit(f"--strata {args.strata}: not an executable; fix: cargo build "
                         "--release --workspace, then pass target/release/strata")
    args.strata = os.path.abspath(args.strata)
    return (train if args.command == "train" else decode).main(args)


if __name__ == "__main__":
    sys.exit(main())
