"""Build the API reference (HTML) from the docstrings of the public API with pdoc; any pdoc warning is an error.

    .venv/bin/python scripts/build_docs.py [OUT]      (default: build/api; scripts/docs.sh sets up and calls this)

Documents the package `spin_diffusion` (the names in its ``__all__``) and `spin_diffusion.losses`, the loss math that
`spin_diffusion.spin_loss` runs. Every other module is internal and left out.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

MODULES = ["spin_diffusion", "spin_diffusion.losses"]
# every submodule but the documented ones (pdoc walks a package's submodules; these patterns drop them again)
EXCLUDE = r"!spin_diffusion\.(?!losses$)"


def build(out: Path) -> list[Path]:
    """Write the reference to ``out`` (index.html, spin_diffusion.html, ...); -> the pages written.
    Raises on any warning pdoc emits (a missing module, a docstring it cannot parse, an unresolvable link)."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", footer_text="spin-diffusion API reference", search=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"pdoc(\..*)?$")
        # losses.py has `from __future__ import annotations`, so a NamedTuple's generated __init__ holds the string
        # "Tensor", which pdoc evaluates where typing.NamedTuple made the function; the fields show their types
        warnings.filterwarnings(
            "ignore",
            message=r"Error parsing type annotation ForwardRef\('Tensor'\) for "
            r"spin_diffusion\.losses\.DenoiseErrors\.__init__",
        )
        pdoc.pdoc(*MODULES, EXCLUDE, output_directory=out)
    pages = sorted(out.rglob("*.html"))
    documented = {p.relative_to(out).with_suffix("").as_posix().replace("/", ".") for p in pages}
    missing = {m for m in MODULES if m not in documented}
    if missing:
        raise RuntimeError(f"pdoc wrote no page for {sorted(missing)}")
    return pages


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/api")
    pages = build(out)
    print(f"API reference: {out / 'index.html'} ({len(pages)} pages)")
