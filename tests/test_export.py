"""``prune --format compressed-tensors``: the boundary it stops at, and that it stops before any work."""
from __future__ import annotations

import subprocess
import sys

from compressed_tensors.compressors import BaseCompressor

from vlmprune import cli


def test_the_installed_compressed_tensors_has_no_sparse_compressor():
    """Why the export refuses: when a release in constraints.txt brings the sparse formats back, this fails,
    and the refusal should become a real export."""
    names = BaseCompressor.registered_names()
    assert "dense" in names
    assert not {"sparse-24-bitmask", "sparse-bitmask"} & set(names)


def test_prune_refuses_compressed_tensors_in_one_line_before_pruning(tmp_path, capsys):
    out = tmp_path / "ct"
    code = cli.main(["prune", "--model", "toy-large", "--method", "atv", "--pattern", "2:4",
                     "--format", "compressed-tensors", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no sparse format" in err and "0.14" in err
    assert not out.exists()


def test_the_refusal_answers_before_torch_loads(tmp_path):
    code = ("import sys; from vlmprune.cli import main\n"
            f"rc = main(['prune', '--model', 'toy-large', '--method', 'atv', '--format', 'compressed-tensors', "
            f"'--out', {str(tmp_path / 'x')!r}])\nprint(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
