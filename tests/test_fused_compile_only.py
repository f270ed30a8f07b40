"""fused.compile_only: the calling thread's fused kernel launches compile on a pool instead.

The routing (warmup with the launch's own arguments, nothing launched, per thread, errors on
exit, nesting) is checked with fake kernels; the real kernels under Triton's CPU interpreter
(whose ``warmup`` does nothing) show that a step run so launches nothing and leaves the
engine's state as it was; on a GPU, that the decode after the warm-up's compile pass compiles
no kernel of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from pldr_llm.core import fused


class FakeKernel:
    """A kernel's launch (``kernel[grid](...)``) and compile (``kernel.warmup(...)``), recorded."""

    def __init__(self, name: str, log: list, fail: bool = False, seconds: float = 0.0) -> None:
        self.name, self.log, self.fail, self.seconds = name, log, fail, seconds
        self.busy = 0
        self.most_busy = 0
        self.lock = threading.Lock()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("launch", self.name, grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        with self.lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        time.sleep(self.seconds)
        with self.lock:
            self.busy -= 1
        self.log.append(("warmup", self.name, grid, args, kwargs, threading.current_thread()))
        if self.fail:
            raise ValueError(f"{self.name} did not compile")


@pytest.fixture
def fake(monkeypatch):
    """The fused wrappers' kernel namespace replaced by fake kernels; returns (namespace, log)."""
    log: list = []
    names = ("add_norm", "silu_mul", "attend", "broken")
    kernels = SimpleNamespace(**{n: FakeKernel(n, log, fail=n == "broken") for n in names})
    monkeypatch.setattr(fused, "_KERNELS", kernels)
    return kernels, log


def test_a_launch_inside_compiles_with_its_arguments_and_runs_nothing(fake):
    kernels, log = fake
    x = torch.zeros(2, 8)
    with ThreadPoolExecutor(2) as pool, fused.compile_only(pool) as compiles:
        fused._kernels().add_norm[(2,)](x, x, 1e-5, 8, BLOCK=16, num_warps=4)
    assert [entry[:5] for entry in log] == [
        ("warmup", "add_norm", (2,), (x, x, 1e-5, 8), {"BLOCK": 16, "num_warps": 4})
    ]
    assert log[0][3][0] is x  # the tensors themselves: the cache key sees their alignment
    assert log[0][5] is not threading.current_thread()  # on the pool
    assert compiles.submitted == ["add_norm"]
    # outside, the same call launches
    fused._kernels().add_norm[(2,)](x, x, 1e-5, 8, BLOCK=16, num_warps=4)
    assert log[-1] == ("launch", "add_norm", (2,), (x, x, 1e-5, 8), {"BLOCK": 16, "num_warps": 4})


def test_a_wrapper_inside_compiles_its_kernel(fake):
    _, log = fake
    gate_up = torch.randn(3, 2 * 96)
    with ThreadPoolExecutor(2) as pool, fused.compile_only(pool):
        out = fused.silu_mul(gate_up)
    assert out.shape == (3, 96)  # allocated, never written
    ((what, name, grid, args, kwargs, _),) = log
    assert (what, name, grid) == ("warmup", "silu_mul", (3, 1))
    assert args[0] is gate_up and args[1] is out and args[2] == 96
    assert kwargs == {"BLOCK": 1024, **fused._launch_options(4)}


def test_each_distinct_launch_compiles_once_and_a_kernels_variants_in_turn(monkeypatch):
    log: list = []
    slow = FakeKernel("attend", log, seconds=0.05)
    monkeypatch.setattr(fused, "_KERNELS", SimpleNamespace(attend=slow))
    a, b = torch.zeros(4), torch.zeros(4)
    with ThreadPoolExecutor(4) as pool, fused.compile_only(pool) as compiles:
        for layer in range(3):  # the same launch in each layer: one compile
            fused._kernels().attend[(1,)](a if layer % 2 else b, 7, DK=16)
        fused._kernels().attend[(1,)](a, 8, DK=16)  # another int: another compile
        fused._kernels().attend[(1,)](a, 7, DK=32)  # another constexpr: another compile
    assert [entry[3][1:] + (entry[4]["DK"],) for entry in log] == [(7, 16), (8, 16), (7, 32)]
    assert compiles.submitted == ["attend"] * 3
    assert slow.most_busy == 1  # one kernel's compiles never overlap (Triton's per-function state)


def test_other_threads_launch_as_ever(fake):
    _, log = fake
    x = torch.zeros(2)
    seen = []

    def elsewhere() -> None:
        seen.append(fused._kernels())
        fused._kernels().attend[(1,)](x)

    with ThreadPoolExecutor(2) as pool, fused.compile_only(pool):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        fused._kernels().attend[(1,)](x)
    assert seen == [fused._KERNELS]
    assert sorted(entry[0] for entry in log) == ["launch", "warmup"]
    assert next(e for e in log if e[0] == "launch")[1:3] == ("attend", (1,))


def test_a_failed_compile_raises_on_exit_after_every_compile(fake):
    kernels, log = fake
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="broken did not compile"):
        with ThreadPoolExecutor(2) as pool, fused.compile_only(pool):
            fused._kernels().broken[(1,)](x)
            fused._kernels().silu_mul[(1,)](x)
    assert sorted(e[1] for e in log) == ["broken", "silu_mul"]  # both ran before the exit
    assert fused._kernels() is kernels


def test_the_body_error_wins_and_the_namespace_comes_back(fake):
    kernels, log = fake
    x = torch.zeros(2)
    with pytest.raises(KeyError):
        with ThreadPoolExecutor(2) as pool, fused.compile_only(pool):
            fused._kernels().broken[(1,)](x)
            raise KeyError("body")
    assert [e[1] for e in log] == ["broken"]  # waited for, its error dropped for the body's
    assert fused._kernels() is kernels


def test_nested_blocks_restore_the_outer_one(fake):
    kernels, log = fake
    x = torch.zeros(2)
    with ThreadPoolExecutor(2) as pool:
        with fused.compile_only(pool) as outer:
            with fused.compile_only(pool) as inner:
                assert fused._kernels() is inner
                fused._kernels().attend[(1,)](x)
            assert fused._kernels() is outer
            fused._kernels().silu_mul[(1,)](x)
        assert fused._kernels() is kernels
    assert (inner.submitted, outer.submitted) == (["attend"], ["silu_mul"])
    assert [e[0] for e in log] == ["warmup", "warmup"]


interpreted = pytest.mark.skipif(
    not (fused.interpreting() and fused.available(torch.device("cpu"))),
    reason="needs Triton's CPU interpreter",
)


@interpreted
def test_the_interpreters_warmup_accepts_the_launch_and_runs_nothing():
    norm = torch.nn.LayerNorm(64)
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    out = torch.zeros(3, 64)
    args = (x, y, norm.weight, norm.bias, out, norm.eps, 64)
    with ThreadPoolExecutor(2) as pool, fused.compile_only(pool) as compiles:
        fused._kernels().add_norm[(3,)](*args, BLOCK=64)
    assert compiles.submitted == ["add_norm"]
    assert not out.any()
    fused._kernels().add_norm[(3,)](*args, BLOCK=64)
    assert torch.allclose(out, norm(x + y), atol=1e-5)


def _tiny_model():
    from pldr_llm import PLDRConfig, PLDRModel
    from support import TINY_HPDICT

    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval()


@interpreted
@pytest.mark.parametrize("sampling", ["greedy", "top-p"])
def test_a_step_inside_launches_nothing_and_changes_no_state(sampling):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model = _tiny_model()
    engine = DecodeEngine(model, 4, 40, cuda_graph=False, fused=True)
    params = (
        SamplingParams(top_k=1, max_new_tokens=5)
        if sampling == "greedy"
        else SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_new_tokens=5)
    )
    engine.add_many([[5, 9, 44, 12, 7], [17, 0, 23]], [params] * 2)
    b = engine.buffers
    state = [b.ids, b.counters, b.history, b.report, b.done, b.active, b.key_bias]
    state += [t for kv in b.kv for t in (kv.key, kv.value)]
    before = [t.clone() for t in state]
    with ThreadPoolExecutor(2) as pool, fused.compile_only(pool) as compiles:
        engine.advance(1)
    assert all(torch.equal(t, u) for t, u in zip(state, before))
    expected = {"embed_norm", "rope_kv", "attend", "add_norm", "silu_mul", "advance"}
    assert set(compiles.submitted) == expected | (
        {"argmax_partial"} if sampling == "greedy" else set()
    )
    engine.advance(1)  # and the real step after it runs (and moves the counters)
    assert not torch.equal(b.counters, before[1])


@interpreted
def test_the_warm_up_compiles_the_fused_step_first():
    from dataclasses import replace

    from pldr_llm.core.engine_cache import EngineSpec
    from pldr_llm.core.sampling import SamplingParams
    from pldr_llm.generation.warm import _compile_step_kernels

    model = _tiny_model()
    params = SamplingParams(top_k=1, seed=0, max_new_tokens=3, stop_at_eos=False)
    prompts = [[5] * 5, [5] * 3]
    spec = EngineSpec(2, 40, cuda_graph=False, fused=True)
    compiles = _compile_step_kernels(model, spec, prompts, params)
    assert compiles is not None
    # rope_kv twice: the first layer's variant also unmasks the written key
    assert sorted(compiles.submitted) == sorted(
        ["embed_norm", "rope_kv", "rope_kv", "attend", "add_norm", "silu_mul"]
        + ["argmax_partial", "advance"]
    )
    # an engine whose step is op by op (the CPU's default) has nothing to compile
    assert _compile_step_kernels(model, replace(spec, fused=None), prompts, params) is None


def test_a_failed_compile_pass_leaves_the_warm_up_running(monkeypatch):
    from pldr_llm.generation import DecodeEngine, warm

    calls, decoded = [], []

    def fails(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("ptxas died")

    advance = DecodeEngine.advance
    monkeypatch.setattr(warm, "_compile_step_kernels", fails)
    monkeypatch.setattr(
        DecodeEngine, "advance", lambda self, n: (decoded.append(n), advance(self, n))
    )
    config = _tiny_model().config
    warm._decode_once(config, torch.float32, torch.device("cpu"), [5, 3], 40)  # does not raise
    assert len(calls) == 1 and decoded == [2]


@pytest.mark.gpu
def test_the_decode_after_the_compile_pass_compiles_nothing(tmp_path):
    """With an empty Triton cache: the compile pass writes every kernel of the step, and the
    decode after it (a new engine of the same spec) finds them all, compiling none."""
    script = (
        "import os, pathlib, torch\n"
        "from dataclasses import replace\n"
        "from pldr_llm.core import fused\n"
        "from pldr_llm.core.config import PLDRConfig\n"
        "from pldr_llm.core.engine_cache import build_engine\n"
        "from pldr_llm.core.generate import engine_spec\n"
        "from pldr_llm.core.sampling import SamplingParams\n"
        "from pldr_llm.generation.warm import _compile_step_kernels, _stand_in_model\n"
        "cache = pathlib.Path(os.environ['TRITON_CACHE_DIR'])\n"
        "cubins = lambda: sorted(str(p) for p in cache.rglob('*.cubin'))\n"
        "config = PLDRConfig(num_layers=2, d_model=64, num_heads=4, dff=170, A_dff=24,\n"
        "                    input_vocab_size=512, num_reslayerA=2, num_denseA=2, max_seq_len=64)\n"
        "with torch.no_grad():\n"
        "    model = _stand_in_model(config, torch.bfloat16, torch.device('cuda'))\n"
        "    assert fused.supports(model) is None\n"
        "    spec = replace(engine_spec(model, 2, 40, cuda_graph=True), cuda_graph=False)\n"
        "    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_new_tokens=3)\n"
        "    prompts = [[5] * 5, [5] * 3]\n"
        "    compiles = _compile_step_kernels(model, spec, prompts, params)\n"
        "    compiled = cubins()\n"
        "    engine = build_engine(model, spec)\n"
        "    assert engine.fused\n"
        "    engine.add_many(prompts, [params] * 2)\n"
        "    engine.advance(2)\n"
        "    torch.cuda.synchronize()\n"
        "    print(len(compiles.submitted), len(compiled), compiled == cubins())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    submitted, compiled, unchanged = done.stdout.split()
    assert submitted == compiled and int(compiled) >= 6 and unchanged == "True", done.stdout
