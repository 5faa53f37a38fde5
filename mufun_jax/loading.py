"""Model assembly: the one path from files on disk to a ready :class:`mufun_jax.models.MuFun`.

A model comes from a model directory (:mod:`mufun_jax.checkpoint`, our layout) or a PyTorch
MuFun directory (:mod:`mufun_jax.weights`, converted one tensor at a time), optionally with a PEFT
LoRA adapter merged in (:mod:`mufun_jax.peft_format`), weight-only quantisation
(:mod:`mufun_jax.models.quant`) and a device mesh (:mod:`mufun_jax.sharding`). This module sits
above all of them and none of them imports it, so loading reads top to bottom:
``MuFun.from_pretrained``, the CLIs and the trainer call :func:`load_model`, which calls down.

Nothing is randomly initialised: the module is built abstractly (:func:`abstract_model`) and
each parameter is read, cast and placed once, straight into its dtype and sharding.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from mufun_jax import checkpoint, weights
from mufun_jax.config import MuFunConfig
from mufun_jax.errors import CheckpointError
from mufun_jax.models import MuFun
from mufun_jax.models.quant import quantize_params
from mufun_jax.peft_format import load_adapter
from mufun_jax.run_settings import RunSettings
from mufun_jax.sharding import make_mesh, param_shardings


def abstract_model(cfg: MuFunConfig, run: RunSettings | None = None) -> MuFun:
    """The MuFun module with shapes only (no memory, no random init)."""
    return nnx.eval_shape(lambda: MuFun(cfg, run, rngs=nnx.Rngs(0)))


def abstract_params(model, mesh=None) -> dict:
    """``jax.ShapeDtypeStruct`` per variable (nested like ``nnx.to_pure_dict``), sharded over
    ``mesh`` by the logical axes, or on the default device."""
    state = nnx.to_pure_dict(nnx.state(model))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev), state)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                        nnx.to_pure_dict(param_shardings(model, mesh)))


def load_model(path, run: RunSettings | None = None, *, mesh=None, adapter=None) -> MuFun:
    """A :class:`mufun_jax.models.MuFun` with the weights of a model directory or of a PyTorch
    MuFun checkpoint (the released combined layout or the per-component folders). ``run`` sets
    dtypes, remat, attention backend and quantisation (default ``RunSettings()``). ``adapter``: a
    PEFT LoRA adapter directory merged into the float weights, before any quantisation. ``mesh``
    shards the parameters by their logical axes (default: the default device)."""
    path = Path(path) if "://" not in str(path) else path
    cfg, sources = _open(path)
    run = run or RunSettings()
    if not run.quantize and adapter is None:
        return _read(path, cfg, sources, run, mesh)
    # float weights first: in host memory when they are to be quantised, else where they will stay
    model = _read(path, cfg, sources, run.replace(quantize=None), _host_mesh() if run.quantize else mesh)
    if adapter is not None:
        load_adapter(model, adapter)
    return quantize_model(model, run, mesh) if run.quantize else model


def quantize_model(host_model: MuFun, run: RunSettings, mesh=None) -> MuFun:
    """``host_model`` (float weights, best in host memory) quantised as ``run`` says (leaf by leaf
    on the host CPU), placed on ``mesh`` (default: the default device)."""
    model = abstract_model(host_model.cfg, run)
    graphdef, state = nnx.split(model)
    target = flatten_dict(abstract_params(model, mesh))
    with jax.default_device(jax.devices("cpu")[0]):
        quantized = flatten_dict(quantize_params(nnx.to_pure_dict(nnx.state(host_model)), nnx.to_pure_dict(state)))
    del host_model
    params = {p: jax.device_put(leaf, target[p].sharding) for p, leaf in quantized.items()}  # one leaf at a time
    nnx.replace_by_pure_dict(state, unflatten_dict(params))
    return nnx.merge(graphdef, state)


def _open(path) -> tuple[MuFunConfig, dict | None]:
    """(config, PyTorch sources or None for a model directory) of ``path``; a clear error when it
    is neither."""
    if checkpoint.has_model(path):
        return checkpoint.load_config(path), None
    if isinstance(path, Path) and not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    try:
        cfg, sources, _ = weights.open_source(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: neither a MuFun model directory ({checkpoint.CONFIG_NAME} + "
                              f"{checkpoint.PARAMS_DIR}/) nor a PyTorch MuFun checkpoint: {e}") from e
    return cfg, sources


def _read(path, cfg: MuFunConfig, sources: dict | None, run: RunSettings, mesh) -> MuFun:
    """The model of ``cfg`` and ``run`` with every parameter read from ``path`` onto ``mesh``."""
    model = abstract_model(cfg, run)
    graphdef, state = nnx.split(model)
    abstract = abstract_params(model, mesh)
    if sources is None:
        params = checkpoint.load_params(path, abstract)
    else:
        want = flatten_dict(abstract)
        params = {}
        for p, host in weights.stream_torch_params(cfg, sources):
            params[p] = jax.device_put(host.astype(want[p].dtype, copy=False), want[p].sharding)
            del host
        params = unflatten_dict(params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _host_mesh():
    """A one-device mesh on the host CPU: where float weights wait to be quantised."""
    return make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
