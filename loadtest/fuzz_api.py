"""Fuzz the HTTP API with schemathesis against its own /openapi.json: no input may get a 5xx, hang the server or
crash it, and every response must match what the document promises.

    pip install schemathesis            # not a dependency of loradock; this script is not run in CI
    python -m loradock.loadtest.fuzz_api --max-examples 50

The script starts `loradock serve` in a subprocess on a free port of 127.0.0.1 (the demo model unless --model;
--admin-token set so that the admin API is fuzzed too; --adapters pointing at a temporary folder holding two
random adapters written by peft), waits for /health, fetches /openapi.json and runs `schemathesis run` on every
operation: at most --max-examples cases per operation and phase, and --max-time seconds if given (schemathesis
then keeps fuzzing until the time is spent). At the end it prints the number of test cases run, the failures
found, and whether the server logged an unexpected error (a 500), died, or stopped answering; the exit status is
0 only when all are clean.

The one change made to the served document before fuzzing: `model` (and the adapter name fields) are narrowed to
an enum of the names this server knows, so that schemathesis' valid cases reach the engine and the adapters
instead of all ending in 404. Its invalid cases still send any string there.

Checks: not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance and
negative_data_rejection (input the schema forbids must get a 4xx). The server runs with a short context
(--max-model-len 128) so requests without max_tokens end quickly, and a high --max-queue so concurrent workers are
not refused with 429.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection")
SERVED_NAME = "fuzz-base"
ADAPTERS = ("fuzz-a", "fuzz-b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before it was ready")
        if get(f"{url}/health", timeout=2)[0] == 200:
            return
        time.sleep(0.2)
    raise SystemExit(f"the server was not healthy after {timeout:.0f} s")


def narrowed_spec(spec: dict, url: str) -> dict:
    """The served document with the model and adapter names narrowed to the ones this server knows."""
    schemas = spec["components"]["schemas"]
    models = {"type": "string", "enum": [SERVED_NAME, *ADAPTERS]}
    names = {"type": "string", "enum": list(ADAPTERS)}
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        schemas[request]["properties"]["model"] = {**schemas[request]["properties"]["model"], **models}
    schemas["LoadAdapterRequest"]["properties"]["name"] = names
    schemas["LoadAdapterRequest"]["properties"].pop("path")  # a path outside the directory is a 403, tested elsewhere
    for request in ("VllmLoadLoraRequest", "VllmUnloadLoraRequest"):
        schemas[request]["properties"]["lora_name"] = names
    for item in spec["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name":
                    parameter["schema"] = names
    spec["servers"] = [{"url": url}]
    return spec


def run_and_echo(command: list[str], timeout: float | None, cwd: Path) -> tuple[int, str]:
    """Run in `cwd`, echoing its output as it comes; (exit status, output). A run past `timeout` is a hang."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               cwd=cwd)
    deadline = None if timeout is None else time.monotonic() + timeout
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
        if deadline is not None and time.monotonic() > deadline:
            process.kill()
            lines.append("fuzz_api: schemathesis ran past its time limit and was stopped\n")
            break
    return process.wait(), "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--max-examples", type=int, default=50, help="test cases per operation and phase (default 50)")
    parser.add_argument("--max-time", type=int, help="seconds: keep fuzzing until they are spent (default: off)")
    parser.add_argument("--workers", default="1", help="schemathesis workers (default 1: with more, hypothesis "
                        "on Python 3.11 can trip over its own AST parsing across threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="examples,coverage,fuzzing", help="schemathesis phases")
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--request-timeout", type=float, default=30.0, help="a slower answer counts as a hang")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, schema, caches)")
    args = parser.parse_args(argv)

    if shutil.which("schemathesis") is None:
        raise SystemExit("schemathesis is not installed: pip install schemathesis")
    from ..serve.models.tiny_random import demo_model_path
    from .random_adapters import write_random_adapter

    work = Path(tempfile.mkdtemp(prefix="loradock-fuzz-"))
    model = Path(args.model) if args.model else demo_model_path()
    adapters = work / "adapters"
    adapters.mkdir()
    for seed, name in enumerate(ADAPTERS, start=1):
        write_random_adapter(model, adapters / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])

    port, token = free_port(), secrets.token_hex(8)
    url = f"http://127.0.0.1:{port}"
    log_path = work / "server.log"
    command = [sys.executable, "-m", "loradock", "serve", "--port", str(port), "--admin-token", token,
               "--served-model-name", SERVED_NAME, "--adapters", str(adapters), "--max-model-len", "128",
               "--kv-cache-memory", "64MiB", "--max-queue", "4096", "--drain-timeout", "5"]
    if args.model:
        command += ["--model", args.model]
    with open(log_path, "w", encoding="utf-8") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(url, server, timeout=300)
        status, body = get(f"{url}/openapi.json")
        if status != 200:
            raise SystemExit(f"GET /openapi.json answered {status}")
        schema = work / "openapi.json"
        schema.write_text(json.dumps(narrowed_spec(json.loads(body), url)), encoding="utf-8")
        print(f"fuzzing {url} from its /openapi.json (server log: {log_path})", flush=True)
        fuzz = ["schemathesis", "run", str(schema), "--url", url, "--checks", args.checks,
                "--max-examples", str(args.max_examples), "--workers", args.workers, "--seed", str(args.seed),
                "--phases", args.phases, "--request-timeout", str(args.request_timeout),
                "--header", f"Authorization: Bearer {token}", "--continue-on-failure",
                "--suppress-health-check", "all", "--no-color"]
        if args.max_time:
            fuzz += ["--max-time", str(args.max_time)]
        started = time.monotonic()
        # in the temporary folder: schemathesis and hypothesis leave their caches in the working directory
        returncode, output = run_and_echo(fuzz, timeout=(args.max_time or 1800) + 300, cwd=work)
        elapsed = time.monotonic() - started
        alive = server.poll() is None
        healthy = alive and get(f"{url}/health")[0] == 200
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    unexpected = log_text.count("unexpected error serving") + log_text.count("engine step failed")
    generated = re.search(r"(\d+) generated", output)
    cases = int(generated.group(1)) if generated else 0
    failed_checks = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", output)
    errors = re.findall(r"🚫 ([^:\n]+Error[^:\n]*): (\d+)", output)
    print(f"\nfuzz_api: {cases} test cases in {elapsed:.0f} s; failures: "
          f"{', '.join(f'{name} x{n}' for name, n in failed_checks) or 'none'}; schemathesis errors: "
          f"{', '.join(f'{name} x{n}' for name, n in errors) or 'none'} (exit status {returncode}); server: "
          f"{'alive' if alive else 'DEAD'}, {'healthy' if healthy else 'NOT answering /health'}, "
          f"{unexpected} unexpected errors (500s, failed engine steps) in its log")
    clean = not failed_checks and alive and healthy and not unexpected and cases > 0
    if args.keep or not clean:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
