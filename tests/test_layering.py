"""Imports point downward only (docs/DESIGN.md): every module has a floor in HOUSE and imports only modules on lower
floors (so there is no cycle), math never imports I/O, library never imports orchestration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "spin_diffusion"

# module -> modules (of this package, or third-party roots) it must never import
FORBIDDEN = {
    "losses": {"diffusers", "transformers", "accelerate", "spin_diffusion"},
    "sampling": {"spin_diffusion.trainer", "spin_diffusion.self_play", "spin_diffusion.models", "spin_diffusion.data"},
    "families": {
        "spin_diffusion.trainer",
        "spin_diffusion.self_play",
        "spin_diffusion.data",
        "spin_diffusion.sampling",
        "spin_diffusion.cache",
    },
    "models": {"spin_diffusion.trainer", "spin_diffusion.self_play", "spin_diffusion.data", "spin_diffusion.sampling"},
    "data": {"spin_diffusion.trainer", "spin_diffusion.self_play", "spin_diffusion.sampling"},
    "cache": {"spin_diffusion.trainer", "spin_diffusion.self_play", "spin_diffusion.sampling"},
    "trainer": {"spin_diffusion.self_play", "spin_diffusion.data", "spin_diffusion.model_eval"},
    "scoring": {"diffusers", "spin_diffusion.sampling", "spin_diffusion.self_play", "spin_diffusion.models"},
    "report": {"diffusers", "torch", "spin_diffusion.models", "spin_diffusion.self_play"},
    "config": {"torch", "diffusers", "spin_diffusion.models", "spin_diffusion.self_play"},
    "distributed": {"diffusers", "spin_diffusion.models", "spin_diffusion.self_play", "spin_diffusion.trainer"},
    "preemption": {"diffusers", "accelerate", "spin_diffusion"},
    "preflight": {"torch", "diffusers", "spin_diffusion.models", "spin_diffusion.self_play"},
    # the loss for other loops: torch and the objective table only
    "training_loss": {"diffusers", "transformers", "accelerate", "spin_diffusion.trainer", "spin_diffusion.models"},
    # the table of objectives sits just above the pure losses: it names them, it runs nothing
    "objectives": {
        "diffusers",
        "transformers",
        "accelerate",
        "spin_diffusion.trainer",
        "spin_diffusion.self_play",
        "spin_diffusion.models",
        "spin_diffusion.families",
        "spin_diffusion.config",
    },
}


# The house, floor by floor (docs/DESIGN.md draws it). A module imports only from floors below its own; a new
# module gets a floor here, or the test fails.
HOUSE = [
    # 0. foundations: no import of this package at run time
    {
        "errors",
        "atomic",
        "losses",
        "preemption",
        "encoding",
        "lean_imports",
        "__init__",
        "demo.__init__",
        "scorers.__init__",
    },
    # 1. configuration, process roles, the objective table, the Hub, files of a run, the shapes world, families, LoRA,
    # what a run prints
    {
        "console",
        "config",
        "distributed",
        "objectives",
        "hub",
        "images",
        "rundir",
        "world",
        "families",
        "lora",
        "prepare",
    },
    # 2. models and data; the loss of an objective for other training loops; the relation world (built on the shapes
    # world's palette and drawing)
    {"models", "card", "data", "preflight", "report", "scorers._common", "training_loss", "relation_world"},
    # 3. built models, writing models, the latent cache, the scorers
    {
        "presets",
        "export",
        "cache",
        "scorers.clip",
        "scorers.hpsv2",
        "scorers.imagereward",
        "scorers.shapes",
        "demo.pretrain",
    },  # fmt: skip
    # 4. sampling and scoring images
    {"sampling", "scoring"},
    # 5. training, and rendering + scoring models
    {"trainer", "model_eval"},
    # 5½. the reference's terms stored before training (train.precompute_reference)
    {"reference"},
    # 6. the self-play loop and the demo's evaluation
    {"self_play", "demo.evaluate"},
    # 7. the demo
    {"demo.runner"},
    # 8. the public Python API (the package's __init__ re-exports it lazily, by name, so it stays on floor 0); what the
    # demo's fork server imports for its workers
    {"api", "demo._preload"},
    # 9. the command line, a thin layer over the API
    {"cli"},
]


def _module_files() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py") if "assets" not in p.parts
    }


def _runtime_imports(path: Path) -> set[str]:
    """This package's modules that `path` imports when it runs (imports under `if TYPE_CHECKING:` are types only)."""
    files = _module_files()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spin_diffusion":
            base = node.module.removeprefix("spin_diffusion").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in files else base or "__init__")
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("spin_diffusion.") for a in node.names if a.name.startswith("spin_diffusion.")
            }
    return {name if name in files else f"{name}.__init__" for name in found}


def test_every_module_has_a_floor_and_imports_only_from_below():
    floor = {module: level for level, modules in enumerate(HOUSE) for module in modules}
    files = _module_files()
    assert set(files) == set(floor), (
        f"not in HOUSE: {sorted(set(files) - set(floor))}; gone: {sorted(set(floor) - set(files))}"
    )
    upward = [
        f"{module} (floor {floor[module]}) imports {name} (floor {floor[name]})"
        for module, path in files.items()
        for name in _runtime_imports(path)
        if name != module and floor[name] >= floor[module]
    ]
    assert not upward, "\n".join(upward)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_imports_point_downward(module):
    imported = _imports(PKG / f"{module}.py")
    bad = {
        name for name in imported for banned in FORBIDDEN[module] if name == banned or name.startswith(banned + ".")
    }
    assert not bad, f"{module}.py imports {sorted(bad)}"


def test_scorers_do_not_import_diffusers_or_orchestration():
    for path in (PKG / "scorers").glob("*.py"):
        imported = _imports(path)
        assert not any(n.split(".")[0] == "diffusers" for n in imported), path.name
        assert not any(n.startswith(("spin_diffusion.self_play", "spin_diffusion.sampling")) for n in imported), (
            path.name
        )
