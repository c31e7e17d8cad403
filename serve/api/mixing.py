"""Mixes of adapters at the edge: a request's recipe checked and turned into the adapter it runs on, refusals as 400s
whose `param` names the field at fault (the mixing itself: adapters/merge.py and adapters/mixes.py)."""

from __future__ import annotations

from ...adapters.merge import MergeRecipe, MixError
from ...adapters.peft_format import AdapterError
from ...adapters.registry import UnknownAdapter
from .errors import APIError, bad_request
from .schemas import MergeSpec, MixSource, _SamplingFields
from .state import ServerState
from .tenants import Tenant

# the recipe's parts (MixError.field) -> the request fields that carry them
NAMED_FIELDS = {"adapters": "merge.adapters", "method": "merge.method", "density": "merge.density"}
REQUEST_FIELDS = {"adapters": "adapters", "method": "merge_method", "density": "density"}


def recipe(sources: list[MixSource], method: str | None, density: float | None, seed: int | None) -> MergeRecipe:
    return MergeRecipe(tuple((s.name, s.weight) for s in sources), method or "linear", density, seed or 0)


def named_recipe(spec: MergeSpec) -> MergeRecipe:
    return recipe(spec.adapters, spec.method, spec.density, spec.seed)


def mix_refused(exc: AdapterError, fields: dict[str, str]) -> APIError:
    """A 400 for a recipe that cannot be mixed (or whose source was refused), `param` naming the field."""
    field = exc.field if isinstance(exc, MixError) else "adapters"
    return bad_request(str(exc), code=f"mix_{exc.code}", param=fields[field])


async def request_mix(state: ServerState, body: _SamplingFields, tenant: Tenant | None) -> str:
    """The adapter a request with `adapters` runs on: its mix, built now or found by its recipe. `model` must name
    the base; with tenants, every source must be one the tenant may use (others are answered as unknown)."""
    if body.model != state.settings.served_model_name:
        raise bad_request(f"a mix is made on the base model: give model {state.settings.served_model_name!r}, not "
                          f"{body.model!r}", code="mix_wrong_model", param="model")
    hidden = [s.name for s in body.adapters if tenant is not None and not tenant.may_use(s.name)]
    if hidden:
        raise mix_refused(MixError(f"the mix names an unknown adapter {hidden[0]!r}", "unknown_adapter", "adapters"),
                          REQUEST_FIELDS)
    try:
        return await state.engine.mix_adapter(recipe(body.adapters, body.merge_method, body.density, body.merge_seed))
    except UnknownAdapter as exc:  # adapters are disabled
        raise bad_request(str(exc), code="adapters_disabled", param="adapters") from None
    except AdapterError as exc:
        raise mix_refused(exc, REQUEST_FIELDS) from None
