#!/usr/bin/env python3
"""Convert MuFun weights: ``python convert_weights.py import|export ...`` (see ``--help`` and docs/convert.md)."""

import sys

from mufun_jax.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
