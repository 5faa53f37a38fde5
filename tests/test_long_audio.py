"""A 10-minute song (20 chunks, 6,000 audio tokens) beside short requests: its prefix is prefilled
in ``prefill_chunk`` pieces, the answers equal each request's answer alone, and another long song
compiles nothing new (no program per request)."""

import numpy as np
import pytest
from flax import nnx

from helpers import small_cfg
from mufun_jax.config import IMAGE_TOKEN_INDEX as AUDIO
from mufun_jax.engine import Generator
from mufun_jax.generate import Request
from mufun_jax.models import MuFun

SR = 16000


@pytest.mark.slow
def test_a_ten_minute_song_runs_beside_short_requests():
    cfg = small_cfg()
    model = MuFun(cfg, rngs=nnx.Rngs(2))
    model.language_model.lm_head.kernel[...] = model.language_model.lm_head.kernel[...] * 8.0
    rng = np.random.default_rng(0)
    song = lambda seconds: (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    long_a, long_b = song(600), song(590)  # 20 chunks each
    shorts = [song(s) for s in (3, 7, 12)]
    kw = dict(max_new_tokens=6, batch_size=4, buckets=(64, 1024, 6144), prefill_chunk=512, prefill_batch=2,
              chunk_buckets=(1, 2, 4, 32), eos_token_id=())
    gen = Generator(model, **kw)
    assert gen.max_chunks == 20
    reqs = lambda long: ([Request([5, 6, AUDIO, 7, 8], [long], seed=1)]
                         + [Request([5, 6, AUDIO, 9 + i], [x], seed=2 + i) for i, x in enumerate(shorts)])
    together = gen.generate(reqs(long_a))
    assert gen.check(reqs(long_a)[0]) == 6000 + 4  # 20 chunks x 300 tokens, plus the text
    compiles = dict(gen.compiles)
    alone = Generator(model, **kw)
    for r, t in zip(reqs(long_a), together):
        np.testing.assert_array_equal(alone.generate([r])[0].token_ids, t.token_ids)
    gen.generate(reqs(long_b))  # another long song, the same short ones: nothing new to compile
    assert dict(gen.compiles) == compiles, (compiles, gen.compiles)
