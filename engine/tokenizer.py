"""Text <-> token ids and chat templates, on the HF `tokenizers` library (not transformers)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Used when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer split pattern of Llama 3 (llama.cpp's "llama-bpe").
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Ids of the byte-level tokenizer used by models with random weights.
_BYTE_PAD, _BYTE_BOS, _BYTE_EOS, _BYTE_OFFSET = 0, 1, 2, 3


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equal to llama.cpp's pre-tokenizer type `pre`."""
    if pre == "smollm":
        # llama.cpp's regexes: "\p{N}", then GPT-2's; the same as SmolLM2's tokenizer.json.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(
        f"unsupported GGUF pre-tokenizer {pre!r}; supported: 'smollm', 'gpt-2', 'llama-bpe'"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE uses for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _token_content(token: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return str(token["content"])
    return token if isinstance(token, str) else None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Like HF's: jinja2's own tojson escapes HTML characters, which chat templates must not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.has_own_chat_template = chat_template is not None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = self._token_id(bos_token)
        eos_id = self._token_id(eos_token)
        ids = ([eos_id] if eos_id is not None else []) + list(extra_eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        if add_bos_token and self.bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no BOS token")

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return int(token_id)

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; prepends BOS only if the model asks for it and it is not there."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the vocabulary lacks are dropped."""
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (the model's vocabulary may be padded beyond it)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of the special added tokens, BOS and EOS."""
        special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        special.update(self.eos_token_ids)
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        return tuple(sorted(special))

    # ---- chat -----------------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        # The same environment as transformers' apply_chat_template, sandboxed because
        # templates come with downloaded models.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` as the model's prompt text; raises jinja2's TemplateError."""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    # ---- saving ---------------------------------------------------------------------------

    def save_hf(self, folder: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that both transformers and we read."""
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.has_own_chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader_or_path: gguf.GGUFReader | str | Path) -> Tokenizer:
        """Build the tokenizer stored in a GGUF file's metadata (byte-level BPE only)."""
        import gguf  # here: HF-folder and random models need no gguf (~0.3 s to import)

        if isinstance(reader_or_path, gguf.GGUFReader):
            reader = reader_or_path
        else:
            reader = gguf.GGUFReader(reader_or_path)

        def field(key: str, default: Any = None) -> Any:
            f = reader.get_field(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is "
                "supported; load the model from a Hugging Face folder with tokenizer.json instead"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF vocabulary has duplicate tokens")

        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(field("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        # Control tokens are special (skipped when decoding); user-defined ones are matched
        # whole in text like HF's added tokens but kept in decoded text.
        backend.add_tokens([
            AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
            for i in range(len(tokens)) if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ])

        def token(key: str) -> str | None:
            token_id = field(key)
            return None if token_id is None else tokens[int(token_id)]

        extra_eos = tuple(
            int(field(k)) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if field(k) is not None
        )
        return cls(
            backend,
            chat_template=field("tokenizer.chat_template"),
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(field("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(
                f"{folder}: no tokenizer.json (sentencepiece-only tokenizer.model is unsupported)"
            )
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):
            # Named templates: [{"name": "default", "template": ...}, ...].
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # Llama 3 style: no flag, the post-processor adds BOS.
            bos = backend.token_to_id(_token_content(config.get("bos_token")) or "")
            add_bos = bos is not None and bos in backend.encode("", add_special_tokens=True).ids
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id", [])
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            extra_eos_token_ids=tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos]),
            add_bos_token=add_bos,
        )

    @classmethod
    def byte_level(cls, vocab_size: int) -> Tokenizer:
        """A tokenizer for models without one: ids 0/1/2 = pad/bos/eos, byte b -> id 3 + b."""
        if vocab_size < _BYTE_OFFSET + 256:
            raise ValueError(f"byte-level tokenizer needs vocab_size >= 259, got {vocab_size}")
        chars = _bytes_to_unicode()
        # A BPE without merges over the 256 byte characters maps each byte to its own id.
        vocab = {"<pad>": _BYTE_PAD, "<s>": _BYTE_BOS, "</s>": _BYTE_EOS}
        vocab.update({chars[b]: _BYTE_OFFSET + b for b in range(256)})
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<pad>", "<s>", "</s>"])
        return cls(backend, bos_token="<s>", eos_token="</s>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
