"""Every decoder by name: its settings class and how it runs on the models it needs.

`apd-jax generate --decoder NAME`, `apd-jax compare` and the lm-eval adapter all look
decoders up here, and their command-line defaults are the settings classes' defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from apd_jax.decoding.apd import APDConfig, LeftRightConfig, apd_generate, apd_slots, leftright_generate, leftright_slots
from apd_jax.decoding.autoregressive import ARConfig, ar_generate, ar_slots
from apd_jax.decoding.blocks import LLaDAConfig, llada_generate
from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.decoding.blocks.slots import block_slots
from apd_jax.decoding.diffusion import DiffusionConfig, ThresholdConfig, diffusion_generate, threshold_generate
from apd_jax.decoding.continuous import Slots
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, capacity, check_config
from apd_jax.decoding.learn2pd import Filter, Learn2PDConfig, learn2pd_generate, learn2pd_slots
from apd_jax.models.model import Transformer
from apd_jax.text.chat import stop_token_ids


@dataclasses.dataclass(frozen=True)
class Models:
    """What a decoder may run on; each decoder reads only the members it `uses`."""

    drafter: Transformer | None = None  # a diffusion model (bidirectional): Dream, or LLaDA
    verifier: Transformer | None = None  # Qwen2 (causal)
    filter: Filter | None = None  # Learn2PD's trained filter
    shared_vocab: int | None = None  # APD: the ids both models score (apd.shared_vocab_size), if checked already
    mesh: Mesh | None = None  # APD: the device mesh the models are sharded over


Run = Callable[[Models, Sequence[Sequence[int]], Any, jax.Array | None], GenerationResult]
MakeSlots = Callable[[Models, Sequence[Sequence[int]], Any, int], Slots]  # (models, prompts, settings, slot count)


@dataclasses.dataclass(frozen=True)
class Decoder:
    name: str
    summary: str  # one line, for --help
    settings: type[DecoderConfig]
    run: Run
    uses: tuple[str, ...]  # the Models members it needs
    sharded: bool = False  # runs on a device mesh
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option name -> settings field
    slots: MakeSlots | None = None  # its compiled steps over slots (continuous batching); None: fixed batches only

    def fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def settings_from(self, values: Mapping[str, Any]) -> DecoderConfig:
        """This decoder's settings from `values`, each naming one of its fields (or an alias of one);
        every other field keeps the settings class's default. A name it does not take is an error."""
        names = {**{name: name for name in self.fields()}, **self.aliases}
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(f"--decoder {self.name} does not take {', '.join(map(_flag, unknown))}; it takes: "
                             + ", ".join(map(_flag, names)))
        return self.settings(**{names[k]: v for k, v in values.items()})

    def capacity(self, models: Models, settings: DecoderConfig) -> int:
        """Positions one generation holds, prompt + max_new_tokens: generation.capacity over the models it runs."""
        self._check_models(models)
        return capacity(settings.max_len, *(getattr(models, name).cfg for name in self.uses if name != "filter"))

    def vocab(self, models: Models) -> int:
        """The ids its prompts may hold: APD's the ids both models score, else its model's vocabulary."""
        return models.shared_vocab if self.uses[:2] == ("drafter", "verifier") else self.first_model(models).cfg.vocab_size

    def first_model(self, models: Models) -> Transformer:
        """The model whose config names its eos ids and vocabulary: the drafter when it runs one."""
        return getattr(models, next(name for name in ("drafter", "verifier") if name in self.uses))

    def with_stop_ids(self, settings: DecoderConfig, models: Models, tokenizer: Any) -> DecoderConfig:
        """Settings that stop at every eos the checkpoint declares, the tokenizer's, and its chat template's
        turn end (text.chat.stop_token_ids: an instruct model's <|im_end|>, LLaDA's <|eot_id|>); eos ids
        already set, or no tokenizer, keep the settings as they are."""
        if settings.eos_token_ids is not None or tokenizer is None:
            return settings
        eos = stop_token_ids(self.first_model(models).cfg.eos_token_ids, tokenizer)
        return dataclasses.replace(settings, eos_token_ids=eos)

    def _check_models(self, models: Models) -> None:
        missing = [name for name in self.uses if getattr(models, name) is None]
        if missing:
            raise ValueError(f"decoder {self.name!r} needs a {' and a '.join(missing)}")

    def generate(
        self, models: Models, prompts: Sequence[Sequence[int]], settings: DecoderConfig, key: jax.Array | None = None
    ) -> GenerationResult:
        self._check_models(models)
        check_config(settings, self.settings)
        if models.mesh is not None and not self.sharded:
            raise ValueError(f"decoder {self.name!r} does not run on a device mesh (only APD does)")
        return self.run(models, prompts, settings, key)


def _flag(name: str) -> str:
    """A settings field's command-line option: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def _apd(m: Models, prompts, s: APDConfig, key) -> GenerationResult:
    return apd_generate(m.drafter, m.verifier, prompts, s, key, shared_vocab=m.shared_vocab, mesh=m.mesh)


def _block_slots(m: Models, prompts, s: DecoderConfig, size: int) -> Slots:
    return block_slots(m.drafter, prompts, s, size)


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("apd", "APD: the drafter drafts, the verifier's mixture accepts a prefix", APDConfig, _apd,
            ("drafter", "verifier"), sharded=True,
            slots=lambda m, p, s, size: apd_slots(m.drafter, m.verifier, p, s, size, shared_vocab=m.shared_vocab)),
    Decoder("leftright", "Dream K tokens per pass, left to right, with APD's W/M caching", LeftRightConfig,
            lambda m, p, s, key: leftright_generate(m.drafter, p, s.K, s, key), ("drafter",),
            slots=lambda m, p, s, size: leftright_slots(m.drafter, p, s, size)),
    Decoder("ar", "the verifier alone, one token per pass", ARConfig,
            lambda m, p, s, key: ar_generate(m.verifier, p, s, key), ("verifier",),
            slots=lambda m, p, s, size: ar_slots(m.verifier, p, s, size)),
    Decoder("dream", "Dream's own diffusion sampler over a fixed number of steps", DiffusionConfig,
            lambda m, p, s, key: diffusion_generate(m.drafter, p, s, key), ("drafter",)),
    Decoder("dream-block", "Fast-dLLM's Dream: blocks left to right on its dual (or prefix) KV cache, a block's "
            "first pass its first token, then a threshold or Dream's schedule", DreamBlockConfig,
            lambda m, p, s, key: dream_block_generate(m.drafter, p, s, key), ("drafter",), slots=_block_slots),
    Decoder("threshold", "commit every prediction whose probability exceeds a threshold (in blocks, with "
            "Fast-dLLM's prefix or dual KV cache on LLaDA)", ThresholdConfig,
            lambda m, p, s, key: threshold_generate(m.drafter, p, s, key), ("drafter",), slots=_block_slots),
    Decoder("learn2pd", "commit the predictions a trained filter judges right (Learn2PD)", Learn2PDConfig,
            lambda m, p, s, key: learn2pd_generate(m.drafter, m.filter, p, s, key), ("drafter", "filter"),
            aliases={"threshold": "keep_threshold"},
            slots=lambda m, p, s, size: learn2pd_slots(m.drafter, m.filter, p, s, size)),
    Decoder("llada", "LLaDA's generate: blocks left to right, each step a fixed count of the most confident "
            "(or random) masks; with Fast-dLLM's prefix or dual KV cache", LLaDAConfig,
            lambda m, p, s, key: llada_generate(m.drafter, p, s, key), ("drafter",), slots=_block_slots),
)}


def decoder(name: str) -> Decoder:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; use one of {tuple(DECODERS)}")
    return DECODERS[name]


def defaults(option: str) -> dict[str, Any]:
    """Each decoder's default for the settings field (or alias) `option`, by decoder name."""
    found = {}
    for d in DECODERS.values():
        field = d.aliases.get(option, option)
        if field in d.fields():
            found[d.name] = next(f for f in dataclasses.fields(d.settings) if f.name == field).default
    return found
