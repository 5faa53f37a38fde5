#!/usr/bin/env python3
"""Batched inference: ``python infer.py MODEL requests.jsonl --output answers.jsonl [--score]`` (see README)."""

import sys

from mufun_jax.infer_cli import infer_entry

if __name__ == "__main__":
    infer_entry()
