"""The training / evaluation input pipeline on Grain.

records -> shuffle (seed; reshuffled each epoch) -> this host's shard -> prepare (decode, resample,
chunk, tokenise; in worker processes) -> :class:`~mufun_jax.data.packing.Packer` -> fixed-shape
host batches -> (optionally) global arrays on the mesh.

The order is deterministic for a seed. ``get_state()`` / ``set_state()`` capture the Grain
iterator at the exact sample that opens the next batch, plus the skip counts, so a run restored
from a checkpoint continues with the same batches it would have produced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mufun_jax.data.dataset import Prepare, SkipCounter, read_records
from mufun_jax.data.packing import PackConfig, Packer
from mufun_jax.data.templates import get_template


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    dataset: str
    pack: PackConfig
    template: str = "qwen2_instruct"
    audio_root: str | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int = 1
    worker_count: int = 0  # Grain worker processes for decoding / tokenising
    process_index: int = 0
    process_count: int = 1


class Loader:
    def __init__(self, cfg: LoaderConfig, tokenizer):
        import grain

        if not 0 <= cfg.process_index < cfg.process_count:
            raise ValueError(f"process_index={cfg.process_index} must be in [0, process_count={cfg.process_count})")
        self.cfg = cfg
        self.counter = SkipCounter()
        records = read_records(Path(cfg.dataset), self.counter)
        ds = grain.MapDataset.source(records)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)
        ds = ds[cfg.process_index::cfg.process_count]  # each host reads only its own shard
        ds = ds.map(Prepare(get_template(cfg.template), tokenizer, cfg.audio_root)).to_iter_dataset()
        if cfg.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we are not an absl app
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
        self._ds = ds
        self._it = iter(ds)
        self._max_skips = -(-len(records) // cfg.process_count)  # one whole pass of this host's shard
        self._packer = Packer(cfg.pack, self.counter, self._max_skips)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._packer.next_batch(self._it, self._it.get_state)
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict:
        """Where the next batch starts, and the skip counts so far (JSON-serialisable)."""
        state = self._packer.resume_state if self._packer.resume_state is not None else self._it.get_state()
        return {"grain": state, "skipped": dict(self.counter)}

    def set_state(self, state: dict) -> None:
        self._it = iter(self._ds)
        self._it.set_state(state["grain"])
        self._packer = Packer(self.cfg.pack, self.counter, self._max_skips)
        self.counter.clear()
        self.counter.update(state.get("skipped", {}))
