"""``mufun-serve``: an OpenAI-compatible chat server on the continuous-batching engine (docs/serving.md).

FastAPI and uvicorn are optional dependencies (``pip install mufun-jax[serve]``); importing this
package needs them."""

from mufun_jax.serve.app import ServeSettings, create_app  # noqa: F401
from mufun_jax.serve.messages import AudioPolicy, ServeError  # noqa: F401
