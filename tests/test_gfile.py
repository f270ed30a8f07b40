"""G files: the paper's CUDA pickles read safely on the CPU, malicious pickles refused, the
project's safetensors form written and read back."""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pldr_llm.core.cache import GCacheEntry, PLDRCache, g_entries
from pldr_llm.core.errors import PLDRError
from pldr_llm.gfile import G_FILE_FORMAT, load_g_file, read_g_metadata, save_g_file
from pldr_llm.tensor_pickle import load_tensor_pickle

PREDEFINED = "predefined_G_LM_cache_list_{}_5layer_14head_64x64_paper.pkl"
PAIRS = "Gcachelst_init_mismatched_{}_ablation.pkl"
PAPER_FILES = {
    PREDEFINED.format("IDENTITY"): False,
    PREDEFINED.format("RANDOM_NORMAL"): False,
    PREDEFINED.format("PLDRv51_110M_1"): False,
    PAIRS.format("identity_NAB1"): True,
    PAIRS.format("random_normal_NAB2"): True,
}


# ---------------------------------------------------------------------- the paper's files


@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_paper_files_load_on_cpu(paper_g_dir: Path, name: str) -> None:
    entries = load_g_file(paper_g_dir / name)
    assert len(entries) == 5
    for entry in entries:
        a_lm, g_lm = entry.A_LM, entry.G_LM
        assert g_lm.shape == (1, 14, 64, 64)
        assert g_lm.dtype == torch.float32 and g_lm.device.type == "cpu"
        assert torch.isfinite(g_lm).all()
        if PAPER_FILES[name]:
            assert a_lm is not None and a_lm.shape == (1, 14, 64, 64)
        else:
            assert a_lm is None


def test_identity_files_hold_the_identity(paper_g_dir: Path) -> None:
    eye = torch.eye(64).expand(1, 14, 64, 64)
    for entry in load_g_file(paper_g_dir / PREDEFINED.format("IDENTITY")):
        assert torch.equal(entry.G_LM, eye)
    for entry in load_g_file(paper_g_dir / PAIRS.format("identity_NAB1")):
        assert torch.equal(entry.G_LM, eye)
        assert entry.A_LM is not None


def _raw_storages(data: bytes) -> list[bytes]:
    """The float32 payloads of every storage in a pickle, found by walking its opcodes (nothing
    is executed): each ``_load_from_bytes`` payload ends with int64 count + raw data."""
    out = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            count = 1 * 14 * 64 * 64
            tail = arg[-(8 + 4 * count) :]
            assert struct.unpack("<q", tail[:8])[0] == count
            out.append(tail[8:])
    return out


def test_learned_file_values_are_the_stored_bytes(paper_g_dir: Path) -> None:
    # An independent check of the reader: the tensors must hold exactly the bytes in the file.
    path = paper_g_dir / PREDEFINED.format("PLDRv51_110M_1")
    raw = _raw_storages(path.read_bytes())
    entries = load_g_file(path)
    assert len(raw) == len(entries) == 5
    for payload, entry in zip(raw, entries, strict=True):
        assert entry.G_LM.contiguous().numpy().tobytes() == payload
    # The learned G_LM is not a trivial matrix: its heads differ from each other.
    assert not torch.equal(entries[0].G_LM[0, 0], entries[0].G_LM[0, 1])


def test_pair_file_values_are_the_stored_bytes(paper_g_dir: Path) -> None:
    path = paper_g_dir / PAIRS.format("random_normal_NAB2")
    raw = _raw_storages(path.read_bytes())
    flat = [t for e in load_g_file(path) for t in (e.A_LM, e.G_LM)]
    assert len(raw) == len(flat) == 10
    for payload, tensor in zip(raw, flat, strict=True):
        assert tensor is not None and tensor.numpy().tobytes() == payload


# ---------------------------------------------------------------------- malicious pickles


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


class _Popen:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self):
        return (subprocess.Popen, (self.argv,))


def _touch_command(marker: Path) -> str:
    return f"{shlex.quote(sys.executable)} -c \"open({str(marker)!r}, 'w').close()\""


def test_pickle_running_a_command_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = pickle.dumps([torch.eye(4), _RunsCommand(_touch_command(marker))])
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(payload)

    with pytest.raises(PLDRError, match=r"refusing to unpickle global '(posix|os|nt)\.system'"):
        load_g_file(bad)
    assert not marker.exists()

    # Control: the payload is live -- an unrestricted unpickler does run it.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "name"),
    [(_Evals(), "builtins.eval"), (_Popen(["true"]), "subprocess.Popen")],
)
def test_other_dangerous_globals_are_refused(obj: object, name: str) -> None:
    with pytest.raises(PLDRError, match=rf"'{name}'"):
        load_tensor_pickle(pickle.dumps([obj]))


def test_command_hidden_in_a_storage_payload_is_refused(tmp_path: Path) -> None:
    # pickle.dump writes storages as torch.storage._load_from_bytes(<legacy torch.save stream>);
    # torch's own _load_from_bytes would unpickle that stream with weights_only=False.
    marker = tmp_path / "marker"
    stream = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"little_endian": True},
            _RunsCommand(_touch_command(marker)),
            [],
        )
    )

    class _Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (stream,))

    payload = pickle.dumps([_Rebuild(_Storage())])
    with pytest.raises(PLDRError, match=r"'(posix|os|nt)\.system'"):
        load_tensor_pickle(payload)
    assert not marker.exists()


class _Rebuild:
    def __init__(self, storage: object) -> None:
        self.storage = storage

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, (2, 2), (2, 1), False, collections.OrderedDict()),
        )


def test_zip_torch_save_with_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pt"
    torch.save([torch.eye(2), _RunsCommand(_touch_command(marker))], bad)
    with pytest.raises(PLDRError, match=r"refused to unpickle .(posix|os|nt)\.system"):
        load_g_file(bad)
    assert not marker.exists()


def test_view_outside_its_storage_is_refused() -> None:
    storage = torch.arange(4.0).untyped_storage()

    class _Big:
        def __reduce__(self):
            return (
                torch._utils._rebuild_tensor_v2,
                (
                    torch.storage.TypedStorage(
                        wrap_storage=storage, dtype=torch.float32, _internal=True
                    ),
                    0,
                    (100,),
                    (1,),
                    False,
                    collections.OrderedDict(),
                ),
            )

    with pytest.raises(PLDRError, match="reaches element 99 of a storage of 4"):
        load_tensor_pickle(pickle.dumps([_Big()]))


@pytest.mark.parametrize("data", [b"", b"\x80\x05garbage", b"not a pickle at all"])
def test_garbage_is_a_one_line_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "g.pkl"
    path.write_bytes(data)
    with pytest.raises(PLDRError) as info:
        load_g_file(path)
    assert "\n" not in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(PLDRError, match="not found"):
        load_g_file("/nonexistent/g.pkl")


# ---------------------------------------------------------------------- other pickle forms


def test_plain_pickle_of_views_and_protocol_2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = torch.randn(3, 2, 5, 5)
    g_list = [base[0:1], base[1:2].transpose(-1, -2), base[2:3]]  # shared storage, a strided view
    for protocol in (2, 5):
        got = load_tensor_pickle(pickle.dumps(g_list, protocol=protocol))
        assert all(torch.equal(x, y) for x, y in zip(got, g_list, strict=True))


def test_legacy_and_zip_torch_save(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pairs = [[torch.rand(1, 2, 4, 4), torch.randn(1, 2, 4, 4)] for _ in range(3)]
    for zipped in (False, True):
        path = tmp_path / f"g_{zipped}.pt"
        torch.save(pairs, path, _use_new_zipfile_serialization=zipped)
        entries = load_g_file(path)
        for e, (ra, rg) in zip(entries, pairs, strict=True):
            assert e.A_LM is not None and torch.equal(e.A_LM, ra) and torch.equal(e.G_LM, rg)


def test_double_and_half_storages() -> None:
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        t = torch.randn(1, 2, 3, 3).to(dtype)
        (got,) = load_tensor_pickle(pickle.dumps([t]))
        assert got.dtype == dtype and torch.equal(got, t)


# ---------------------------------------------------------------------- safetensors form


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    pairs = [(torch.rand(1, 3, 8, 8), torch.randn(1, 3, 8, 8)) for _ in range(2)]
    path = save_g_file(
        tmp_path / "sub" / "g.safetensors", pairs, metadata={"model": "tiny", "step": 7}
    )
    from safetensors.torch import load_file

    assert sorted(load_file(str(path))) == [
        "layer0.A_LM",
        "layer0.G_LM",
        "layer1.A_LM",
        "layer1.G_LM",
    ]
    entries = load_g_file(path)
    for e, (ra, rg) in zip(entries, pairs, strict=True):
        assert e.A_LM is not None and torch.equal(e.A_LM, ra) and torch.equal(e.G_LM, rg)
    meta = read_g_metadata(path)
    assert meta["format"] == G_FILE_FORMAT
    assert (meta["num_layers"], meta["num_heads"], meta["dk"]) == ("2", "3", "8")
    assert meta["model"] == "tiny" and meta["step"] == "7"


def test_metadata_of_other_formats_is_empty(paper_g_dir: Path, tmp_path: Path) -> None:
    # Only a safetensors header is read: a pickle, a short file and a header length past the end
    # of the file all give {} (never an error, never a read of the whole file).
    assert read_g_metadata(paper_g_dir / PREDEFINED.format("IDENTITY")) == {}
    (tmp_path / "short").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{")
    assert read_g_metadata(tmp_path / "short") == {}
    (tmp_path / "cut").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{}")
    assert read_g_metadata(tmp_path / "cut") == {}


def test_g_only_round_trip_from_a_paper_file(paper_g_dir: Path, tmp_path: Path) -> None:
    source = paper_g_dir / PREDEFINED.format("PLDRv51_110M_1")
    path = save_g_file(tmp_path / "g.safetensors", load_g_file(source))
    from safetensors.torch import load_file

    assert sorted(load_file(str(path))) == [f"layer{i}.G_LM" for i in range(5)]
    for e, ref in zip(load_g_file(path), load_g_file(source), strict=True):
        assert e.A_LM is None and torch.equal(e.G_LM, ref.G_LM)


def test_golden_expected_file_reads_as_g_list(golden_dir: Path, golden_expected: dict) -> None:
    # Other keys (logits, Gi.layer0.G_LM, ...) are ignored; layer{i}.A_LM/G_LM are taken.
    entries = load_g_file(golden_dir / "expected.safetensors")
    assert len(entries) == 2
    for i, e in enumerate(entries):
        assert torch.equal(e.G_LM, golden_expected[f"layer{i}.G_LM"])
        assert e.A_LM is not None and torch.equal(e.A_LM, golden_expected[f"layer{i}.A_LM"])


def test_g_entries_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(PLDRError, match="expected \\[..., dk, dk\\]"):
        g_entries([torch.zeros(1, 2, 3, 4)])
    with pytest.raises(PLDRError, match="layer 1 G_LM has shape"):
        g_entries([torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)])
    with pytest.raises(PLDRError, match="layer 0 A_LM"):
        g_entries([(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4))])
    with pytest.raises(PLDRError, match="non-empty list"):
        g_entries([])
    with pytest.raises(PLDRError, match="floating-point"):
        g_entries([torch.zeros(1, 2, 4, 4, dtype=torch.long)])
    from safetensors.torch import save_file

    gap = tmp_path / "gap.safetensors"
    save_file({"layer0.G_LM": torch.zeros(2, 2), "layer2.G_LM": torch.zeros(2, 2)}, str(gap))
    with pytest.raises(PLDRError, match="'layer1.G_LM' is missing"):
        load_g_file(gap)


def test_g_entries_accepts_cache_like_objects() -> None:
    g = torch.randn(1, 2, 4, 4)
    cache = PLDRCache.from_g_list([(None, g), (torch.ones(2, 4, 4), g)])
    entries = g_entries(cache)
    assert entries[0].A_LM is None and torch.equal(entries[0].G_LM, g)
    assert entries[1].A_LM is not None and entries[1].A_LM.shape == (1, 2, 4, 4)
    assert torch.equal(g_entries([GCacheEntry(None, g)])[0].G_LM, g)
    assert len(g_entries(torch.randn(3, 1, 2, 4, 4))) == 3
    with pytest.raises(PLDRError, match="no G-cache"):
        g_entries(PLDRCache())


def test_unpickler_never_imports_from_the_file(tmp_path: Path) -> None:
    # A module a malicious pickle names must not even be imported.
    payload = pickle.dumps([torch.eye(2)]).replace(b"collections", b"notamodule1")
    with pytest.raises(PLDRError, match="'notamodule1.OrderedDict'"):
        load_tensor_pickle(payload)
    assert "notamodule1" not in sys.modules


def test_build_opcode_cannot_alter_the_reader() -> None:
    # BUILD with a slot state calls setattr on whatever a global resolved to. Here a storage
    # payload tries to turn FloatStorage's dtype into int64, and the outer pickle to replace a
    # rebuild function's defaults. Later loads must be unaffected.
    inner = b"\x80\x02ctorch\nFloatStorage\n(N}X\x05\x00\x00\x00dtypectorch\nint64\nstb."
    stream = b"".join(
        pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    )
    stream += inner + pickle.dumps([], protocol=2)

    class _Payload:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (stream,))

    outer = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(N}X\x0c\x00\x00\x00__defaults__(K\x01tstb."
    )
    for evil in (pickle.dumps([_Payload()]), outer):
        with contextlib.suppress(PLDRError):  # refused or harmless; what it leaves behind matters
            load_tensor_pickle(evil)
    t = torch.randn(1, 2, 3, 3)
    (got,) = load_tensor_pickle(pickle.dumps([t]))
    assert got.dtype == torch.float32 and torch.equal(got, t)
