"""megakernel: single-prompt Llama decoding in one persistent CUDA kernel.

    import megakernel
    engine = megakernel.Engine.from_pretrained("random:tiny")
    print(engine.generate("Hello", max_new_tokens=16).text)
"""
__version__ = "0.1.0"

from .chat import ChatSession
from .config import ModelConfig
from .engine import (BACKENDS, Engine, GenerationResult, GenerationStats, generate,
                     megakernel_available)
from .errors import (BackendUnavailableError, CheckpointError, DeviceHungError,
                     InvalidRequestError, KernelFaultError, KVCacheExhaustedError,
                     MegakernelError, UnsupportedModelError)
from .generation_stream import GenerationStream

__all__ = [
    "BACKENDS", "ChatSession", "Engine", "GenerationResult", "GenerationStats",
    "GenerationStream", "ModelConfig", "generate",
    "megakernel_available", "BackendUnavailableError", "CheckpointError", "DeviceHungError",
    "InvalidRequestError", "KernelFaultError", "KVCacheExhaustedError", "MegakernelError",
    "UnsupportedModelError",
]
