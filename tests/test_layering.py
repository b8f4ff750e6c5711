"""The stage packages import only stages before them: io -> data -> models -> training ->
evaluation -> inference -> viz -> experiments (the multi-run protocols: compare, crossval, benchmark,
demo); ``cli`` wires them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hepaseg

STAGES = ["io", "data", "models", "training", "evaluation", "inference", "viz", "experiments"]
PACKAGE = Path(hepaseg.__file__).parent


def imported_stages(path: Path) -> set[str]:
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hepaseg" and len(parts) > 1 and parts[1] in STAGES:
                stages.add(parts[1])
    return stages


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_point_down_the_chain(stage):
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_stages(path) - allowed)
        for path in sorted((PACKAGE / stage).rglob("*.py"))
        if imported_stages(path) - allowed
    }
    assert not offenders, f"{stage} imports later stages: {offenders}"


def test_the_checker_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from hepaseg.viz import explain\nimport hepaseg.models.registry\nfrom hepaseg import io\n")
    assert imported_stages(probe) == {"viz", "models", "io"}


def test_the_package_root_holds_only_cli_errors_and_version():
    # Every module but the thin CLI, the error class and the version lives in a stage package.
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "cli.py", "errors.py"]
