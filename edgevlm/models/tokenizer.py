"""Tokenizer: a Hugging Face `tokenizers` tokenizer.json, always loaded from local text (offline)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgevlm.models.config import MedVLMConfig, PromptConfig
from edgevlm.models.medvlm import GenerationConfig


@dataclass(frozen=True)
class SpecialIds:
    image: int
    bos: int | None
    stop: tuple[int, ...]
    pad: int


def load_tokenizer(tokenizer_json: str) -> Tokenizer:
    """From the JSON text of a tokenizer.json (what checkpoints and bundles store)."""
    return Tokenizer.from_str(tokenizer_json)


def special_ids(tokenizer: Tokenizer, prompt: PromptConfig) -> SpecialIds:
    def required(token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no token {token!r} (the prompt config names it)")
        return token_id

    return SpecialIds(
        image=required(prompt.image_token),
        bos=None if prompt.bos_token is None else required(prompt.bos_token),
        stop=tuple(required(t) for t in prompt.eos_tokens),
        pad=required(prompt.pad_token),
    )


def decision_rules(tokenizer: Tokenizer, prompt: PromptConfig) -> tuple[tuple[tuple[int, ...], int, float], ...]:
    """`prompt.decisions` as (trigger ids, decision token id, threshold) for `GenerationConfig`.

    A key is matched where it starts a line of generated text: it is encoded after a newline, and the ids of
    the whitespace before it (the newline, a prefix space the tokenizer adds) are dropped, so "Lung mass:"
    gets the ids it has inside a report (tests hold this on real reports).
    """

    def line_start_ids(key: str) -> tuple[int, ...]:
        ids = tokenizer.encode("\n" + key, add_special_tokens=False).ids
        while ids and not tokenizer.decode([ids[0]]).strip():
            ids = ids[1:]
        return tuple(ids)

    rules = []
    for key, (token, threshold) in sorted(prompt.decisions.items()):
        token_ids = tokenizer.encode(token, add_special_tokens=False).ids
        if len(token_ids) != 1:
            raise ValueError(f"decision token {token!r} of {key!r} is {len(token_ids)} tokens in this tokenizer, "
                             "not one")
        rules.append((line_start_ids(key), token_ids[0], threshold))
    return tuple(rules)


def generation_config(tokenizer: Tokenizer, cfg: MedVLMConfig, max_new_tokens: int | None = None,
                      stop: bool = True) -> GenerationConfig:
    """Greedy generation as the model is deployed: its stop and pad tokens and its decision operating
    points. `stop=False` always makes max_new_tokens steps (benchmarks)."""
    ids = special_ids(tokenizer, cfg.prompt)
    return GenerationConfig(max_new_tokens=max_new_tokens or cfg.prompt.max_new_tokens,
                            stop_ids=ids.stop if stop else (), pad_id=ids.pad,
                            decisions=decision_rules(tokenizer, cfg.prompt))


def encode_prompt(tokenizer: Tokenizer, cfg: MedVLMConfig, question: str | None = None) -> list[int]:
    """[BOS] + one image placeholder per visual token + the templated question (M3D-LaMed layout)."""
    ids = special_ids(tokenizer, cfg.prompt)
    text = cfg.prompt.template.format(question=question or cfg.prompt.default_question)
    prefix = ([] if ids.bos is None else [ids.bos]) + [ids.image] * cfg.num_visual_tokens
    return prefix + tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, token_ids: Sequence[int], stop: Iterable[int] = ()) -> str:
    """Text of generated ids, cut at the first stop token."""
    stop = set(stop)
    kept: list[int] = []
    for t in token_ids:
        if t in stop:
            break
        kept.append(t)
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<im_patch>")


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE on a corpus: any input text encodes (no unknown characters)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
