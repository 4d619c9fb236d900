"""Imports point downward only (docs/DESIGN.md): math never imports I/O, library never imports orchestration."""

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
    "evaluation": {"diffusers", "spin_diffusion.sampling", "spin_diffusion.self_play", "spin_diffusion.models"},
    "report": {"diffusers", "torch", "spin_diffusion.models", "spin_diffusion.self_play"},
    "config": {"torch", "diffusers", "spin_diffusion.models", "spin_diffusion.self_play"},
    "distributed": {"diffusers", "spin_diffusion.models", "spin_diffusion.self_play", "spin_diffusion.trainer"},
    "preemption": {"diffusers", "accelerate", "spin_diffusion"},
    "preflight": {"torch", "diffusers", "spin_diffusion.models", "spin_diffusion.self_play"},
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
