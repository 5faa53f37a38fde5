#!/usr/bin/env python3
"""Train MuFun: ``python train.py --config configs/demo.yaml [key=value ...]`` (see README)."""

import sys

from mufun_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
