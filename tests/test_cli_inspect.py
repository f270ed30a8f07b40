"""``pldr-llm inspect`` and ``pldr-llm compare`` end to end (in process, through cli.main)."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import sys
from pathlib import Path

import pytest
import torch

from pldr_llm.cli import main
from pldr_llm.gfile import load_g_file, read_g_metadata

LEARNED = "predefined_G_LM_cache_list_PLDRv51_110M_1_5layer_14head_64x64_paper.pkl"
IDENTITY = "predefined_G_LM_cache_list_IDENTITY_5layer_14head_64x64_paper.pkl"
PAIRS = "Gcachelst_init_mismatched_identity_NAB1_ablation.pkl"


@pytest.fixture()
def tiny_dir(golden_model, tmp_path: Path) -> Path:
    """The golden tiny model saved as a pldr-llm folder (config.json + model.safetensors)."""
    return golden_model.save(tmp_path / "tiny")


@pytest.mark.slow
def test_inspect_g_file_writes_json_plot_and_g(paper_g_dir: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out_json, out_png, out_g = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "g.safetensors"
    rc = main(
        [
            "inspect",
            "--g-file",
            str(paper_g_dir / LEARNED),
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--save-g",
            str(out_g),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert table.count("\n") >= 5 * 14 + 2 and "log|det|" in table
    data = json.loads(out_json.read_text())
    assert data["source"] == {"kind": "g_file", "path": str(paper_g_dir / LEARNED)}
    assert [len(layer["heads"]) for layer in data["layers"]] == [14] * 5
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for e, ref in zip(load_g_file(out_g), load_g_file(paper_g_dir / LEARNED), strict=True):
        assert torch.equal(e.G_LM, ref.G_LM)
    assert read_g_metadata(out_g)["source"] == str(paper_g_dir / LEARNED)


def test_inspect_identity_ranks(paper_g_dir: Path, capsys) -> None:
    assert main(["inspect", "--g-file", str(paper_g_dir / IDENTITY), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)  # with --json -, stdout is pure JSON
    assert {h["rank"] for layer in data["layers"] for h in layer["heads"]} == {64}


def test_inspect_refuses_malicious_pickle(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"

    class RunsCommand:
        def __reduce__(self):
            cmd = f"{shlex.quote(sys.executable)} -c \"open({str(marker)!r}, 'w').close()\""
            return (os.system, (cmd,))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([torch.eye(3), RunsCommand()]))
    rc = main(["inspect", "--g-file", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("pldr-llm: error: ") and err.count("\n") == 1
    assert "system" in err and "refusing" in err
    assert not marker.exists()


def test_compare_g_files(paper_g_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.json"
    rc = main(
        ["compare", str(paper_g_dir / IDENTITY), str(paper_g_dir / PAIRS), "--json", str(out)]
    )
    assert rc == 0
    assert "RMSE A vs B (overall): G_LM 0.0000e+00" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rmse"]["overall"] == {"G_LM": 0.0}
    assert data["a"]["layers"][0]["heads"][0]["rank"] == 64


def test_bad_arguments(paper_g_dir: Path, capsys) -> None:
    g = str(paper_g_dir / IDENTITY)
    assert main(["inspect", "--g-file", g, "--prompt", "hi"]) == 2
    assert main(["inspect", "--g-file", g, "--steps", "0"]) == 2
    assert main(["inspect", "--g-file", g, "--rtol", "-1"]) == 2
    assert main(["inspect", "--g-file", "/nonexistent.pkl"]) == 2
    err = capsys.readouterr().err
    assert err.count("pldr-llm: error:") == 4


@pytest.mark.slow
def test_inspect_model_cache_modes(tiny_dir: Path, golden_expected, tmp_path: Path, capsys) -> None:
    prompt = " ".join(str(i) for i in golden_expected["prompt_ids"].tolist())
    out_json, out_g = tmp_path / "m.json", tmp_path / "g.safetensors"
    argv = ["inspect", "--model", str(tiny_dir), "--prompt-ids", prompt, "--prompt-ids", "5,6,7"]
    rc = main([*argv, "--steps", "2", "--json", str(out_json), "--save-g", str(out_g)])
    assert rc == 0
    assert "cached vs uncached" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    modes = data["rmse"]["cached_vs_uncached"]["modes"]
    for step in modes["kv1_g1"] + modes["kv0_g1"]:
        assert step["vs_prompt"]["overall"]["G_LM"] == 0.0
    for step in modes["kv0_g0"]:
        assert step["vs_prompt"]["overall"]["G_LM"] > 0.0
    assert data["rmse"]["across_prompts"]["pairs"][0]["overall"]["G_LM"] > 0.0
    entries = load_g_file(out_g)
    assert len(entries) == 2 and entries[0].A_LM is not None
    assert entries[0].G_LM.shape == (1, 4, 16, 16)

    # compare the model (run on the same prompt) with the G-cache it wrote: identical G_LM.
    capsys.readouterr()
    rc = main(["compare", str(tiny_dir), str(out_g), "--prompt-ids", prompt, "--quiet"])
    assert rc == 0


def test_inspect_model_needs_ids_without_tokenizer(tiny_dir: Path, capsys) -> None:
    assert main(["inspect", "--model", str(tiny_dir), "--prompt", "hello"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_model_default_prompt_is_end_of_text(tiny_dir: Path, capsys) -> None:
    assert main(["inspect", "--model", str(tiny_dir), "--json", "-", "--steps", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rmse"]["cached_vs_uncached"]["prompt_ids"] == [3]
