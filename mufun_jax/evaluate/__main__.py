from mufun_jax.evaluate.cli import entry

entry()
