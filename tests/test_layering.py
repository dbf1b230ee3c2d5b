"""The folders follow the data flow, shards -> avatars -> cluster -> jobs (all may use common):
imports only point that way (in every function body too, not only at module level)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package -> the project packages it may import
ALLOWED = {
    "common": {"common"},
    "shards": {"common", "shards"},
    "avatars": {"common", "shards", "avatars"},
    "cluster": {"common", "shards", "avatars", "cluster"},
    "jobs": {"common", "shards", "avatars", "cluster", "jobs"},
}
#: folders with a narrower rule: the nightly report reads results.json and needs no model code
NARROWER = {"cluster/report": {"common", "cluster"}}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every absolute import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED) + sorted(NARROWER))
def test_imports_follow_the_data_flow(package):
    allowed = NARROWER.get(package) or ALLOWED[package]
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    wrong = [f"{path.relative_to(REPO)}:{line} imports {target}"
             for path in files for target, line in sorted(project_imports(path)) if target not in allowed]
    assert wrong == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cluster.status import StatusReporter\n    import jobs.launch_all\n")
    assert project_imports(module) == {("cluster", 2), ("jobs", 3)}
