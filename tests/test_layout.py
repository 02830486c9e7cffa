"""The library's core never imports the research harnesses in ``pte.lab`` (only the CLI, the top, may)."""

import ast
from pathlib import Path

import pte

ROOT = Path(pte.__file__).resolve().parent
TOP = {"cli.py", "__main__.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_do_not_import_the_lab():
    core = [p for p in ROOT.rglob("*.py") if "lab" not in p.relative_to(ROOT).parts and p.name not in TOP]
    assert len(core) > 20  # the scan sees the library
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("pte.lab"))
                 for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_an_import_of_the_lab(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from pte.lab import bench\n    import pte.lab.demo\n")
    assert {"pte.lab", "pte.lab.bench", "pte.lab.demo"} <= imported_modules(src)
