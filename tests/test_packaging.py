"""The repository root as the working directory: what `python -m loradock...` and `python -c` see from there.

Python puts the working directory first on sys.path, so the top-level folders (serve/, kernels/, ...) are
importable by their bare names from the root. They are namespace portions of `loradock` (no `__init__.py`), so
an installed regular package of the same name (Hugging Face's `kernels`, which transformers imports) wins.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("serve", "train", "kernels", "adapters", "loadtest")


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("folder", TOP_LEVEL)
def test_a_top_level_folder_is_a_namespace_portion(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a package named {folder}"


def test_the_cli_help_runs_from_the_root():
    result = run_in_root("-m", "loradock", "--help")
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "serve" in result.stdout


def test_the_dependencies_and_our_subpackages_import_together_from_the_root():
    code = "import bitsandbytes, transformers, loradock.kernels.lora, loradock.serve.engine; print('ok')"
    result = run_in_root("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_generate_runs_from_the_root(model_dir):
    result = run_in_root("-m", "loradock", "generate", "--model", str(model_dir("llama")),
                         "--prompt", "hello", "--max-tokens", "3", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert "1 requests, 3 tokens" in result.stdout


def test_hugging_faces_kernels_wins_the_bare_name_from_the_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    result = run_in_root("-c", "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).resolve().is_relative_to(ROOT)


def without(package: str, *argv: str) -> subprocess.CompletedProcess:
    """`loradock ARGV...` from the root in a Python where `package` cannot be imported (as without its extra)."""
    code = (f"import sys; sys.modules[{package!r}] = None; from loradock.cli import main; "
            f"sys.exit(main({list(argv)!r}))")
    return run_in_root("-c", code)


def test_replicas_without_ray_name_the_cluster_extra(model_dir):
    result = without("ray", "serve", "--model", str(model_dir("llama")), "--replicas", "1", "--port", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "loradock: error: --replicas runs the engines on Ray Serve, which is not installed: "
        "pip install 'loradock[cluster]'"
    ]


def test_s3_adapters_without_s3fs_name_the_s3_extra(model_dir):
    result = without("s3fs", "generate", "--model", str(model_dir("llama")), "--adapters", "s3://bucket/adapters",
                     "--prompt", "hi", "--max-tokens", "1")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("loradock: error: s3://bucket/adapters: s3:// needs a package that is not installed: "
                    "pip install 'loradock[s3]'"), result.stderr


def test_the_command_module_runs_as_python_m_loradock():
    result = run_in_root("-m", "loradock", "--help")
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("generate", "serve", "train", "eval", "demo", "loadtest"))
