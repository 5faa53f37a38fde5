"""``python -m mufun_jax.eval``: the same as ``python -m mufun_jax.evaluate`` (``mufun-eval``)."""

if __name__ == "__main__":
    from mufun_jax.evaluate.cli import entry

    entry()
