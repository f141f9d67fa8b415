"""The repository installs as one distribution, `dgemma`, whose subpackages are the top-level folders and which
ships the Sudoku models as package data."""

import subprocess
import sys
import zipfile
from pathlib import Path

import dgemma

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_from_the_repository():
    assert Path(dgemma.__file__).resolve() == ROOT / "__init__.py"


def test_wheel_holds_the_subpackages_and_imports(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dgemma-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = ("model/model.py", "model/checkpoint.py", "runtime/pipeline.py", "training/trainer.py", "sudoku/solve.py")
    for module in ("__init__.py", "cli.py", *modules):
        assert f"dgemma/{module}" in names
    shipped = [f.relative_to(ROOT) for f in (ROOT / "sudoku" / "models").glob("*/*")]
    assert len(shipped) == 4 * 4  # config, generation config, weights, tokenizer; 4x4 and 6x6, each with a baseline
    assert all(f"dgemma/{f}" in names for f in shipped)
    assert not any(
        n.startswith(("model/", "runtime/", "training/", "sudoku/", "tests/", "dgemma/tests/")) for n in names
    )  # no bare packages
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dgemma = dgemma.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the installed package finds its own shipped model and loads it through the official loader
    probe = (
        "import dgemma, dgemma.cli; from dgemma import Pipeline; from dgemma.sudoku.solve import shipped; "
        "Pipeline.from_pretrained(shipped(4)); print(dgemma.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert Path(done.stdout.strip()).resolve() == site / "dgemma" / "__init__.py"
