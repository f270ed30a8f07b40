"""The built-in presets: each builds (on the ``meta`` device, no memory), follows the paper's
sizing rules, and has the shape and parameter counts docs/training.md documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.presets import PRESETS, load_preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
SCALED = ("paper-110m", "pldr-350m", "pldr-1b")
METRIC_LEARNER = ("reslayerAs.", "plgatt_layer.", "layernorm1.")


def _documented() -> dict[str, list[str]]:
    """The rows of the presets table in docs/training.md, by preset name."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([\w-]+)` \|(.*)\|\s*$", line)
        if match and match.group(1) in PRESETS:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def _meta_model(name: str) -> PLDRModel:
    with torch.device("meta"):
        return PLDRModel(PLDRConfig(**load_preset(name)["model"]))


def test_every_preset_loads_and_the_scaled_ones_are_documented() -> None:
    assert set(SCALED) <= set(PRESETS)
    assert set(_documented()) == set(SCALED)


@pytest.mark.parametrize("name", SCALED)
def test_preset_follows_the_sizing_rules(name: str) -> None:
    preset = load_preset(name)
    model, train = preset["model"], preset["train"]
    dk = model["d_model"] // model["num_heads"]
    assert model["d_model"] == 64 * model["num_heads"] and dk == 64
    assert model["dff"] == int(model["d_model"] * 4 * 2 / 3)
    assert model["A_dff"] == int(4 * dk * 2 / 3)
    assert (model["num_reslayerA"], model["num_denseA"]) == (8, 2)
    assert train["context_length"] == model["max_seq_len"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCALED)
def test_documented_shape_and_parameter_counts(name: str) -> None:
    row = _documented()[name]
    model = _meta_model(name)
    config = model.config
    layers, d_model, heads, dff, a_dff, context, total, learner, embedding = row
    assert int(layers) == config.num_layers
    assert int(d_model) == config.d_model
    assert heads == f"{config.num_heads} × {config.depth}"
    assert (int(dff), int(a_dff), int(context)) == (config.dff, config.A_dff, config.max_seq_len)
    counted_learner = sum(
        p.numel()
        for layer in model.decoder.dec_layers
        for key, p in layer.mha1.named_parameters()
        if key.startswith(METRIC_LEARNER)
    )
    assert int(total.replace(",", "")) == model.num_parameters()
    assert int(learner.replace(",", "")) == counted_learner
    assert int(embedding.replace(",", "")) == model.decoder.embedding.weight.numel()
    # the name says the size: within 5% of 110M, 350M, 1B
    nominal = {"paper-110m": 110e6, "pldr-350m": 350e6, "pldr-1b": 1e9}[name]
    assert abs(model.num_parameters() / nominal - 1) < 0.05


@pytest.mark.parametrize("name", ("pldr-350m", "pldr-1b"))
def test_new_presets_resolve_into_a_run(name: str, tmp_path: Path) -> None:
    """What ``pldr-llm train --preset NAME`` checks before anything slow: the run resolves, with
    the context the model holds and checkpointing settable on top."""
    from pldr_llm.train.runconfig import prepare_run

    run = prepare_run(
        tmp_path / "run", preset=name, overrides={"train.activation_checkpointing": "layer"}
    )
    assert run.context_length == run.model["max_seq_len"] == 2048
    assert run.train.activation_checkpointing == "layer"
    assert not (tmp_path / "run" / "run.yaml").exists()  # nothing written before the run starts
