"""The import layers (`.importlinter`, ../shared/DESIGN.md "Layers") and no import cycles among loradock's modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loradock", "loradock.kernels", "loradock.adapters", "loradock.serve", "loradock.train", "loradock.loadtest")


def test_the_import_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_imports_itself_back():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)  # type-checking imports count: they tie modules too
    assert {"loradock.serve.engine.engine", "loradock.kernels.lora"} <= graph.modules  # the namespace portions read
    cycles = sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(imported, importer)
    )
    assert not cycles, f"import cycles through: {cycles}"
