"""The adapter admin API (bearer token required): list, load (or mix), unload, reload; vLLM-compatible aliases.

Admin calls never block the token stream: reading and validating happen in the adapter reader pool, and the
engine thread only copies weights between steps.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from aiohttp import web

from ...adapters.directory import check_name
from ...adapters.manager import UnknownAdapter
from ...adapters.merge import MergeRecipe
from ...adapters.peft_format import AdapterError
from ...adapters.store import is_url
from .backend import AdapterVersionView, EngineLost
from .errors import APIError, bad_request, not_found, parse_body
from .generation import adapter_refused
from .mixing import NAMED_FIELDS, mix_refused, named_recipe
from .schemas import LoadAdapterRequest, VllmLoadLoraRequest, VllmUnloadLoraRequest
from .state import STATE, ServerState

routes = web.RouteTableDef()


def _manager(state: ServerState):
    if state.engine.adapters is None:
        raise APIError(400, "adapters are disabled on this server (--max-gpu-adapters 0)", code="adapters_disabled")
    return state.engine.adapters


def describe(version: AdapterVersionView) -> dict:
    return asdict(version.summary())


@routes.get("/v1/adapters")
async def list_adapters(request: web.Request) -> web.Response:
    manager = _manager(request.app[STATE])
    return web.json_response({"object": "list", "data": [describe(v) for v in manager.registered()]})


async def _load(state: ServerState, name: str, path: str | None, replace: bool,
                recipe: MergeRecipe | None = None) -> AdapterVersionView:
    """Load `name` from `path`, or mix it by `recipe` from loaded adapters."""
    _manager(state)  # 400 when adapters are disabled
    try:
        check_name(name)
    except AdapterError as exc:
        raise bad_request(str(exc), code="invalid_adapter_name", param="name") from None
    resolved = _adapter_path(state, name, path) if recipe is None else None
    try:
        return await state.engine.load_adapter(name, resolved, replace=replace, recipe=recipe)
    except AdapterError as exc:
        if exc.code == "name_conflict":
            raise APIError(409, str(exc), code="adapter_exists", param="name") from None
        raise (adapter_refused(exc) if recipe is None else mix_refused(exc, NAMED_FIELDS)) from None
    except EngineLost as exc:
        raise APIError(503, str(exc), type="server_error", code="replica_failed") from None


def _adapter_path(state: ServerState, name: str, path: str | None) -> Path | str:
    """Where to load `name` from: the adapter directory's folder of that name, or `path` (a local path resolved, or
    an object-store URL), which must lie in the directory unless the server runs with --allow-adapter-paths."""
    directory = _manager(state).directory
    if path is None:
        if directory is None:
            raise bad_request("no path given and the server has no adapter directory (--adapters)", param="path")
        try:
            return directory.path(name)
        except AdapterError as exc:
            raise bad_request(str(exc), code="invalid_adapter_path", param="name") from None
    try:
        resolved = path.rstrip("/") if is_url(path) else Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, an unencodable name, a symlink loop
        raise bad_request(f"the path {path!r} cannot be used: {exc}", code="invalid_adapter_path",
                          param="path") from None
    if not (directory is not None and directory.contains(resolved)) and not state.settings.allow_adapter_paths:
        raise APIError(403, f"{path} is outside the adapter directory; start the server with "
                       "--allow-adapter-paths to load adapters from anywhere", type="permission_error",
                       code="path_not_allowed", param="path")
    return resolved


def _unload(state: ServerState, name: str) -> None:
    try:
        _manager(state)
        state.engine.unregister_adapter(name)
    except UnknownAdapter:
        raise not_found(f"no adapter named {name!r} is loaded", code="adapter_not_found") from None


@routes.post("/v1/adapters")
async def load_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await parse_body(request, LoadAdapterRequest)
    recipe = named_recipe(body.merge) if body.merge is not None else None
    version = await _load(state, body.name, body.path, replace=False, recipe=recipe)
    return web.json_response(describe(version), status=201)


@routes.delete("/v1/adapters/{name}")
async def unload_adapter(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _unload(request.app[STATE], name)
    return web.json_response({"name": name, "unloaded": True})


@routes.post("/v1/adapters/{name}/reload")
async def reload_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    try:
        current = _manager(state).get(name)  # a refused version too: reloading is how to retry it
    except UnknownAdapter:
        raise not_found(f"no adapter named {name!r} is loaded", code="adapter_not_found") from None
    # a mix is mixed again from its sources as they are now
    version = await _load(state, name, str(current.path), replace=True, recipe=getattr(current, "recipe", None))
    return web.json_response(describe(version))


@routes.post("/v1/load_lora_adapter")
async def vllm_load(request: web.Request) -> web.Response:
    body = await parse_body(request, VllmLoadLoraRequest)
    await _load(request.app[STATE], body.lora_name, body.lora_path, replace=False)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@routes.post("/v1/unload_lora_adapter")
async def vllm_unload(request: web.Request) -> web.Response:
    body = await parse_body(request, VllmUnloadLoraRequest)
    _unload(request.app[STATE], body.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
