"""The house's boundaries are contracts (pyproject.toml [tool.importlinter]), checked by lint-imports.

Each test puts one import that runs the wrong way into a copy of the tree and checks that
lint-imports refuses it, naming the contract and the import: a contract that passes whatever
the code does would be no contract.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="needs import-linter (the test extra)")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("house")
    shutil.copytree(ROOT / "kbridge", root / "kbridge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def with_import(tree: Path, module: str, line: str) -> Path:
    """A copy of TREE in which MODULE (a path under kbridge/) also has LINE."""
    copy = tree.parent / f"{tree.name}-{module.replace('/', '-')}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(tree, copy)
    path = copy / "kbridge" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: F401, E402\n")
    return copy


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    proc = lint(tree)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "said"),
    [
        ("arch.py", "import kbridge.cli", "layers:", "kbridge.arch is not allowed to import kbridge.cli"),
        (
            "mechanisms/engine.py",
            "import kbridge.probe",
            "layers:",
            "kbridge.mechanisms.engine -> kbridge.probe",
        ),
        (
            "probe.py",
            "import kbridge.targets.qemu.vm",
            "targets are the only door",
            "kbridge.probe is not allowed to import kbridge.targets.qemu",
        ),
        ("spec.py", "import rich", "only the CLI draws", "kbridge.spec is not allowed to import rich"),
        (
            "mechanisms/bpf/plan.py",
            "import kbridge.mechanisms.kmod.render",
            "one way of driving",
            "kbridge.mechanisms.bpf",
        ),
    ],
)
def test_an_import_the_wrong_way_is_refused(tree: Path, module: str, line: str, contract: str, said: str) -> None:
    proc = lint(with_import(tree, module, line))
    assert proc.returncode != 0
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and said in broken, proc.stdout[-3000:]
