"""Mixes of adapters over HTTP on the tiny llama (fp32): a named mix made by the admin API and a mix per request each
decode PEFT's greedy tokens through `add_weighted_adapter`'s mix, for every method and with a DoRA source, alone
and in a batch; a mix owns its weights, is built once per recipe, is listed with its recipe, survives a restart with
a registry, is scoped by tenants, and bad recipes are 400s naming the field. One server for most of the module
(slots and host cache small, so mixes are evicted and read again), others for restarts and tenants."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from peft_mix import RECIPES, peft_mix_greedy, write_sources

from http_client import call
from loradock.adapters.merge import MergeRecipe
from loradock.serve.api.tenants import hash_key
from server_support import MODEL_NAME, ServerThread
from support import varied_prompts, wait_until

MAX_NEW = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The cache folder (mixes are written under it), set before the module's servers start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORADOCK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loradock-cache"))
        yield


@pytest.fixture(scope="module")
def sources(model_dir, tmp_path_factory):
    root = write_sources(model_dir("llama"), tmp_path_factory.mktemp("mix-sources"))
    shutil.copytree(root / "a", root / "elsewhere")  # a's weights, trained (it says) on another base
    config = json.loads((root / "elsewhere" / "adapter_config.json").read_text())
    (root / "elsewhere" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someone/other-model"}))
    return root


@pytest.fixture(scope="module")
def server(cache, model_dir, sources):
    with ServerThread(model_dir("llama"), adapters_dir=sources, allow_adapter_paths=True, max_gpu_adapters=2,
                      max_cpu_adapters=2, max_lora_rank=12) as running:
        yield running


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return varied_prompts(tokenizer, 2, seed=5)


def tokens(server, prompt, headers=None, **body) -> list[int]:
    reply = complete(server, prompt, headers, **body)
    assert reply.status == 200, reply.body
    return reply.json()["choices"][0]["token_ids"]


def complete(server, prompt, headers=None, **body):
    return call(server.url, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_NEW,
                                                        "temperature": 0, "return_token_ids": True, **body},
                headers=headers)


def per_request(recipe: MergeRecipe) -> dict:
    body = {"adapters": [{"name": n, "weight": w} for n, w in recipe.adapters], "merge_method": recipe.method}
    if recipe.density is not None:
        body["density"] = recipe.density
    return {**body, "merge_seed": recipe.seed}


def mix(server, name: str, recipe: MergeRecipe | dict):
    merge = recipe.to_dict() if isinstance(recipe, MergeRecipe) else recipe
    return call(server.url, "POST", "/v1/adapters", {"name": name, "merge": merge}, headers=server.admin_headers)


@pytest.mark.parametrize("method", RECIPES)
def test_a_named_mix_and_a_mix_per_request_decode_what_peft_decodes(method, server, sources, prompts,
                                                                    model_dir):
    recipe = RECIPES[method]
    expected = peft_mix_greedy(model_dir("llama"), sources, recipe, prompts, MAX_NEW)
    assert mix(server, f"mix-{method}", recipe).status == 201
    assert [tokens(server, p, model=f"mix-{method}") for p in prompts] == expected
    assert [tokens(server, p, **per_request(recipe)) for p in prompts] == expected


def test_mixes_decode_in_a_batch_with_other_adapters_as_they_do_alone(server, prompts):
    assert mix(server, "batched", RECIPES["cat"]).status == 201
    requests = [{"model": "batched"}, per_request(RECIPES["ties"]), {"model": "a"}, {}] * 2
    alone = [tokens(server, prompts[i % 2], **body) for i, body in enumerate(requests)]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda i: tokens(server, prompts[i % 2], **requests[i]), range(len(requests))))
    assert together == alone


def test_a_chat_through_the_openai_client_mixes_per_request_as_the_admin_api_does(server):
    recipe = RECIPES["dare_linear"]
    assert mix(server, "chat-mix", recipe).status == 201
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Say something."}]

    def chat(model: str, **extra) -> str:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                                extra_body=extra or None)
        return answer.choices[0].message.content

    mixed = per_request(recipe)
    assert chat(MODEL_NAME, **mixed) == chat("chat-mix") != chat(MODEL_NAME)


def test_an_evicted_mix_per_request_is_mixed_again_alike(server, prompts):
    recipe = MergeRecipe((("b", 0.5), ("a", -0.5)), "dare_ties", density=0.5, seed=7)
    before = tokens(server, prompts[0], **per_request(recipe))
    version = server.engine.resolve_adapter(next(reversed(server.engine.adapters.mixes._per_request)))
    for other in ("a", "b", "c"):  # past the two host copies
        tokens(server, prompts[0], model=other)
    assert version.weights is None
    assert tokens(server, prompts[0], **per_request(recipe)) == before


def test_a_mix_is_listed_with_its_recipe(server):
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "ties", density=0.7)
    created = mix(server, "listed", recipe)
    assert created.status == 201 and created.json()["merge"] == recipe.to_dict()
    listed = call(server.url, "GET", "/v1/adapters", headers=server.admin_headers).json()["data"]
    listed = {adapter["name"]: adapter for adapter in listed}
    assert listed["listed"]["merge"] == recipe.to_dict() and listed["listed"]["rank"] == 4
    assert listed["a"]["merge"] is None


def test_reloading_a_source_leaves_a_mix_made_from_it_unchanged(server, sources, prompts, tmp_path):
    changing = shutil.copytree(sources / "a", tmp_path / "changing")
    admin = server.admin_headers
    loaded = call(server.url, "POST", "/v1/adapters", {"name": "changing", "path": str(changing)}, headers=admin)
    assert loaded.status == 201
    assert mix(server, "owns-weights", MergeRecipe((("changing", 1.0), ("b", 0.5)))).status == 201
    before = tokens(server, prompts[0], model="owns-weights")
    shutil.rmtree(changing)
    shutil.copytree(sources / "b", changing)
    assert call(server.url, "POST", "/v1/adapters/changing/reload", headers=admin).status == 200
    for other in ("a", "b", "c", "mix-linear"):  # through the two slots and the two host copies: evicted, read again
        tokens(server, prompts[0], model=other)
    assert tokens(server, prompts[0], model="owns-weights") == before
    assert tokens(server, prompts[0], **per_request(MergeRecipe((("changing", 1.0), ("b", 0.5))))) != before


def test_an_unloaded_mix_leaves_no_folder_behind(server):
    folder = Path(mix(server, "short-lived", MergeRecipe((("a", 1.0),))).json()["path"])
    assert folder.is_dir()
    assert call(server.url, "DELETE", "/v1/adapters/short-lived", headers=server.admin_headers).status == 200
    assert wait_until(lambda: not folder.exists())


def test_a_mix_per_request_is_built_once_per_recipe(server, prompts):
    recipe = MergeRecipe((("b", 0.25), ("a", 0.75)))
    mixes = server.engine.adapters.mixes
    first = tokens(server, prompts[0], **per_request(recipe))
    built = dict(mixes._per_request)
    assert tokens(server, prompts[1], **per_request(recipe)) and dict(mixes._per_request) == built
    assert tokens(server, prompts[0], **per_request(recipe)) == first


@pytest.mark.parametrize("change, param, code", [
    ({"adapters": [{"name": "nobody", "weight": 1.0}]}, "adapters", "mix_unknown_adapter"),
    ({"adapters": []}, "adapters", "mix_empty_mix"),
    ({"adapters": [{"name": "a", "weight": 1.0}, {"name": "a", "weight": 2.0}]}, "adapters", "mix_duplicate_adapter"),
    ({"merge_method": "ties", "density": -0.5}, "density", "mix_bad_density"),
    ({"merge_method": "dare_linear", "density": 1.5}, "density", "mix_bad_density"),
    ({"merge_method": "ties"}, "density", "mix_missing_density"),
    ({"merge_method": "cat", "adapters": [{"name": n, "weight": 1.0} for n in "abc"]}, "adapters",
     "mix_rank_too_large"),  # 4 + 4 + 8 above --max-lora-rank 12
    ({"merge_method": "linear", "adapters": [{"name": "a", "weight": 1.0}, {"name": "c", "weight": 1.0}]},
     "adapters", "mix_rank_mismatch"),
    ({"adapters": [{"name": "a", "weight": 1.0}, {"name": "elsewhere", "weight": 1.0}]}, "adapters",
     "mix_other_base"),
    ({"model": "a"}, "model", "mix_wrong_model"),
])
def test_a_bad_recipe_per_request_is_a_400_naming_the_field(change, param, code, server, prompts):
    body = {"adapters": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}], **change}
    reply = complete(server, prompts[0], **body)
    assert reply.status == 400 and (reply.error["param"], reply.error["code"]) == (param, code), reply.body


def test_a_weight_that_is_not_finite_is_a_400(server):
    body = json.dumps({"model": MODEL_NAME, "prompt": "hi", "adapters": [{"name": "a", "weight": float("nan")}]})
    reply = call(server.url, "POST", "/v1/completions", body.encode())
    assert reply.status == 400 and (reply.error["param"], reply.error["code"]) == ("adapters", "mix_bad_weight")


@pytest.mark.parametrize("merge, status, param", [
    ({"adapters": [{"name": "nobody", "weight": 1.0}]}, 400, "merge.adapters"),
    ({"adapters": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}], "method": "ties", "density": 2},
     400, "merge.density"),
    ({"adapters": [{"name": "a", "weight": 1.0}], "method": "blend"}, 400, "merge"),
])
def test_a_bad_named_mix_is_refused_naming_the_field(merge, status, param, server):
    reply = mix(server, "refused", merge)
    assert reply.status == status and reply.error["param"] == param, reply.body


def test_a_named_mix_cannot_take_a_taken_name(server):
    assert mix(server, "a", MergeRecipe((("b", 1.0),))).status == 409


@pytest.fixture(scope="module")
def first_life(cache, model_dir, sources, prompts, tmp_path_factory):
    """A server with a registry file makes a named mix: (the registry, the mix's folder, its greedy tokens)."""
    registry = tmp_path_factory.mktemp("mix-registry") / "registry.json"
    with ServerThread(model_dir("llama"), adapters_dir=sources, adapter_registry=str(registry)) as first:
        created = mix(first, "tone", RECIPES["dare_ties"])
        assert created.status == 201
        yield registry, Path(created.json()["path"]), [tokens(first, p, model="tone") for p in prompts]


def restarted(model_dir, sources, registry):
    return ServerThread(model_dir("llama"), adapters_dir=sources, adapter_registry=str(registry))


def test_a_named_mix_comes_back_after_a_restart(first_life, model_dir, sources, prompts):
    registry, _, before = first_life
    assert json.loads(registry.read_text())["adapters"]["tone"]["merge"] == RECIPES["dare_ties"].to_dict()
    with restarted(model_dir, sources, registry) as second:
        assert [tokens(second, p, model="tone") for p in prompts] == before


def test_a_named_mix_whose_folder_is_gone_is_mixed_again_from_its_recipe(first_life, model_dir, sources,
                                                                         prompts):
    registry, folder, before = first_life
    shutil.rmtree(folder)
    with restarted(model_dir, sources, registry) as third:
        assert [tokens(third, p, model="tone") for p in prompts] == before
    assert folder.is_dir()


@pytest.fixture(scope="module")
def tenant_server(cache, model_dir, sources, tmp_path_factory):
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(f"""tenants:
  acme:
    keys: ["{hash_key('acme-key')}"]
    adapters: ["a", "b", "acme-*"]
""")
    with ServerThread(model_dir("llama"), adapters_dir=sources, tenants_file=tenants) as running:
        for name in ("acme-tone", "tone"):
            assert mix(running, name, MergeRecipe((("a", 0.5), ("c", 0.5)), "cat")).status == 201
        yield running


ACME = {"Authorization": "Bearer acme-key"}


def test_a_tenant_mixes_only_adapters_it_may_use(tenant_server, prompts):
    assert complete(tenant_server, prompts[0], ACME, adapters=[{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]
                    ).status == 200
    refused = complete(tenant_server, prompts[0], ACME,
                       adapters=[{"name": "a", "weight": 1}, {"name": "c", "weight": 1}])
    assert refused.status == 400 and refused.error["code"] == "mix_unknown_adapter"
    assert "'c'" in refused.error["message"]


def test_a_named_mix_is_scoped_by_tenants_like_any_adapter(tenant_server, prompts):
    assert complete(tenant_server, prompts[0], ACME, model="acme-tone").status == 200
    assert complete(tenant_server, prompts[0], ACME, model="tone").status == 404
