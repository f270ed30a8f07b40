"""Config errors and --help answer before torch is imported (the 'first second' promise)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from pldr_llm.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
print(code, "torch" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--preset", "tiny", "--out", "OUT", "--batch_size", "0"],
        ["train", "--preset", "tiny", "--out", "OUT", "--no_such_key", "1"],
    ],
)
def test_no_torch_import_before_the_answer(tmp_path, argv):
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv)], capture_output=True, text=True, timeout=60
    )
    code, torch_loaded = result.stdout.split()[-2:]
    assert code in ("0", "2"), result.stderr
    assert torch_loaded == "False"
    if code == "2":
        assert result.stderr.strip().startswith("pldr-llm: error:")
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
