"""PLDRConfig: hyperparameter dictionaries, published hyperparameter files, JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from pldr_llm import PLDRConfig, PLDRError, read_hyperparameters_file


def test_from_hpdict_ignores_training_keys_and_round_trips(golden_case):
    hp = dict(golden_case["hpdict"], learning_rate=1e-3, warmup_steps=4, save_type="torch")
    config = PLDRConfig.from_hpdict(hp)
    assert config.depth == hp["d_model"] // hp["num_heads"]
    assert PLDRConfig.from_hpdict(config.to_hpdict()) == config
    assert PLDRConfig.from_json(config.to_json()) == config


def test_unknown_key_is_named():
    with pytest.raises(PLDRError, match="'num_layrs'"):
        PLDRConfig.from_hpdict({"num_layrs": 2, "d_model": 64})


def test_the_run_keys_are_left_to_the_trainer_and_a_misspelt_model_key_is_named(golden_case):
    """The model's config reads the model's keys of an original hpdict; every key of the run
    (train/config.py's, the core names none of them) passes through to TrainConfig, and a key
    spelt like a model key is refused with its likely meaning."""
    import pldr_llm.core.config as core_config
    from pldr_llm.train.config import IGNORED_KEYS, TRAINING_KEYS, TrainConfig

    hp = dict(golden_case["hpdict"])
    expected = PLDRConfig.from_hpdict(hp)
    run_keys = TRAINING_KEYS | IGNORED_KEYS | set(TrainConfig.field_names())
    assert PLDRConfig.from_hpdict({**hp, **dict.fromkeys(run_keys, 1)}) == expected
    source = Path(core_config.__file__).read_text(encoding="utf-8")
    assert not [key for key in TRAINING_KEYS if f'"{key}"' in source]
    for typo, meant in [("num_head", "num_heads"), ("max_seq_length", "max_seq_len")]:
        with pytest.raises(PLDRError, match=f"'{typo}' \\(did you mean '{meant}'\\?\\)"):
            PLDRConfig.from_hpdict({**hp, typo: 1})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 65}, "divisible"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_layers": -1}, "num_layers"),
        ({"activation": "swish2"}, "activation"),
        ({"d_model": 36, "num_heads": 4}, "even"),
    ],
)
def test_impossible_shapes_are_clear_errors(changes, message):
    hp = {
        "num_layers": 2,
        "d_model": 64,
        "num_heads": 4,
        "dff": 96,
        "A_dff": 24,
        "num_reslayerA": 1,
        "num_denseA": 1,
        "input_vocab_size": 300,
    }
    hp.update(changes)
    with pytest.raises(PLDRError, match=message):
        PLDRConfig.from_hpdict(hp)


def test_published_hyperparameters_file(paper_hyperparameters_file):
    path = paper_hyperparameters_file
    hp = read_hyperparameters_file(path)
    assert hp["activation"] == "silu" and hp["fsdp_sharding_strategy"] == "HYBRID_SHARD"
    config = PLDRConfig.from_hyperparameters_file(path)
    assert (config.num_layers, config.d_model, config.num_heads, config.depth) == (5, 896, 14, 64)
    assert (config.num_reslayerA, config.num_denseA, config.A_dff) == (8, 2, 170)
    assert config.input_vocab_size == 32000 and config.max_seq_len == 1024


@pytest.mark.parametrize(
    "body",
    [
        "import os\nos.system('touch {marker}')\nhpdict={{'num_layers': 1}}\n",
        "hpdict={{'num_layers': __import__('os').system('touch {marker}')}}\n",
        "import torch.nn.functional as F\nhpdict={{'activation': F.dropout}}\n",
    ],
)
def test_hyperparameters_file_is_never_executed(tmp_path: Path, body: str):
    marker = tmp_path / "ran"
    path = tmp_path / "evil_hyperparameters.py"
    path.write_text(body.format(marker=marker))
    with pytest.raises(PLDRError):
        read_hyperparameters_file(path)
    assert not marker.exists()
