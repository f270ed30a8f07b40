"""Original .pth checkpoints and the project's own format."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import load_file

from pldr_llm import (
    PLDRConfig,
    PLDRError,
    PLDRModel,
    load_reference_checkpoint,
    predefined_G_model,
    safe_torch_load,
    save_reference_checkpoint,
)


def test_reference_state_keys_and_values(golden_model, golden_dir):
    reference = load_file(str(golden_dir / "reference_state.safetensors"))
    state = golden_model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_save_reference_checkpoint_round_trip(golden_model, golden_dir, golden_case, tmp_path):
    path = save_reference_checkpoint(golden_model, tmp_path / "model-checkpoint.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict", "optimizer_state_dict", "loss", "accuracy"}
    original = torch.load(golden_dir / "reference_checkpoint.pth", weights_only=True)
    assert list(raw["model_state_dict"]) == list(original["model_state_dict"])
    for key, value in original["model_state_dict"].items():
        assert torch.equal(raw["model_state_dict"][key], value), key
    again = load_reference_checkpoint(path, golden_case["hpdict"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, golden_model(ids).logits)


def test_bare_state_dict_loads(golden_model, golden_case, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(golden_model.state_dict(), path)
    model = load_reference_checkpoint(path, golden_case["hpdict"])
    assert torch.equal(model.final_layer.bias, golden_model.final_layer.bias)


def test_wrong_hyperparameters_name_the_shape(golden_dir, golden_case):
    hp = dict(golden_case["hpdict"], dff=golden_case["hpdict"]["dff"] + 2)
    with pytest.raises(PLDRError, match=r"ffn\.gluw1\.\w+ is \(170"):
        load_reference_checkpoint(golden_dir / "reference_checkpoint.pth", hp)
    hp = dict(golden_case["hpdict"], num_layers=3)
    with pytest.raises(PLDRError, match="missing keys: decoder.dec_layers.2"):
        load_reference_checkpoint(golden_dir / "reference_checkpoint.pth", hp)
    hp = dict(golden_case["hpdict"], input_vocab_size=301)
    with pytest.raises(PLDRError, match="embedding.weight"):
        load_reference_checkpoint(golden_dir / "reference_checkpoint.pth", hp)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model_state_dict": Evil()}, handle)
    with pytest.raises(PLDRError, match="refused|not a readable"):
        safe_torch_load(path)
    assert not marker.exists()


def test_own_format_round_trip(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = PLDRModel.load(tmp_path / "m")
    assert loaded.config == tiny_model.config
    ids = torch.tensor([[4, 9, 2, 11, 0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)


@pytest.mark.slow
def test_own_format_v510G_keeps_G(tiny_model, tmp_path):
    config = tiny_model.config
    g = [
        torch.randn(1, config.num_heads, config.depth, config.depth)
        for _ in range(config.num_layers)
    ]
    g_model = predefined_G_model(tiny_model, g)
    g_model.save(tmp_path / "g")
    loaded = PLDRModel.load(tmp_path / "g")
    assert loaded.config.version == "v510G"
    for a, b in zip(loaded.predefined_G(), g):
        assert torch.equal(a, b)
    # the original's format has no G: loading it needs the G list
    path = save_reference_checkpoint(g_model, tmp_path / "g.pth")
    assert not any(
        "predefined" in k for k in torch.load(path, weights_only=True)["model_state_dict"]
    )
    hp = dataclasses.replace(config, version="v510G")
    with pytest.raises(PLDRError, match="G_list"):
        load_reference_checkpoint(path, hp)
    again = load_reference_checkpoint(path, config, G_list=g)
    ids = torch.tensor([[4, 9, 2, 11]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, g_model(ids).logits)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PLDRError, match="not found"):
        load_reference_checkpoint(tmp_path / "nope.pth", PLDRConfig(num_layers=1))
