"""The run loop's components (train/loop.py, train/validation.py, train/metrics.py): each owns one
policy -- when to log, validate, save, end an epoch -- and is checked here without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pldr_llm.train.metrics import METRICS_FILE, MetricsWriter, read_metrics


def _writer_with_steps(run_dir: Path, steps: range) -> MetricsWriter:
    writer = MetricsWriter(run_dir, tensorboard=False)
    for step in steps:
        writer.write({"step": step, "loss": float(step)})
    return writer


def test_truncating_the_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    writer = _writer_with_steps(tmp_path, range(1, 6))
    writer.truncate_after(3)
    writer.write({"step": 4, "loss": 40.0})  # the resumed run appends after the kept records
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_a_failed_truncation_leaves_the_metrics_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _writer_with_steps(tmp_path, range(1, 6))
    before = (tmp_path / METRICS_FILE).read_bytes()
    calls = {"n": 0}
    real_dumps = json.dumps

    def dumps_failing_on_the_second_record(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr("pldr_llm.train.metrics.json.dumps", dumps_failing_on_the_second_record)
    with pytest.raises(OSError):
        writer.truncate_after(3)
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary left


# ---------------------------------------------------------------------- the loop's policies


def _trainer(**settings):
    """A Trainer on a one-layer model (nothing trained: the components only read its state)."""
    from pldr_llm import PLDRConfig, PLDRModel
    from pldr_llm.train import TrainConfig
    from pldr_llm.train.trainer import Trainer

    config = PLDRConfig(
        num_layers=1, d_model=16, num_heads=2, dff=24, A_dff=8, num_reslayerA=1, num_denseA=1,
        input_vocab_size=50, max_seq_len=16,
    )  # fmt: skip
    settings = {"device": "cpu", "progress": False, "tensorboard": False, **settings}
    return Trainer(PLDRModel(config), TrainConfig(**settings))


def test_a_checkpoint_is_due_at_every_listed_reason_and_never_twice(tmp_path: Path) -> None:
    from pldr_llm.train.loop import Checkpointer, MetricsLogger

    trainer = _trainer(save_every=5, save_steps=(3,), save_epochs=(1,), max_steps=20)
    checkpointer = Checkpointer(trainer, tmp_path, MetricsLogger(trainer, tmp_path))
    due = [step for step in range(1, 13) if checkpointer.is_due(step)]
    assert due == [3, 5, 10]
    assert checkpointer.is_due(7, epoch_save_due=True)  # an epoch listed in save_epochs ended
    checkpointer.last_saved = 10  # saved at the end of an epoch at step 10 already
    assert not checkpointer.is_due(10) and not checkpointer.is_due(10, epoch_save_due=True)


def test_validation_is_due_every_val_every_steps_and_only_with_data(tmp_path: Path) -> None:
    from pldr_llm.train.loop import MetricsLogger
    from pldr_llm.train.validation import Validator

    trainer = _trainer(val_every=4, max_steps=20)
    metrics = MetricsLogger(trainer, tmp_path)
    with_data = Validator(trainer, [torch.ones(2, 5, dtype=torch.long)], metrics)
    assert [s for s in range(1, 13) if with_data.should_validate(s)] == [4, 8, 12]
    assert not any(Validator(trainer, None, metrics).should_validate(s) for s in range(1, 13))
    assert not Validator(_trainer(), [], metrics).should_validate(4)  # val_every unset


class _EndlessData:
    """Batches of an endless iterator that reports the epoch it is in."""

    repeat = True

    def __init__(self, epochs: list[int]) -> None:
        self.epoch, self._epochs = 0, epochs

    def __iter__(self):
        for epoch in self._epochs:
            self.epoch = epoch
            yield torch.ones(2, 5, dtype=torch.long)


def test_an_endless_iterator_moving_on_ends_the_epoch_it_was_in() -> None:
    from pldr_llm.train.loop import EpochTracker

    trainer = _trainer(save_epochs=(1,), max_steps=20)
    epochs = EpochTracker(trainer, _EndlessData([0, 0, 2, 2]))
    epochs.start()
    try:
        ended = []
        while (fed := epochs.next_batch()) is not None:
            ended.append(epochs.data_moved_on(fed))
            epochs.took(fed)
            if ended[-1] is not None:
                save_due = epochs.save_due
    finally:
        epochs.close()
    assert ended == [None, None, 0, None]  # epoch 0 ended when the data reported epoch 2
    assert epochs.epoch == 2 and epochs.step_in_epoch == 2
    assert save_due  # epoch 1 is listed in save_epochs: its checkpoint follows that step


def test_steps_per_epoch_ends_an_epoch_and_the_data_is_told() -> None:
    from pldr_llm.train.loop import EpochTracker

    class Shuffled(list):
        told: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.told.append(epoch)

    trainer = _trainer(steps_per_epoch=2, max_steps=20)
    data = Shuffled([torch.ones(2, 5, dtype=torch.long)] * 3)
    epochs = EpochTracker(trainer, data)
    epochs.start()
    try:
        over = []
        for _ in range(2):
            epochs.took(epochs.next_batch())
            over.append(epochs.is_over())
        epochs.advance()
        epochs.rewind()
    finally:
        epochs.close()
    assert over == [False, True]
    assert (epochs.epoch, epochs.step_in_epoch, data.told) == (1, 0, [1])
