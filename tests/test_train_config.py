"""TrainConfig, the schedule, and config resolution of ``pldr-llm train`` (no training)."""

from __future__ import annotations

import pytest

from pldr_llm.core.errors import PLDRError
from pldr_llm.train import TrainConfig, lr_multiplier


def test_schedule_shape() -> None:
    assert lr_multiplier(0, 100, 10, 0.1) == 0.0  # step 0 at rate 0
    assert lr_multiplier(5, 100, 10, 0.1) == 0.5
    assert lr_multiplier(10, 100, 10, 0.1) == 1.0
    assert lr_multiplier(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10_000, 100, 10, 0.1) == pytest.approx(0.1)  # clamped, not cycling
    assert lr_multiplier(0, 100, 0, 0.1) == 1.0  # no warm-up: start at the peak
    values = [lr_multiplier(s, 100, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_scheduler_state_round_trip() -> None:
    import torch

    from pldr_llm.train import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, 100, 10, 0.1)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([param], lr=1.0)
    sched2 = build_scheduler(opt2, 100, 10, 0.1)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.7]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"warmup_steps": 500, "lr_total_steps": 100}, "warmup_steps"),
        ({"lr_alpha": 2.0}, "lr_alpha"),
        ({"dag_reg_coeffs": (0.1, 0.1)}, "dag_reg_coeffs"),
        ({"fsdp_sharding_strategy": "SHARD_EVERYTHING"}, "fsdp_sharding_strategy"),
        ({"batch_size": 0}, "batch_size"),
        ({"save_type": "zip"}, "save_type"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(PLDRError, match=key):
        TrainConfig(**kwargs)


def test_unknown_key_is_named() -> None:
    with pytest.raises(PLDRError, match="learning_rte"):
        TrainConfig.from_dict({"learning_rte": 1e-3})
    with pytest.raises(PLDRError, match="warmup"):
        TrainConfig.from_hpdict({"warmup": 10})


def test_from_hpdict_takes_the_originals_keys() -> None:
    hpdict = {
        "num_layers": 5,  # architecture keys are skipped
        "d_model": 896,
        "activation": "silu",
        "epochs": 1,
        "save_model_path": "my-model",
        "warmup_steps": 2000,
        "lr_total_steps": 250000,
        "learning_rate": 1.5e-3,
        "DAG_reg_coeffs": [0.05, 0.05, 0.05],
        "lr_alpha": 0.1,
        "adamw_decay": 0.1,
        "disable_amp": False,
        "auto_size_minimum": None,
        "disable_fsdp_mixed_precision": False,
        "fsdp_cpu_offload": False,
        "fsdp_sharding_strategy": "HYBRID_SHARD",
        "backward_prefetch": "PRE",
        "save_type": "torch",
        "device": "cuda",
    }
    cfg = TrainConfig.from_hpdict(hpdict)
    assert cfg.learning_rate == 1.5e-3
    assert cfg.dag_reg_coeffs == (0.05, 0.05, 0.05) and cfg.use_dag_loss
    assert cfg.fsdp_sharding_strategy == "HYBRID_SHARD"
    assert cfg.run_name == "my-model"
    assert cfg.weight_decay == 0.1
    back = cfg.to_hpdict()
    assert back["DAG_reg_coeffs"] == [0.05, 0.05, 0.05] and back["save_type"] == "torch"
    # train_batches_cnt is steps per epoch and, as in the original, the schedule's length
    cfg = TrainConfig.from_hpdict({"train_batches_cnt": 300, "warmup_steps": 10})
    assert cfg.steps_per_epoch == 300 and cfg.lr_total_steps == 300


def test_batch_and_world_size() -> None:
    assert TrainConfig(batch_size=16).resolve_batch_size(4) == 16
    assert TrainConfig(global_batch_size=32).resolve_batch_size(4) == 8
    with pytest.raises(PLDRError, match="global_batch_size"):
        TrainConfig(global_batch_size=30).resolve_batch_size(4)
    with pytest.raises(PLDRError, match="grad_accum_steps"):
        TrainConfig(batch_size=16, grad_accum_steps=3).resolve_batch_size(1)


# ---------------------------------------------------------------------- the command's resolution
def _print_config(capsys, *argv: str) -> dict:
    import yaml

    from pldr_llm.cli import main

    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_overrides_and_original_aliases(capsys) -> None:
    cfg = _print_config(
        capsys,
        "--preset",
        "tiny",
        "--train.learning_rate",
        "1e-3",
        "--warmup-steps",
        "7",
        "--batch_size",
        "8",
        "--context_length",
        "64",
        "--num_reslayerA",
        "1",
        "--dk",
        "16",
        "--DAG_reg_coeffs",
        "0.05",
        "0.05",
        "0.05",
        "--fsdp_sharding_strategy",
        "hybrid_shard",
        "--chkpt_batches",
        "10",
        "20",
        "--disable_amp",
        "--dataset_column_label",
        "content",
        "--master_port",
        "12345",
    )
    train, model, data = cfg["train"], cfg["model"], cfg["data"]
    assert train["learning_rate"] == 1e-3 and train["warmup_steps"] == 7
    assert train["batch_size"] == 8 and train["context_length"] == 64
    assert train["dag_reg_coeffs"] == [0.05, 0.05, 0.05]
    assert train["fsdp_sharding_strategy"] == "HYBRID_SHARD"
    assert train["save_steps"] == [10, 20] and train["disable_amp"] is True
    assert model["num_reslayerA"] == 1 and model["d_model"] == 4 * 16
    assert data["column"] == "content"
    # --max-steps never touches the schedule's length
    cfg = _print_config(capsys, "--preset", "tiny", "--max-steps", "50")
    assert cfg["train"]["max_steps"] == 50 and cfg["train"]["lr_total_steps"] == 200
    # the original's train_batches_cnt sets the schedule's length too
    cfg = _print_config(capsys, "--preset", "tiny", "--train_batches_cnt", "300")
    assert cfg["train"]["steps_per_epoch"] == 300 and cfg["train"]["lr_total_steps"] == 300


def test_config_file_yaml_and_toml(tmp_path, capsys) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "train:\n  learning_rate: 5e-4\n  DAG_reg_coeffs: [0.1, 0, 0]\nbatch_size: 4\n"
    )
    cfg = _print_config(capsys, "--preset", "tiny", "--config", str(yaml_file))
    assert cfg["train"]["learning_rate"] == 5e-4  # YAML's '5e-4' string becomes a float
    assert cfg["train"]["dag_reg_coeffs"] == [0.1, 0.0, 0.0]
    assert cfg["train"]["batch_size"] == 4
    toml_file = tmp_path / "run.toml"
    toml_file.write_text("[model]\nnum_layers = 3\n[train]\nseed = 7\n")
    cfg = _print_config(capsys, "--preset", "tiny", "--config", str(toml_file))
    assert cfg["model"]["num_layers"] == 3 and cfg["train"]["seed"] == 7
    assert cfg["model"]["d_model"] == 128  # the rest comes from the preset


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--train.grad_accum_steps", "3"], "grad_accum_steps"),
        (["--global_batch_size", "3", "--grad_accum_steps", "2"], "global_batch_size"),
        (["--context_length", "512"], "context_length"),
        (["--model.num_heads", "5"], "num_heads"),
        (["--data.padding_type", "squash"], "padding_type"),
        (["--fsdp_sharding_strategy", "ALL"], "fsdp_sharding_strategy"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(argv, needle, capsys, tmp_path) -> None:
    import time

    from pldr_llm.cli import main

    started = time.perf_counter()
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *argv])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert elapsed < 1.0  # the config is checked before anything slow
    assert not (tmp_path / "run").exists()


def test_unknown_option_is_named(capsys, tmp_path) -> None:
    from pldr_llm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path), "--train.learning_rte", "1"])
    assert info.value.code == 2
    assert "--train.learning_rte" in capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_named(capsys, tmp_path) -> None:
    from pldr_llm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  warmup: 10\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "train.warmup" in capsys.readouterr().err


def test_missing_dataset_column_fails_fast(tmp_path, capsys) -> None:
    import time

    from pldr_llm.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text('{"content": "hello world"}\n' * 5)
    started = time.perf_counter()
    code = main(
        [
            "train",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--data.source",
            str(data),
            "--data.column",
            "text",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "text" in err
    assert time.perf_counter() - started < 1.0


def test_the_originals_sample_script_ports_by_changing_the_command(capsys) -> None:
    """The flags of the original's sample-train-script-pldrv510_dag.sh, without a preset."""
    argv = (
        "--master_addr=localhost --master_port=12345 --batch_size=16 --tok_model=tok.model "
        "--context_length=1024 --train_sample_interval 0 16000000 --val_sample_size=160000 "
        "--buffer_size=20000 --dataset_file=tiiuae/falcon-refinedweb --dataset_column_label=content "
        "--load_dataset --load_from_train --split_style=index --batch_agg_count=100 "
        "--padding_type=pack --trust_remote_code --num_layers=5 --num_heads=14 --dk=64 "
        "--num_reslayerA=8 --num_denseA=2 --epochs=1 --save_model_path=my-model "
        "--warmup_steps=2000 --train_batches_cnt=250000 --val_batches_cnt=2000 "
        "--learning_rate=1.5e-3 --DAG_reg_coeffs 0.05 0.05 0.05 --lr_alpha=0.1 --adamw_decay=0.1 "
        "--checkpoint_path=/tmp/ckpts --chkpt_batches 4000 12000 31250 "
        "--fsdp_sharding_strategy=HYBRID_SHARD --backward_prefetch=PRE --verbose_freq=2000 "
        "--val_verbose_freq=12000 --is_train --device=cuda --save_type=torch"
    ).split()
    cfg = _print_config(capsys, *argv)
    model, data, train = cfg["model"], cfg["data"], cfg["train"]
    assert (model["d_model"], model["dff"], model["A_dff"]) == (896, 2389, 170)
    assert model["max_seq_len"] == 1024 and model.get("input_vocab_size") is None  # = tokenizer's
    assert cfg["tokenizer"]["path"] == "tok.model"
    assert data["source"] == "tiiuae/falcon-refinedweb" and data["column"] == "content"
    assert data["train_interval"] == [0, 16000000] and data["val_offset"] == 160000
    assert train["steps_per_epoch"] == 250000 and train["lr_total_steps"] == 250000
    assert train["val_batches"] == 2000 and train["val_every"] == 12000
    assert train["dag_reg_coeffs"] == [0.05, 0.05, 0.05] and train["run_name"] == "my-model"
    assert train["save_steps"] == [4000, 12000, 31250] and train["save_type"] == "torch"


def test_resumability_is_declared_on_the_fields() -> None:
    """What a resumed run may change is read from the fields' metadata, train and data alike."""
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.train.config import TrainConfig
    from pldr_llm.train.runconfig import check_resumable

    resumable = TrainConfig.resumable_fields()
    assert {"learning_rate", "max_steps", "save_every", "compile"} <= resumable
    assert not {"seed", "lr_total_steps", "warmup_steps", "dag_reg_coeffs"} & resumable
    saved = {"data": {"cache_dir": "/a", "split": "train"}, "train": {"max_steps": 5}}
    check_resumable(saved, {"data": {"cache_dir": "/b", "split": "train"}, "train": {}})
    with pytest.raises(PLDRError, match="data.split"):
        check_resumable(saved, {"data": {"cache_dir": "/a", "split": "test"}})
    with pytest.raises(PLDRError, match="train.lr_total_steps"):
        check_resumable({"train": {"lr_total_steps": 10}}, {"train": {"lr_total_steps": 20}})


def test_levers_resolve_per_device_fsdp_and_whole_model_compile() -> None:
    """``None`` levers: on for CUDA, off on the CPU; CUDA graphs under FSDP only when asked
    for; ``compile`` (the whole model) replaces the per-layer compilation and its graphs."""
    auto = TrainConfig()
    assert not any(auto.levers("cpu").values())
    assert all(auto.levers("cuda").values())
    assert auto.levers("cuda", sharded=True) == {
        "chunked_loss": True,
        "compile_layers": True,
        "cuda_graphs": False,
        "fused_optimizer": True,
    }
    assert TrainConfig(cuda_graphs=True).levers("cuda", sharded=True)["cuda_graphs"]
    assert not TrainConfig(cuda_graphs=True).levers("cpu")["cuda_graphs"]  # CUDA only
    assert not TrainConfig(compile_layers=False, cuda_graphs=True).levers("cuda")["cuda_graphs"]
    whole = TrainConfig(compile=True).levers("cuda")
    assert not whole["compile_layers"] and not whole["cuda_graphs"] and whole["chunked_loss"]
    assert TrainConfig(chunked_loss=True, fused_optimizer=True).levers("cpu") == {
        "chunked_loss": True,
        "compile_layers": False,
        "cuda_graphs": False,
        "fused_optimizer": True,
    }
