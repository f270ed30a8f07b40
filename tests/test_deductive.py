"""pldr_llm.deductive: figures of the paper's G_LM files against a float64 computation, plots,
and cached vs uncached deductive outputs of the golden tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pldr_llm.core.errors import PLDRError
from pldr_llm.deductive import (
    CACHE_MODES,
    analyze_deductive,
    analyze_g_list,
    cache_invariance,
    cache_mode_runs,
    compare,
    deductive_outputs,
    inspect_model,
    matrix_stats,
)
from pldr_llm.gfile import load_g_file, save_g_file

LEARNED = "predefined_G_LM_cache_list_PLDRv51_110M_1_5layer_14head_64x64_paper.pkl"
IDENTITY = "predefined_G_LM_cache_list_IDENTITY_5layer_14head_64x64_paper.pkl"
RANDOM = "predefined_G_LM_cache_list_RANDOM_NORMAL_5layer_14head_64x64_paper.pkl"
PAIRS = "Gcachelst_init_mismatched_identity_NAB1_ablation.pkl"
F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------- figures


def test_learned_file_matches_float64_computation(paper_g_dir: Path) -> None:
    report = analyze_g_list(paper_g_dir / LEARNED)
    assert (report.num_layers, report.num_heads, report.dk) == (5, 14, 64)
    entries = load_g_file(paper_g_dir / LEARNED)
    for i, entry in enumerate(entries):
        mats = entry.G_LM[0].numpy().astype(np.float64)
        for h in range(14):
            m = mats[h]
            stats = report.layers[i][h]
            s = np.linalg.svd(m, compute_uv=False)
            np.testing.assert_allclose(stats.singular_values, s, rtol=1e-10, atol=1e-12 * s[0])
            assert np.all(np.diff(stats.singular_values) <= 0)
            tol = s[0] * 64 * F32_EPS
            assert stats.rank_tol == pytest.approx(tol, rel=1e-12)
            assert stats.rank == np.linalg.matrix_rank(m, tol=tol)
            sign, logdet = np.linalg.slogdet(m)
            assert stats.det_sign == sign
            assert stats.log_abs_det == pytest.approx(logdet, rel=1e-9, abs=1e-9)
            assert stats.rms == pytest.approx(np.sqrt(np.mean(m**2)), rel=1e-12)
    ranks = report.ranks()
    # The paper's observation: learned G_LM is singular in many heads, near rank-1 in some.
    assert ranks.min() < 10 and (ranks < 64).sum() > 35
    energies = [h.top_sv_energy for layer in report.layers for h in layer]
    assert max(energies) > 0.999


def test_identity_file_has_rank_dk_everywhere(paper_g_dir: Path) -> None:
    report = analyze_g_list(paper_g_dir / IDENTITY)
    assert report.ranks().shape == (5, 14)
    assert (report.ranks() == 64).all()
    for layer in report.layers:
        for h in layer:
            np.testing.assert_array_equal(h.singular_values, np.ones(64))
            assert h.log_abs_det == 0.0 and h.det_sign == 1.0
            assert h.rms == pytest.approx(0.125)


def test_random_file_is_full_rank_and_rtol_changes_rank(paper_g_dir: Path) -> None:
    assert (analyze_g_list(paper_g_dir / RANDOM).ranks() == 64).all()
    loose = analyze_g_list(paper_g_dir / LEARNED, rtol=1e-3)
    default = analyze_g_list(paper_g_dir / LEARNED)
    assert (loose.ranks() <= default.ranks()).all() and (loose.ranks() < default.ranks()).any()
    assert "1e-3" in loose.to_dict()["rank_rule"] or "0.001" in loose.to_dict()["rank_rule"]


def test_json_report_format(paper_g_dir: Path, tmp_path: Path) -> None:
    report = analyze_g_list(paper_g_dir / PAIRS)
    text = report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(text)
    assert data["tensor"] == "G_LM" and len(data["layers"]) == 5
    head = data["layers"][2]["heads"][7]
    for key in ("singular_values", "rank", "log_abs_det", "det_sign", "rms"):
        assert key in head
    assert len(head["singular_values"]) == 64 and head["rank"] == 64
    assert "A_LM" in head and len(head["A_LM"]["singular_values"]) == 64  # pairs carry A_LM
    assert "eps" in data["rank_rule"]


def test_singular_matrix_figures_are_json_safe() -> None:
    stats = matrix_stats(torch.zeros(3, 3))
    assert stats.rank == 0 and stats.det_sign == 0.0
    d = stats.to_dict()
    assert d["log_abs_det"] is None and d["condition_number"] is None
    json.dumps(d, allow_nan=False)
    rank1 = torch.outer(torch.arange(1.0, 5.0), torch.ones(4))
    assert matrix_stats(rank1).rank == 1
    assert matrix_stats(rank1).top_sv_energy == pytest.approx(1.0)
    with pytest.raises(PLDRError, match="NaN"):
        matrix_stats(torch.full((2, 2), float("nan")))


def test_compare_g_files(paper_g_dir: Path) -> None:
    same = compare(paper_g_dir / IDENTITY, paper_g_dir / PAIRS)  # both G_LM are the identity
    assert same["tensors"] == ["G_LM"] and same["overall"]["G_LM"] == 0.0
    diff = compare(paper_g_dir / LEARNED, paper_g_dir / IDENTITY)
    learned = load_g_file(paper_g_dir / LEARNED)
    expected = [
        np.sqrt(np.mean((e.G_LM[0].double().numpy() - np.eye(64)) ** 2, axis=(-2, -1)))
        for e in learned
    ]
    for i in range(5):
        np.testing.assert_allclose(diff["layers"][i]["G_LM"], expected[i], rtol=1e-12)
    assert diff["overall"]["G_LM"] == pytest.approx(np.sqrt(np.mean(np.square(expected))))
    with pytest.raises(PLDRError, match="layers"):
        compare(learned, learned[:3])


# ---------------------------------------------------------------------- plots


@pytest.mark.slow
def test_plot_learned_file_shows_5_by_14_panels(paper_g_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import AxesImage
    from PIL import Image

    from pldr_llm.deductive import plot_deductive

    out = tmp_path / "g.png"
    summary = plot_deductive(out, paper_g_dir / LEARNED, keep_figure=True, dpi=60)
    assert summary.grids == {"G_LM": (5, 14), "spectra": (5, 14)}
    # Count what the figure really holds: 70 heatmap panels with one image each.
    fig = summary.figure
    axes = [ax for sub in fig.subfigs for ax in sub.axes]
    heat = [ax for ax in axes if (ax.get_gid() or "").startswith("G_LM:")]
    assert len(heat) == 70 and all(
        sum(isinstance(c, AxesImage) for c in ax.get_children()) == 1 for ax in heat
    )
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (summary.width, summary.height)
        assert img.size[0] > 14 * 30 and img.size[1] > 2 * 5 * 30
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank image


@pytest.mark.slow
def test_plot_pairs_and_compare(paper_g_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from pldr_llm.deductive import plot_compare, plot_deductive

    summary = plot_deductive(tmp_path / "p.png", paper_g_dir / PAIRS, dpi=40)
    assert summary.grids == {"A_LM": (5, 14), "G_LM": (5, 14), "spectra": (5, 14)}
    summary = plot_compare(tmp_path / "c.png", paper_g_dir / LEARNED, paper_g_dir / RANDOM, dpi=40)
    assert summary.grids == {"difference": (5, 14), "spectra": (5, 14)}
    assert mpimg.imread(tmp_path / "c.png").shape[:2] == (summary.height, summary.width)


# ---------------------------------------------------------------------- the golden tiny model


def test_deductive_outputs_match_golden(golden_model, golden_expected) -> None:
    row = golden_expected["input_ids"][0]  # the row without padding
    layers = deductive_outputs(golden_model, row)
    for i, layer in enumerate(layers):
        for name in ("A", "A_LM", "A_P", "G_LM"):
            torch.testing.assert_close(
                layer[name][0], golden_expected[f"layer{i}.{name}"][0], atol=1e-5, rtol=1e-4
            )


@pytest.mark.slow
def test_cached_vs_uncached_on_golden_model(golden_model, golden_expected, golden_case) -> None:
    prompt = golden_expected["prompt_ids"]
    steps = 3
    runs = cache_mode_runs(golden_model, prompt, steps=steps)
    # The fixed continuation is the original's greedy decoding without caches.
    n = len(prompt)
    assert runs.continuation == golden_expected["gen_kv0_g0.ids"][n : n + steps].tolist()
    rmse = cache_invariance(runs)
    assert set(rmse["modes"]) == set(CACHE_MODES)
    for mode in CACHE_MODES:
        for step in rmse["modes"][mode]:
            g_vs_prompt = step["vs_prompt"]["overall"]["G_LM"]
            if mode == "kv0_g0":
                # Caches off: A is recomputed on the grown sequence, so G_LM moves.
                assert g_vs_prompt > 1e-3
                assert all(v > 0 for layer in step["vs_prompt"]["layers"] for v in layer["G_LM"])
            else:
                # G-cache reused (g1), or A reused from the KV-cache (kv1_g0): G_LM is identical.
                assert g_vs_prompt == 0.0
                assert step["vs_prompt"]["overall"]["A_LM"] == 0.0
                assert step["vs_uncached"]["overall"]["G_LM"] > 1e-3
    # The reference step equals a direct uncached forward on prompt + continuation.
    grown = torch.cat((prompt, torch.tensor(runs.continuation[:1])))
    direct = deductive_outputs(golden_model, grown)
    assert compare(direct, runs.steps["kv0_g0"][0])["overall"]["G_LM"] == 0.0


@pytest.mark.slow
def test_inspect_model_report(golden_model, golden_expected, tmp_path: Path) -> None:
    prompts = [golden_expected["prompt_ids"], golden_expected["input_ids"][0]]
    result = inspect_model(golden_model, prompts, steps=2, source={"kind": "model"})
    data = json.loads(result.report.to_json())
    assert len(data["layers"]) == 2 and len(data["layers"][0]["heads"]) == 4
    head = data["layers"][1]["heads"][3]
    assert len(head["singular_values"]) == 16
    for extra in ("A", "A_LM", "A_P"):
        assert len(head[extra]["singular_values"]) == 16
    assert set(data["rmse"]) == {"cached_vs_uncached", "across_prompts"}
    (pair,) = data["rmse"]["across_prompts"]["pairs"]
    assert pair["overall"]["G_LM"] > 1e-3  # G_LM depends on the input in this random model
    # Figures are those of the first prompt's uncached pass.
    direct = analyze_deductive(deductive_outputs(golden_model, prompts[0]))
    assert (direct.ranks() == result.report.ranks()).all()
    np.testing.assert_array_equal(direct.log_abs_dets(), result.report.log_abs_dets())


def test_saved_g_cache_drives_the_model(golden_model, golden_expected, tmp_path: Path) -> None:
    from pldr_llm.core.cache import PLDRCache

    prompt = golden_expected["prompt_ids"]
    runs = cache_mode_runs(golden_model, prompt, steps=1)
    path = save_g_file(tmp_path / "g.safetensors", runs.g_cache, metadata={"prompt": "x"})
    other = golden_expected["input_ids"][0][None]
    with torch.no_grad():
        # The same pass as cache_mode_runs' prompt pass (output_deductive selects the eager
        # attention, whose float32 rounding differs slightly from the fused kernel's).
        first = golden_model(prompt[None], output_deductive=True)
        want = golden_model(other, cache=first.cache.drop_kv()).logits
        got = golden_model(other, cache=PLDRCache.from_g_list(load_g_file(path))).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_steps_beyond_max_seq_len(golden_model) -> None:
    with pytest.raises(PLDRError, match="max_seq_len"):
        cache_mode_runs(golden_model, list(range(4, 64)), steps=5)
