"""Rules of the code base that a reader relies on (the import contracts run in ``make test``
through ``lint-imports``; the two rules below are checked here)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(
    p
    for p in (ROOT / "napari_selfreg").rglob("*.py")
    if "widgets" not in p.parts and p.name not in ("cli.py", "demo.py")
)
MAX_LINES = 600


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_core_does_not_import_the_training_module():
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in imported_modules(p) if n.startswith("napari_selfreg.training")
        )  # fmt: skip
        for p in CORE
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_module_is_over_600_lines():
    files = [*(ROOT / "napari_selfreg").rglob("*.py"), *(ROOT / "training").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"split these modules: {long}"


def test_every_subpackage_is_installed():
    """pyproject lists the packages explicitly (training/ maps to napari_selfreg.training):
    a new subpackage missing there works in a checkout and breaks in a wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "napari_selfreg").rglob("__init__.py")
    }
    found |= {"napari_selfreg.training"}
    assert found <= listed, sorted(found - listed)
