"""The parity suite (tests/test_parity.py) against both transformers versions users run: 5.23.0 and 5.24.0.

This venv has the pinned 5.23.0, which the rest of the test run compares against. `make test` also installs 5.24.0,
without its dependencies, into `<venv>/transformers-5.24`: the venv's packages satisfy its requirements, and
transformers checks them when it is imported. 5.24.0 changed DiffusionGemma's names (`past_key_values` became
`cache`; the old name is accepted until 5.40), turned FlashAttention off for it and dropped two `torch.no_grad`
decorators. None of that changes what the model computes, and this test shows it by running the whole parity suite
under 5.24.0 in a subprocess that has that folder first on its path.
"""

import os
import pathlib
import re
import subprocess
import sys

import transformers

PINNED = "5.23.0"  # pyproject.toml's test extra
OTHER = "5.24.0"
FOLDER = pathlib.Path(sys.prefix) / "transformers-5.24"
ROOT = pathlib.Path(__file__).parent.parent

# Prints the transformers that the tests import (they run in this same process), then runs pytest.
PROBE = (
    "import sys, pytest, transformers; "
    "print('transformers', transformers.__version__, transformers.__file__, flush=True); "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


def test_this_venv_has_the_pinned_transformers():
    """The rest of the run covers the pinned version, so the two versions are covered only if this holds."""
    assert transformers.__version__ == PINNED


def test_parity_suite_passes_under_the_next_transformers():
    assert (FOLDER / "transformers").is_dir(), (
        f"{FOLDER} is missing: `make test` installs it, or run "
        f"`{sys.executable} -m pip install --no-deps --target {FOLDER} transformers=={OTHER}`"
    )
    # The parent's pytest options must not reach the child: a -k or -m there would deselect parity tests.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FOLDER), os.environ.get("PYTHONPATH")]))
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/test_parity.py"]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    lines = run.stdout.splitlines()
    report = "\n".join(lines[-30:]) + run.stderr[-3000:]
    name, version, path = lines[0].split(maxsplit=2) if lines else ("", "", "")
    assert (name, version) == ("transformers", OTHER), report
    assert pathlib.Path(path).is_relative_to(FOLDER), report
    assert run.returncode == 0, report
    # The last line is pytest's summary, e.g. "17 passed, 30 warnings in 9.53s"; anything skipped, deselected or
    # expected to fail would be named there, and none of it may be.
    outcomes = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", lines[-1]) if not kind.startswith("warning")}
    assert set(outcomes) == {"passed"} and outcomes["passed"] > 0, report
