"""Adapters from an object store: `--adapters s3://bucket/prefix` against a local S3-compatible server (moto's
server mode on 127.0.0.1), read through fsspec and s3fs as a real bucket would be.

The bucket holds a peft-written adapter and hostile objects: a pickle-only adapter, a weights object far larger than
its config allows, and a folder whose name could not be an adapter's. One moto server and one loradock server serve
the module (about 4 s).
"""

from __future__ import annotations

import json

import boto3
import pytest
from moto.server import ThreadedMotoServer

from http_client import call
from loradock.adapters.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE
from loradock.kernels.cpu_build import cache_root
from server_support import MODEL_NAME, ServerThread, free_port
from support import peft_greedy, varied_prompts

BUCKET = "adapters"
STORE = f"s3://{BUCKET}/store"
REGISTRY = f"s3://{BUCKET}/state/registry.json"  # the adapter registry kept in the store, as a cluster would


@pytest.fixture(scope="module")
def bucket(adapter_dir, tmp_path_factory):
    """The store's objects in a bucket of a moto server; the AWS settings that s3fs reads point at it."""
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                            "LORADOCK_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "loradock-cache")}.items():
            env.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        good = adapter_dir / "qv-r8"
        config = (good / CONFIG_FILE).read_bytes()
        objects = {
            f"store/qv-r8/{CONFIG_FILE}": config,
            f"store/qv-r8/{WEIGHTS_FILE}": (good / WEIGHTS_FILE).read_bytes(),
            f"store/pickled/{CONFIG_FILE}": config,
            f"store/pickled/{PICKLE_FILE}": b"\x80\x04 a pickle: never fetched, never loaded",
            f"store/huge/{CONFIG_FILE}": config,
            f"store/huge/{WEIGHTS_FILE}": b"\0" * (4 << 20),  # far beyond what a rank <= 64 q/v adapter can be
            f"store/bad name/{CONFIG_FILE}": config,
            f"store/bad name/{WEIGHTS_FILE}": (good / WEIGHTS_FILE).read_bytes(),
        }
        for key, data in objects.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield s3
    moto.stop()


@pytest.fixture(scope="module")
def server(bucket, model_dir):
    with ServerThread(model_dir("llama"), adapters_dir=STORE, adapter_registry=REGISTRY) as running:
        yield running


def complete(server, model: str, prompt) -> object:
    return call(server.url, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0})


def test_the_store_lists_its_adapters_and_leaves_out_impossible_names(server):
    ids = {model["id"] for model in call(server.url, "GET", "/v1/models").json()["data"]}
    assert ids == {MODEL_NAME, "qv-r8", "pickled", "huge"}


def test_an_adapter_from_the_bucket_gives_peft_output(server, model_dir, adapter_dir, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=4)[0]
    reply = complete(server, "qv-r8", prompt)
    assert reply.status == 200, reply.body[:500]
    want = peft_greedy(model_dir("llama"), adapter_dir / "qv-r8", [prompt], 8)[0]
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(want)


def test_a_pickle_only_adapter_is_refused_without_fetching_the_pickle(server):
    reply = complete(server, "pickled", "hi")
    assert reply.status == 400 and reply.error["code"] == "adapter_pickle_weights"
    assert not list(cache_root().glob(f"adapter-store/**/{PICKLE_FILE}"))


def test_a_weights_object_beyond_its_configs_limit_is_refused_and_not_kept(server):
    reply = complete(server, "huge", "hi")
    assert reply.status == 400 and reply.error["code"] == "adapter_too_large"
    assert all(path.stat().st_size < 4 << 20 for path in cache_root().glob(f"adapter-store/**/{WEIGHTS_FILE}"))


def test_a_folder_whose_name_cannot_be_an_adapter_is_not_served(server):
    reply = complete(server, "bad name", "hi")
    assert reply.status == 404 and reply.error["code"] == "model_not_found"


def test_the_admin_api_loads_an_adapter_by_its_url_and_records_it_in_the_store(server, bucket):
    reply = call(server.url, "POST", "/v1/adapters", {"name": "copy", "path": f"{STORE}/qv-r8"},
                 headers=server.admin_headers)
    assert reply.status == 201, reply.body[:500]
    assert reply.json()["path"] == f"{STORE}/qv-r8" and reply.json()["tier"] in ("host", "device")
    saved = json.loads(bucket.get_object(Bucket=BUCKET, Key="state/registry.json")["Body"].read())
    assert saved["adapters"] == {"copy": {"source": f"{STORE}/qv-r8", "version": 1}}
    outside = call(server.url, "POST", "/v1/adapters", {"name": "other", "path": f"s3://{BUCKET}/elsewhere/x"},
                   headers=server.admin_headers)
    assert outside.status == 403 and outside.error["code"] == "path_not_allowed"
