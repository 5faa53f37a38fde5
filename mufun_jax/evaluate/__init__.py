"""Multiple-choice evaluation as MuCUE-Bench publishes it (``mufun-eval``).

- :mod:`.data`: MuCUE's layout (save_to_disk, parquet/arrow) and MuFun-style JSON -> items, and the
  protocol prompt;
- :mod:`.extract`: the regex extractor and the OpenAI-compatible one (MuCUE-Bench's Qwen3 step);
- :mod:`.scoring`: accuracy per subset, Wilson intervals, the subset average, McNemar, reports;
- :mod:`.run`: the resumable, shardable loop over models and items through the engine;
- :mod:`.cli`: the command line. See docs/evaluating.md.

Importing this package is cheap: jax, datasets and matplotlib load only when used.
"""

from mufun_jax.evaluate.data import PROTOCOL_PREFIX, load_subsets, protocol_prompt  # noqa: F401
from mufun_jax.evaluate.extract import EXTRACT_TEMPLATE, OpenAIExtractor, protocol_message, regex_extract  # noqa: F401

__all__ = ["PROTOCOL_PREFIX", "EXTRACT_TEMPLATE", "OpenAIExtractor", "load_subsets", "protocol_message",
           "protocol_prompt", "regex_extract"]
