"""Every use of Ray Serve's model multiplexing, in one module (upstream is renaming the API): the adapter's name is
the multiplexed model id, so Ray's router sends an adapter's requests to a replica that already holds it.

    caller:  routed(handle, adapter)       handle.options(multiplexed_model_id=adapter): prefer a holder of it;
                                           no adapter: plain load balancing over the replicas
    replica: @adapter_loader(n) on an async load(name): Serve keeps the n most recently used per replica
             (calling the loaded object's __del__ when it drops one) and reports them to the router

A hot adapter spreads: when every holder is at `max_ongoing_requests`, the router falls back to the replicas
holding the fewest adapters, which load it too. Requests are never batched per adapter (`@serve.batch` splits
batches by model id): each replica's engine batches across adapters itself.
"""

from __future__ import annotations

from collections.abc import Callable

from ray import serve
from ray.serve.handle import DeploymentHandle


def adapter_loader(max_adapters: int) -> Callable:
    """Decorates a replica's `async def load(self, name)`: called once per name this replica does not hold."""
    return serve.multiplexed(max_num_models_per_replica=max_adapters)


def routed(handle: DeploymentHandle, adapter: str | None, stream: bool = True) -> DeploymentHandle:
    """A handle whose calls go to a replica holding `adapter` if one has room (None: any replica)."""
    if adapter is None:
        return handle.options(stream=stream)
    return handle.options(stream=stream, multiplexed_model_id=adapter)
