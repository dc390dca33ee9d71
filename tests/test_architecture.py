"""The package's shape: the DAG builds without torch, stages meet only through files, modules stay readable."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sae_pipeline"
MAX_MODULE_LINES = 500
LENGTH_REASON = "Longer than 500 lines because"


def _imported_modules(path: Path) -> set[str]:
    """Every ``sae_pipeline`` module a file imports, at any depth of the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("sae_pipeline")}


def test_no_stage_module_imports_another_stage_module():
    stages = sorted((PACKAGE / "stages").glob("*.py"))
    stage_names = {f"sae_pipeline.stages.{path.stem}" for path in stages if path.stem != "__init__"}
    assert len(stage_names) >= 10
    offenders = {}
    for path in stages:
        own = f"sae_pipeline.stages.{path.stem}"
        imported = {name for name in _imported_modules(path) if name in stage_names | {"sae_pipeline.stages"}} - {own}
        if imported:
            offenders[path.name] = sorted(imported)
    assert offenders == {}


def test_shared_modules_do_not_import_stages():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in _imported_modules(path) if name.startswith("sae_pipeline.stages"))
        for path in PACKAGE.rglob("*.py")
        if "stages" not in path.parts
    }
    assert {name: modules for name, modules in offenders.items() if modules} == {}


def test_long_modules_say_why():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_MODULE_LINES and LENGTH_REASON not in docstring:
            too_long.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    assert too_long == []


def test_layout_and_settings_import_neither_torch_nor_pandas():
    code = "import sys, sae_pipeline.layout, sae_pipeline.settings; print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))"
    printed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"


@pytest.mark.parametrize("configfile", [None, "tests/e2e_config.yaml", "workflow/configs/paper.yaml", "workflow/configs/claim4.yaml"])
def test_dry_run_builds_the_dag_with_torch_unimportable(tmp_path, configfile):
    """A ``torch`` package that raises on import sits first on the path: the dry run must not touch it."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch must not be imported while the DAG is built')\n")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocker"), str(REPO_ROOT)]))
    arguments = ["snakemake", "--dry-run", "--config", f"results_dir={tmp_path / 'results'}"]
    if configfile:
        arguments[2:2] = ["--configfile", configfile]
    completed = subprocess.run(arguments, cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Job stats:" in completed.stdout
