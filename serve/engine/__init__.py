"""The continuous-batching engine: scheduler, paged KV cache, model runner, sampler."""

from .config import EngineConfig
from .engine import BiasOutsideVocabulary, Engine, EngineShutdown, GenerationOutput, PromptTooLong, RequestError
from .request import FinishReason
from .sampling import SamplingParams

__all__ = [
    "BiasOutsideVocabulary",
    "Engine",
    "EngineConfig",
    "EngineShutdown",
    "FinishReason",
    "GenerationOutput",
    "PromptTooLong",
    "RequestError",
    "SamplingParams",
]
