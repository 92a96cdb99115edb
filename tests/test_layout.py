"""The project's shape, checked: imports point down the layers, no function or class outgrows one
screen, and the front-door docs stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "host", "media", "models", "training")
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 50, 200

# what each package may import of the project's own packages (the direction of the layers)
ALLOWED = {
    "media": set(),
    "host": set(),
    "models": set(),
    "training": {"host", "media", "models"},
    "app": {"app", "host", "media", "models"},
}
# the composition root: the two modules that build the HTTP app from every layer (app.main) and run
# it (app.__main__); every other module of app/ outside app/api/ lies beneath the HTTP layer
ROOTS = {"app/main.py", "app/__main__.py"}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(ROOT).with_suffix("").parts[: -node.level]
                names.add(".".join((*base, node.module or "")).rstrip("."))
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_beneath_them(package: str) -> None:
    own = set(ALLOWED) | {"bench", "tests"}
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(package)
        for name in imported(path)
        if name.split(".")[0] in own - ALLOWED[package] - {package}
    }
    assert not wrong, sorted(wrong)


def test_nothing_beneath_the_http_layer_imports_it() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules("app")
        if "api" not in path.relative_to(ROOT / "app").parts and str(path.relative_to(ROOT)) not in ROOTS
        for name in imported(path)
        if name == "app.api" or name.startswith("app.api.")
    ]
    assert not wrong, wrong


def test_the_decoders_and_the_settings_import_no_torch() -> None:
    """What a decode process imports (app.uploads, app.processes, media) and the settings stay small."""
    import subprocess
    import sys

    code = (
        "import sys, app.settings, app.uploads, app.processes, media, host.malloc; "
        "print(sorted(m for m in ('torch', 'fastapi', 'models') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def oversized() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                    if lines > limit:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_50_lines_and_no_class_over_200() -> None:
    assert not oversized(), oversized()


@pytest.mark.parametrize(("doc", "limit_kb"), [("README.md", 12), ("docs/performance.md", 25)])
def test_the_front_door_docs_stay_short(doc: str, limit_kb: int) -> None:
    size = (ROOT / doc).stat().st_size
    assert size <= limit_kb * 1000, f"{doc} is {size} bytes, over {limit_kb} KB"


def test_every_results_file_is_cited_by_the_docs() -> None:
    """bench/results/ holds only what a doc cites (re-measuring overwrites a file in place)."""
    cited = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    cited += (ROOT / "bench" / "README.md").read_text() + (ROOT / "bench" / "gpu_check.sh").read_text()
    results = ROOT / "bench" / "results"
    uncited = [str(p.relative_to(results)) for p in sorted(results.rglob("*")) if p.is_file() and p.name not in cited]
    assert not uncited, uncited


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject.toml lists the packages by name: a new subpackage left off it would be missing from the
    installed project (and the container) though every test run from the source tree passes."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    # folders of data files only (the page): listed so that their files ship, with no module in them
    data_only = {name for name in setuptools["package-data"] if name not in found}
    assert all(not list((ROOT / name.replace(".", "/")).glob("*.py")) for name in data_only)
    assert found | data_only == listed
