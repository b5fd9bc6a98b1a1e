"""What every decoder shares: its settings, knob and prompt checks, eos and padding ids, the result object."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.models.config import ModelConfig, raise_problems
from apd_jax.utils.shapes import pow2_bucket


class InputTypeError(TypeError, ValueError):
    """A setting, config, prompt or key of the wrong type. A TypeError for Python callers, and a
    ValueError too, so the command line reports it in one line like every other bad input."""


def knob_problems(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> list[str]:
    """What is wrong with the knobs every decoder has (none: an empty list)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        problems.append(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p} must lie in (0, 1] (1 disables it)")
    if top_k < 0:
        problems.append(f"top_k={top_k} must be >= 0 (0 disables it)")
    return problems


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The settings every decoder takes; each decoder's config extends it.

    temperature 0 is greedy; top_p 1 and top_k 0 disable their filter (applied after the
    temperature, in that order). Keyword-only, so a subclass's own fields keep the
    leading positions.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the model config's; (): never stop at an eos
    max_len: int | None = None  # cache / sequence capacity; None: the models' max_position_embeddings

    what: ClassVar[str] = "generation"  # names the settings in error messages

    def __post_init__(self) -> None:
        """Every field's type (from its annotation, so a subclass's fields are checked too) and every
        number finite: checked where the settings are built, before any range check compares them."""
        hints = typing.get_type_hints(type(self))
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        wrong = [f"{name}={value!r} ({_a(type(value))}) must be {_describe(hints[name])}"
                 for name, value in fields if not _has_type(value, hints[name])]
        if wrong:
            raise InputTypeError(f"invalid {self.what} settings: " + "; ".join(wrong))
        raise_problems(self.what, [f"{name}={value} must be a finite number" for name, value in fields
                                   if isinstance(value, numbers.Real) and not math.isfinite(value)])

    def problems(self) -> list[str]:
        """What is wrong with these settings (none: an empty list); subclasses add their own."""
        problems = knob_problems(self.max_new_tokens, self.temperature, self.top_p, self.top_k)
        if self.max_len is not None and self.max_len < 1:
            problems.append(f"max_len={self.max_len} must be >= 1 (None: the models' max_position_embeddings)")
        return problems

    def validate(self) -> None:
        raise_problems(self.what, self.problems())


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`: int takes integers (not bool), float takes any real
    number (not bool), tuple[X, ...] a tuple of X, a union any of its members."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        members = args[:1] * len(value) if isinstance(value, tuple) and args[-1:] == (...,) else args
        return isinstance(value, tuple) and len(value) == len(members) and all(map(_has_type, value, members))
    if hint is type(None):
        return value is None
    if isinstance(value, (bool, np.bool_)):
        return hint is bool
    if hint is int:
        return isinstance(value, numbers.Integral)
    if hint is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """An annotation in words, for error messages: 'an int', 'a tuple of int or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return "a tuple of " + " and ".join(a.__name__ for a in args if a is not ...)
    if hint is type(None):
        return "None"
    return {int: "an int", float: "a number (float or int)", str: "a string"}.get(hint, _a(hint))


def _a(kind: type) -> str:
    """A type's name with its article, for error messages: 'a str', 'an int'."""
    return ("an " if kind.__name__[0] in "aeiouAEIOU" else "a ") + kind.__name__


C = TypeVar("C", bound=DecoderConfig)


def check_config(config: Any, expected: type[C]) -> C:
    """`config`, validated, once it is checked to be an `expected` (a decoder's settings class)."""
    if not isinstance(config, expected):
        got = "None" if config is None else _a(type(config))
        raise InputTypeError(f"config must be {_a(expected)}, got {got}")
    config.validate()
    return config


def capacity(max_len: int | None, *model_cfgs: ModelConfig) -> int:
    """Positions a decoding call's caches and sequences hold (prompt + max_new_tokens must fit):
    max_len, or when None the smallest max_position_embeddings of the models it runs. Raises when
    max_len is above that: positions past it were never trained."""
    context = min(cfg.max_position_embeddings for cfg in model_cfgs)
    if max_len is not None and max_len > context:
        raise ValueError(f"max_len={max_len} exceeds the models' max_position_embeddings {context}: lower max_len "
                         f"(--max-len on the command line) to at most {context}, or leave it unset")
    return context if max_len is None else max_len


def resolve_eos(eos_token_ids: Sequence[int] | None, cfg: ModelConfig, vocab: int | None = None) -> tuple[int, ...]:
    """The eos ids a decoder stops at: the given ones, or the model config's when None; each an id
    of the vocabulary the decoder draws from (`vocab`, default the config's vocab_size)."""
    vocab = cfg.vocab_size if vocab is None else vocab
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    outside = [e for e in eos if not 0 <= e < vocab]
    if outside:
        where = "the model config's eos_token_ids" if eos_token_ids is None else "eos_token_ids"
        raise ValueError(f"{where} {outside} lie outside the vocabulary [0, {vocab}): a generation could never "
                         f"stop at them; give eos ids below {vocab}")
    return eos


def pad_id(cfg: ModelConfig, eos: Sequence[int]) -> int:
    """What fills a result after each row's end: the config's pad token, else the first eos, else 0."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)


def default_key(key: jax.Array | None) -> jax.Array:
    """The PRNG key of a decoding call: key(0) when none is given (greedy decoding never reads it).

    One key: a typed jax.random.key(seed), or a legacy jax.random.PRNGKey(seed) (uint32[2]).
    """
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return key
        got = f"key (an array of shape {key.shape} and dtype {key.dtype})"
    else:
        got = f"key={key!r} ({_a(type(key))})"
    seed = key if isinstance(key, numbers.Integral) and not isinstance(key, bool) else "SEED"
    raise InputTypeError(f"{got} is not one jax PRNG key; pass jax.random.key({seed})")


def row_keys(key: jax.Array, indices: Sequence[int] | jax.Array) -> jax.Array:
    """Typed keys [B], fold_in(key, indices[b]): each row's noise from the run's key and its prompt's
    index alone, so a row samples the same in any batch, in any slot, and after a resume."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy uint32[2] key: the same threefry bits, typed
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


@dataclasses.dataclass
class GenerationResult:
    """tokens[b, :lengths[b]] is row b's generation (eos included), the rest padding.

    `accepted[b, i]` is the number of tokens row b committed in pass i (0 once the
    row has stopped), so passes per row and tokens per pass follow from it.
    """

    tokens: np.ndarray  # [B, max_new_tokens]
    lengths: np.ndarray  # [B]
    accepted: np.ndarray  # [B, max passes]
    stopped_at_eos: np.ndarray  # [B] bool
    passes: int  # loop iterations: forward passes of each model

    def row_passes(self) -> np.ndarray:
        return (self.accepted > 0).sum(axis=1)

    def accepted_per_pass(self, row: int) -> list[int]:
        counts = self.accepted[row]
        return counts[counts > 0].tolist()

    def tokens_per_pass(self) -> float:
        """Mean generated tokens per pass over all rows (each row's passes counted).

        Counted from `lengths`: tokens a row's final pass accepted after its eos are
        not generated (they are padding in `tokens`), though `accepted` counts them.
        """
        return float(self.lengths.sum() / max(self.row_passes().sum(), 1))

    def sequences(self) -> list[list[int]]:
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]

    def first(self, n: int) -> GenerationResult:
        """Rows [0, n) alone (the padding rows of a fixed batch dropped)."""
        return dataclasses.replace(self, tokens=self.tokens[:n], lengths=self.lengths[:n],
                                   accepted=self.accepted[:n], stopped_at_eos=self.stopped_at_eos[:n])

    @classmethod
    def concatenate(cls, parts: Sequence[GenerationResult]) -> GenerationResult:
        """The rows of `parts` (batches decoded one after another) in order as one result: `accepted`
        zero-padded to the passes of the part that ran the most, `passes` the sum over the parts (the
        loop iterations run in all)."""
        width = max(r.accepted.shape[1] for r in parts)
        cat = lambda field: np.concatenate([getattr(r, field) for r in parts])  # noqa: E731
        accepted = np.concatenate([np.pad(r.accepted, ((0, 0), (0, width - r.accepted.shape[1]))) for r in parts])
        return cls(cat("tokens"), cat("lengths"), accepted, cat("stopped_at_eos"), sum(r.passes for r in parts))


_PROMPTS_SHAPE = "give a list of prompts, each a list of token ids: [[...]]"


def _is_id(x: Any) -> bool:
    """An integer token id: a Python or numpy integer, or a 0-d integer array; never a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (jax.Array, np.ndarray)):
        return x.ndim == 0 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, numbers.Integral)


def _prompt_ids(i: int, prompt: Any) -> list[int]:
    """Prompt i as a list of Python ints, or an error naming it and the fix."""
    if isinstance(prompt, jax.Array):
        prompt = np.asarray(prompt)
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)):
        raise InputTypeError(f"prompt {i} is a string ({prompt[:20]!r}), not token ids: encode it first "
                             f"(tokenizer.encode) and {_PROMPTS_SHAPE}")
    if _is_id(prompt) or not isinstance(prompt, Iterable):
        raise InputTypeError(f"prompt {i} is {prompt!r} ({_a(type(prompt))}), not a list of ids: {_PROMPTS_SHAPE}")
    ids = list(prompt)
    for j, x in enumerate(ids):
        if type(x) is not int and not _is_id(x):
            raise InputTypeError(f"prompt {i} holds {x!r} ({_a(type(x))}) at position {j}: token ids must be "
                                 "integers")
    return [int(x) for x in ids]


def _prompt_problem(ids: list[int], vocab: int, mask_id: int | None) -> str | None:
    """What keeps one prompt from being decoded (None: nothing), as the rest of a sentence naming it."""
    if not ids:
        return "is empty: generation needs at least one prompt token to condition on"
    bad = [x for x in ids if not 0 <= x < vocab]
    if bad:
        return f"holds ids {bad[:5]} outside the vocabulary [0, {vocab})"
    if mask_id is not None and mask_id in ids:
        return f"holds the mask token id {mask_id}: it would be decoded as a masked position"
    return None


def check_prompts(
    prompts: Sequence[Sequence[int]],
    vocab: int,
    *,
    mask_id: int | None = None,
    fits: tuple[int, int] | None = None,
    sources: Sequence[str] | None = None,
) -> list[list[int]]:
    """Prompts as lists of Python ints, each non-empty, inside [0, vocab) and free of `mask_id`;
    with fits=(max_new_tokens, capacity), each also fits the cache with its generation.

    Takes a sequence of prompts, each a sequence (or 1-d array) of integer ids; a string, a flat
    list of ids or a non-integer id is an error naming the prompt: 'prompt i', or sources[i]
    (a file and line) when given. Every prompt is checked, so a batch job fails before it decodes.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise InputTypeError(f"prompts is {prompts!r:.40} ({_a(type(prompts))}): {_PROMPTS_SHAPE}")
    prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if all(map(_is_id, prompts)):
        raise InputTypeError(f"prompts is a flat list of ids: {_PROMPTS_SHAPE} ([[1, 2, 3]] for one prompt, "
                             "not [1, 2, 3])")
    rows = [_prompt_ids(i, p) for i, p in enumerate(prompts)]
    names = [f"prompt {i}" for i in range(len(rows))] if sources is None else list(sources)
    for ids, name in zip(rows, names):
        problem = _prompt_problem(ids, vocab, mask_id)
        if problem is not None:
            raise ValueError(f"{name} {problem}")
        if fits is not None:
            try:
                prompt_bucket(len(ids), *fits)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
    return rows


def prompt_bucket(longest: int, max_new_tokens: int, capacity: int) -> int:
    """Padded prompt length: a power of two (>= 16) so new prompt lengths rarely recompile.

    Raises if prompt + max_new_tokens cannot fit the cache capacity.
    """
    if longest + max_new_tokens > capacity:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the cache capacity "
            f"{capacity}; shorten the prompt or lower max_new_tokens (a max_len set below the models' context, "
            "generate's --max-len, may be raised up to it)"
        )
    return min(pow2_bucket(longest), capacity - max_new_tokens)


def pad_prompts(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] int32 right-padded with zeros, and the true lengths [B]."""
    padded = np.zeros((len(rows), length), np.int32)
    for i, p in enumerate(rows):
        padded[i, : len(p)] = p
    return padded, np.asarray([len(p) for p in rows], np.int32)


def finish(out, lengths, accepted, eos_hit, passes, pad_id: int) -> GenerationResult:
    """Device outputs -> a GenerationResult with padding after each row's end."""
    out, lengths = np.asarray(out), np.asarray(lengths)
    out = np.where(np.arange(out.shape[1]) < lengths[:, None], out, pad_id)
    return GenerationResult(out, lengths, np.asarray(accepted), np.asarray(eos_hit), int(passes))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One decoding call's inputs at a fixed shape: what every decoder's compiled loop starts from."""

    ids: np.ndarray  # [B, P] int32, right-padded with 0; P a power-of-two bucket (prompt_bucket)
    lengths: np.ndarray  # [B] int32: each prompt's own length
    eos_ids: tuple[int, ...]  # the ids a row stops at (resolve_eos)
    pad_id: int  # fills each row's result after its end
    key: jax.Array
    capacity: int  # positions the caches and sequences hold

    @property
    def eos(self) -> jax.Array:
        """The eos ids as a traced [E] array: only their number is compiled in."""
        return jnp.asarray(self.eos_ids, jnp.int32).reshape(-1)

    @property
    def keys(self) -> jax.Array:
        """Each row's key (`row_keys`: row b is prompt b of the call)."""
        return row_keys(self.key, np.arange(len(self.lengths)))

    def rows(self) -> list[list[int]]:
        """The prompts as checked, unpadded."""
        return [self.ids[i, :n].tolist() for i, n in enumerate(self.lengths)]

    def finish(self, out, lengths, accepted, eos_hit, passes) -> GenerationResult:
        return finish(out, lengths, accepted, eos_hit, passes, self.pad_id)


def prepare(
    config: DecoderConfig,
    prompts: Sequence[Sequence[int]],
    key: jax.Array | None,
    *model_cfgs: ModelConfig,
    vocab: int | None = None,
    mask_id: int | None = None,
) -> Batch:
    """The set-up every decoder shares, for validated settings: the key, the prompts checked against the
    vocabulary (default the first model's) and the mask, the capacity of the models run, the prompts
    padded to their bucket, and the eos and pad ids (from the first model's config)."""
    key = default_key(key)
    vocab = model_cfgs[0].vocab_size if vocab is None else vocab
    rows = check_prompts(prompts, vocab, mask_id=mask_id)
    room = capacity(config.max_len, *model_cfgs)
    ids, lengths = pad_prompts(rows, prompt_bucket(max(map(len, rows)), config.max_new_tokens, room))
    eos = resolve_eos(config.eos_token_ids, model_cfgs[0], vocab)
    return Batch(ids, lengths, eos, pad_id(model_cfgs[0], eos), key, room)


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_compiled = {"seconds": 0.0, "listening": False}


def _record(event: str, duration: float, **_: object) -> None:
    if event in _COMPILE_EVENTS:
        _compiled["seconds"] += duration


class CompileTimer:
    """Seconds JAX spends lowering and compiling (XLA) inside the `with` block, from jax.monitoring.

    Generation is one jitted call, so its wall time less this is the time spent decoding (and
    tracing, which this leaves out: nested jits would count twice). A program found in the
    persistent compilation cache costs (almost) nothing here.
    """

    seconds: float = 0.0

    def __enter__(self) -> CompileTimer:
        if not _compiled["listening"]:  # one process-wide listener (jax.monitoring cannot remove one)
            jax.monitoring.register_event_duration_secs_listener(_record)
            _compiled["listening"] = True
        self._start = _compiled["seconds"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = _compiled["seconds"] - self._start
