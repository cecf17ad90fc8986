"""Model loading: random presets, local Hugging Face checkpoints and Hub repo ids.

    load_model("random:tiny")                       # seeded random weights, byte tokenizer
    load_model("/models/Llama-3.2-1B-Instruct")     # local checkpoint directory
    load_model("meta-llama/Llama-3.2-1B-Instruct")  # Hub id, through the local HF cache

Loading is two steps. `resolve_model` validates everything that can be checked without
reading weight data (the path, config.json, the safetensors headers: tensor names, shapes,
stored dtypes) and raises a one-line CheckpointError / UnsupportedModelError naming the
problem. `load_weights` then reads tensors lazily through safetensors' memory map and fuses
them into the stacked layout of megakernel.weights, one layer at a time.

Only safetensors are read. Pickle checkpoints (pytorch_model.bin, *.pt) are refused, never
unpickled: unpickling runs arbitrary code from the file.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import ModelConfig
from .errors import (CheckpointError, InvalidRequestError, UnsupportedModelError,
                     first_line)
from .presets import PRESETS, random_weights
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from .weights import Weights, fuse_layer_tensors, unfuse_to_hf_tensors

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RANDOM_PREFIX = "random:"

# What a Hub download fetches: config, safetensors weights and tokenizer files. Pickle
# weights and the original/ consolidated checkpoints are skipped.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
]
HUB_IGNORE_PATTERNS = ["original/*"]

# Pickle-based weight files, refused with a hint to convert.
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

# safetensors dtype tags the engine converts exactly; anything else (fp8, int8, ...) is a
# quantized checkpoint and refused.
_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

# Hub repo ids: "owner/name", both parts [A-Za-z0-9_.-], not starting with '.' or '-'.
_REPO_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a resolved model's weights come from.

    kind: 'random' (preset, generated) or 'checkpoint' (local safetensors directory; Hub
    ids are resolved to their local snapshot directory). For checkpoints, `tensor_files`
    maps every Hugging Face tensor name the engine needs to the file that holds it, and
    `stored_dtype` is the dtype of the embedding as stored.
    """
    kind: str
    spec: str
    preset: str | None = None
    path: str | None = None
    tensor_files: dict[str, str] = field(default_factory=dict)
    stored_dtype: torch.dtype | None = None
    has_tokenizer: bool = False
    # EOS ids from generation_config.json (e.g. Llama 3 Instruct's <|eot_id|>).
    generation_eos_token_ids: tuple[int, ...] = ()


# Public entry points ------------------------------------------------------------------

def load_model(spec: str, device=None, dtype=None, max_positions: int = 4096, seed: int = 0,
               progress: Progress | None = None) -> tuple[Weights, Tokenizer | None]:
    """Resolve, validate and load a model.

    spec: 'random:<preset>' (see megakernel.presets.PRESETS), a local Hugging Face
    checkpoint directory, or a Hub repo id (resolved through the local HF cache, downloaded
    when online). device: default CUDA when available, else CPU. dtype: default bfloat16
    on CUDA, float32 on CPU (also accepts 'bf16', 'fp16', 'fp32'). max_positions: rows of
    the RoPE tables. seed: only for random presets. progress(done, total) is called after
    each layer is loaded (once, with done == total, for random presets).

    Returns (weights, tokenizer): the checkpoint's own tokenizer when it has tokenizer
    files, a ByteTokenizer for random presets, else None.
    """
    config, source = resolve_model(spec)
    weights = load_weights(config, source, device=device, dtype=dtype,
                           max_positions=max_positions, seed=seed, progress=progress)
    return weights, load_tokenizer(config, source)


def resolve_model(spec: str) -> tuple[ModelConfig, ModelSource]:
    """Validate `spec` without reading weight data; see load_model for the accepted forms.

    Raises CheckpointError (missing/unreadable/corrupt/incomplete checkpoint, pickle-only
    weights, Hub id not available) or UnsupportedModelError (config or tensors describe a
    model the engine cannot run exactly).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise CheckpointError(f"model spec must be a string, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in PRESETS:
            raise CheckpointError(f"unknown preset '{name}' "
                                  f"(available: {', '.join(sorted(PRESETS))})")
        return PRESETS[name], ModelSource(kind="random", spec=spec, preset=name)
    path = os.path.expanduser(spec)
    if not os.path.exists(path) and _REPO_ID.match(spec):
        path = _download_from_hub(spec)
    return _resolve_checkpoint_dir(path, spec)


def load_weights(config: ModelConfig, source: ModelSource, device=None, dtype=None,
                 max_positions: int = 4096, seed: int = 0,
                 progress: Progress | None = None) -> Weights:
    """Weights for a resolved model on `device` in `dtype` (defaults as in load_model)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise InvalidRequestError(f"max_positions must be a positive integer, "
                                  f"got {max_positions!r}")
    if source.kind == "random":
        weights = random_weights(config, seed=seed, dtype=dtype, device=device,
                                 max_positions=max_positions)
        if progress is not None:
            progress(config.num_layers, config.num_layers)
        return weights
    return _load_checkpoint_weights(config, source, device, dtype, max_positions, progress)


def load_tokenizer(config: ModelConfig, source: ModelSource) -> Tokenizer | None:
    """The tokenizer for a resolved model: ByteTokenizer for random presets, the
    checkpoint's own HFTokenizer when it has tokenizer files, else None."""
    if source.kind == "random":
        return ByteTokenizer(config.bos_token_id, config.eos_token_ids,
                             vocab_size=config.vocab_size)
    if not source.has_tokenizer:
        return None
    return HFTokenizer(source.path,
                       extra_eos_token_ids=config.eos_token_ids + source.generation_eos_token_ids)


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for every tensor the engine reads, in load order.

    lm_head.weight is absent for tied embeddings (the embedding doubles as the head).
    """
    c = config
    H, I = c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(c.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (c.q_size, H)
        shapes[p + "self_attn.k_proj.weight"] = (c.kv_size, H)
        shapes[p + "self_attn.v_proj.weight"] = (c.kv_size, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, c.q_size)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
    shapes["model.embed_tokens.weight"] = (c.vocab_size, H)
    shapes["model.norm.weight"] = (H,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    return shapes


def save_pretrained(weights: Weights, path: str | os.PathLike, tokenizer=None,
                    max_shard_size: int | None = None, dtype: torch.dtype | None = None) -> str:
    """Write `weights` as a Hugging Face Llama checkpoint directory; returns the path.

    Files: config.json, generation_config.json (when BOS/EOS are known), model.safetensors
    or, when the tensors exceed `max_shard_size` bytes, model-0000i-of-0000n.safetensors +
    model.safetensors.index.json. Tensors are stored in `dtype` (default: weights.dtype).
    Tied embeddings store no lm_head.weight. `tokenizer` is saved when it can write
    Hugging Face files (HFTokenizer); a ByteTokenizer has none, so the checkpoint then
    loads back without a tokenizer. Weight files of an earlier save in `path` are removed
    first so a stale single file never shadows new shards (or vice versa).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = unfuse_to_hf_tensors(weights)
    if dtype is not None:
        dtype = resolve_dtype(dtype, torch.device("cpu"))
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    stored = next(iter(tensors.values())).dtype
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name in (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE) or fnmatch.fnmatch(
                name, "model-*-of-*.safetensors"):
            os.remove(os.path.join(path, name))

    c = weights.config
    hf = c.to_hf_dict()
    hf["torch_dtype"] = str(stored).removeprefix("torch.")
    _write_json(os.path.join(path, CONFIG_FILE), hf)
    if c.bos_token_id is not None or c.eos_token_ids:
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
        _write_json(os.path.join(path, GENERATION_CONFIG_FILE), gen)

    shards = _split_shards(tensors, max_shard_size)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFETENSORS_FILE), metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(os.path.join(path, SAFETENSORS_INDEX_FILE),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    return path


# Checkpoint validation ----------------------------------------------------------------

def _resolve_checkpoint_dir(path: str, spec: str) -> tuple[ModelConfig, ModelSource]:
    if not os.path.exists(path):
        raise CheckpointError(f"model path '{spec}' does not exist (expected a checkpoint "
                              "directory, a Hugging Face repo id or random:<preset>)")
    if not os.path.isdir(path):
        raise CheckpointError(f"model path '{spec}' is a file; pass the checkpoint directory "
                              f"that contains it ('{os.path.dirname(path) or '.'}')")
    try:
        names = set(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint directory '{path}': "
                              f"{e.strerror or e}") from e

    config = _read_config(path, names)
    files = _weight_files(path, names)
    headers = {f: _read_safetensors_header(f) for f in files}
    tensor_files = _check_tensors(config, path, headers)
    stored = _STORED_DTYPES[headers[tensor_files["model.embed_tokens.weight"]]
                            ["model.embed_tokens.weight"][1]]
    gen_eos: tuple[int, ...] = ()
    if GENERATION_CONFIG_FILE in names:
        gen_eos = _generation_eos(os.path.join(path, GENERATION_CONFIG_FILE))
    return config, ModelSource(
        kind="checkpoint", spec=spec, path=path, tensor_files=tensor_files,
        stored_dtype=stored, has_tokenizer=any(n in names for n in TOKENIZER_FILES),
        generation_eos_token_ids=gen_eos)


def _read_config(path: str, names: set[str]) -> ModelConfig:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if CONFIG_FILE not in names:
        raise CheckpointError(f"no {CONFIG_FILE} in '{path}': not a Hugging Face checkpoint")
    hf = _read_json(cfg_path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(hf).__name__}")
    if hf.get("quantization_config"):
        raise UnsupportedModelError(f"{cfg_path}: config field 'quantization_config': "
                                    "quantized checkpoints are not supported")
    try:
        return ModelConfig.from_hf_dict(hf)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # e.g. "hidden_size": "big" -> int() fails; the file is damaged, not unsupported.
        raise CheckpointError(f"{cfg_path}: invalid value ({e})") from e


def _weight_files(path: str, names: set[str]) -> list[str]:
    """Absolute paths of the safetensors files to read, in order; raises when there are
    none (naming pickle files when those are all there is) or an indexed shard is missing."""
    if SAFETENSORS_INDEX_FILE in names:
        index_path = os.path.join(path, SAFETENSORS_INDEX_FILE)
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map' object")
        files: list[str] = []
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index_path}: tensor '{tensor}' maps to {shard!r}, "
                                      "expected a file name")
            if shard not in files:
                files.append(shard)
        for shard in files:
            if not os.path.isfile(os.path.join(path, shard)):
                raise CheckpointError(f"{index_path} lists shard '{shard}', which is missing "
                                      f"from '{path}' (incomplete download?)")
        return [os.path.join(path, f) for f in files]
    if SAFETENSORS_FILE in names:
        return [os.path.join(path, SAFETENSORS_FILE)]
    others = sorted(n for n in names if n.endswith(".safetensors"))
    if others:
        return [os.path.join(path, n) for n in others]
    pickles = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in _PICKLE_PATTERNS))
    if pickles:
        raise CheckpointError(
            f"'{path}' only has pickle weights ({pickles[0]}); they are never loaded because "
            "unpickling can run arbitrary code. Convert the checkpoint to safetensors "
            "(e.g. transformers' save_pretrained in a trusted environment) and load that")
    raise CheckpointError(f"no model weights (*.safetensors) in '{path}'")


def _read_safetensors_header(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, safetensors dtype tag), from the header only.

    safe_open checks that the header parses and that the data section covers every
    tensor exactly, so truncated or corrupt files fail here, before any weight is read.
    """
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as e:  # SafetensorError, OSError, ...: one line naming the file
        raise CheckpointError(f"cannot read safetensors file '{file}' (corrupt or "
                              f"truncated?): {first_line(e)}") from e


def _check_tensors(config: ModelConfig, path: str,
                   headers: dict[str, dict[str, tuple[tuple[int, ...], str]]]) -> dict[str, str]:
    """Check names, shapes and stored dtypes against config; return name -> file."""
    where: dict[str, str] = {}
    for file, tensors in headers.items():
        for name in tensors:
            where.setdefault(name, file)
    expected = expected_tensor_shapes(config)
    for name, shape in expected.items():
        if name not in where:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint in "
                                  f"'{path}'")
        got, tag = headers[where[name]][name]
        if got != shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(got)}, expected "
                                  f"{list(shape)} from config.json")
        if tag not in _STORED_DTYPES:
            raise UnsupportedModelError(f"tensor '{name}' is stored as {tag}; only "
                                        f"{'/'.join(_STORED_DTYPES)} are supported")
    for name in where:
        if name in expected or _ignorable(name, config):
            continue
        # An extra tensor means the model is not the plain Llama the config describes
        # (biases, more layers, adapters); running without it would be silently wrong.
        raise UnsupportedModelError(f"checkpoint tensor '{name}' is not part of the Llama "
                                    "model config.json describes")
    return {name: where[name] for name in expected}


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Old exports carry the RoPE buffer; tied checkpoints sometimes still store the head,
    # which transformers also ignores when tie_word_embeddings is set.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_word_embeddings)


def _generation_eos(file: str) -> tuple[int, ...]:
    try:
        gen = _read_json(file)
    except CheckpointError:
        return ()  # optional file: a damaged one must not block loading the model
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
        return tuple(eos)
    return ()


# Reading ------------------------------------------------------------------------------

def _load_checkpoint_weights(config: ModelConfig, source: ModelSource, device: torch.device,
                             dtype: torch.dtype, max_positions: int,
                             progress: Progress | None) -> Weights:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {}
        for file in dict.fromkeys(source.tensor_files.values()):
            try:
                handles[file] = stack.enter_context(safe_open(file, framework="pt",
                                                              device="cpu"))
            except Exception as e:
                raise CheckpointError(f"cannot open safetensors file '{file}': "
                                      f"{first_line(e)}") from e

        def get(name: str) -> torch.Tensor:
            file = source.tensor_files[name]
            try:
                # Reads one tensor out of the memory map; fuse_layer_tensors copies it into
                # the stacked tensor on the device, so host memory holds one tensor at a time.
                return handles[file].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor '{name}' from '{file}': "
                                      f"{first_line(e)}") from e

        return fuse_layer_tensors(config, get, dtype=dtype, device=device,
                                  max_positions=max_positions, progress=progress)


# Hub ----------------------------------------------------------------------------------

def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE at import; also honour a later change.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _download_from_hub(repo_id: str) -> str:
    """The local snapshot directory of `repo_id`: from the HF cache, downloading the
    missing files when online. Raises CheckpointError when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"'{repo_id}' looks like a Hugging Face repo id but "
                              "huggingface_hub is not installed; pass a local path") from e

    offline = _hub_offline()
    kwargs = dict(allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
    try:
        return snapshot_download(repo_id, local_files_only=offline, **kwargs)
    except Exception as e:
        error = e
    if not offline:
        # The network may be down while a complete copy sits in the cache.
        with contextlib.suppress(Exception):
            return snapshot_download(repo_id, local_files_only=True, **kwargs)
    hint = ("download it on a machine with network access (e.g. `hf download "
            f"{repo_id}`) and pass the local checkpoint directory instead")
    if offline:
        reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    else:
        name = type(error).__name__
        if name == "GatedRepoError":
            reason = "the repo is gated: accept its license on the Hub and log in (`hf auth login`)"
        elif name == "RepositoryNotFoundError":
            reason = "no such repo on the Hub (or it is private: log in with `hf auth login`)"
        else:
            reason = f"not in the local cache and the download failed ({first_line(error)})"
    raise CheckpointError(f"'{repo_id}' is not a local directory, and it cannot be had "
                          f"from the Hugging Face Hub: {reason}; {hint}") from error


# Helpers ------------------------------------------------------------------------------

def resolve_device(device) -> torch.device:
    """torch.device for `device`; None means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usage = "use 'cuda', 'cuda:N' or 'cpu'"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {device!r} ({usage})") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device!r} is not supported ({usage})")
    if resolved.type == "cuda" and resolved.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise InvalidRequestError(f"device {device!r} does not exist: this machine has "
                                      f"{count} CUDA device{'s' if count != 1 else ''}")
    return resolved


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """A supported torch dtype from a dtype or its name; None: the default for `device`."""
    if dtype is None:
        # bf16 halves the bytes a decode step reads; CPUs compute fp32 much faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise InvalidRequestError(f"unknown dtype '{dtype}' (use bf16, fp16 or fp32)")
        return _DTYPE_NAMES[key]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InvalidRequestError(f"dtype {dtype} is not supported (use bf16, fp16 or fp32)")
    return dtype


def _split_shards(tensors: dict[str, torch.Tensor],
                  max_shard_size: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than max_shard_size gets its own shard."""
    if max_shard_size is None:
        return [tensors]
    if max_shard_size <= 0:
        raise InvalidRequestError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _read_json(file: str):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON (line {e.lineno}, column "
                              f"{e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON (not UTF-8 text)") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from e


def _write_json(file: str, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
