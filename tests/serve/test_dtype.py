"""The engine's compute dtype: chosen from the CPU's flags with `--dtype auto` (each CPU's /proc/cpuinfo a fixture
here, never the host's), loaded, and said in the start-up line and in /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import CPU

from loradock.cli import main as cli_main
from loradock.kernels.cpu_features import cpu_flags
from loradock.serve.engine import Engine, EngineConfig
from loradock.serve.metrics import ServerMetrics
from loradock.serve.models.dtype import DtypeChoice, choose_dtype

CPUINFO = Path(__file__).with_name("cpuinfo")  # /proc/cpuinfo of one core of each CPU, as Linux writes it
NO_BF16 = "the CPU has no bf16 instructions"


@pytest.mark.parametrize("cpu,dtype,reason", [
    ("sapphire-rapids", torch.bfloat16, "the CPU has AMX-BF16"),  # AMX-BF16 and AVX512-BF16: AMX named
    ("genoa", torch.bfloat16, "the CPU has AVX512-BF16"),
    ("ice-lake", torch.float32, NO_BF16),  # AVX-512 without its bf16 instructions
    ("epyc-zen3", torch.float32, NO_BF16),  # AVX2 only
    ("graviton3", torch.float32, NO_BF16),  # Arm: its bf16 is neither AMX nor AVX512-BF16
])
def test_auto_follows_the_cpu_flags(cpu, dtype, reason):
    flags = cpu_flags(CPUINFO / f"{cpu}.txt")
    assert choose_dtype("auto", CPU, flags) == DtypeChoice(dtype, reason)


def test_a_cpuinfo_without_flags_means_float32(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: something\n")
    assert cpu_flags(tmp_path / "cpuinfo") == frozenset()
    assert choose_dtype("auto", CPU, cpu_flags(tmp_path / "cpuinfo")) == DtypeChoice(torch.float32, NO_BF16)


def test_an_asked_dtype_wins_over_the_hardware():
    amx, avx2 = cpu_flags(CPUINFO / "sapphire-rapids.txt"), cpu_flags(CPUINFO / "epyc-zen3.txt")
    assert choose_dtype("float32", CPU, amx) == DtypeChoice(torch.float32, "asked for")
    assert choose_dtype("bfloat16", CPU, avx2) == DtypeChoice(torch.bfloat16, "asked for")
    assert choose_dtype("auto", torch.device("cuda"), avx2) == DtypeChoice(torch.bfloat16, "on CUDA")
    assert str(choose_dtype("auto", CPU, amx)) == "bfloat16: the CPU has AMX-BF16"


def test_the_engine_runs_the_chosen_dtype_and_says_so_in_metrics(model_dir):
    engine = Engine.from_config(EngineConfig(model=str(model_dir("llama")), device="cpu", max_gpu_adapters=0,
                                             kv_cache_memory="8MiB"))
    chosen = choose_dtype("auto", CPU)  # this host's: the choice itself is tested above
    assert engine.dtype == chosen
    assert {p.dtype for p in engine.runner.model.parameters()} == {chosen.dtype}
    assert engine.cache.keys[0].dtype == chosen.dtype
    metrics = ServerMetrics(engine)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    (sample,) = families["loradock_dtype_info"].samples
    assert (sample.name, sample.labels, sample.value) == (
        "loradock_dtype_info", {"dtype": chosen.name, "reason": chosen.reason}, 1.0
    )


def test_the_start_up_line_says_the_dtype_and_why(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir("llama")), "--prompt", "hi", "--max-tokens", "1",
            "--threads", str(torch.get_num_threads())]
    assert cli_main(argv + ["--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "loradock: compute dtype bfloat16: asked for"
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"loradock: compute dtype {choose_dtype('auto', CPU)}"
