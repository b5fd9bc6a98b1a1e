"""lm-evaluation-harness adapter: the `apd_jax` model for `lm_eval` (EleutherAI's harness, >= 0.4.10).

generate_until runs APD (or the verifier alone, decoder=ar, or a decoder of the diffusion model
alone: leftright, threshold, dream-block, llada, with Fast-dLLM's caches), through --batch_size
slots of continuous batching for apd, leftright and ar, else --batch_size requests at a time,
stopping at the checkpoint's eos and its chat template's turn end; loglikelihood and
loglikelihood_rolling are scored by the causal verifier, the model whose distribution APD samples
at R = 0 (a decoder of the diffusion model alone has none: generation tasks only). lm_eval finds
models only in its own registry and 0.4.x reads no plugin entry points, so `lm_eval --model apd_jax`
cannot find this one; running this module is lm_eval's command line with the model registered,
taking exactly lm_eval's arguments:

    python -m apd_jax.evaluation.harness --model apd_jax --model_args R=0.5,W=8 --tasks TASK ...
    python -m apd_jax.evaluation.harness --model apd_jax \\
        --model_args decoder=llada,drafter=DIR,block_length=32,cache=dual --tasks TASK ...

From Python, `import apd_jax.evaluation.harness` registers it for `lm_eval.simple_evaluate(model="apd_jax", ...)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from apd_jax import ASSETS_DIR
from apd_jax.decoding.apd import shared_vocab_size
from apd_jax.decoding.batching import padded_batches
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.decoding.registry import DECODERS as REGISTRY
from apd_jax.decoding.registry import Models
from apd_jax.decoding.generation import DecoderConfig, pad_prompts, prompt_bucket
from apd_jax.evaluation.evaluate import EVAL_DECODERS, decode_all
from apd_jax.models.model import token_logprobs

log = logging.getLogger(__name__)
# lm_eval's registry imports its own models only while it is empty: fill it before adding ours,
# or `--model hf` would stop resolving in a process that imported this module.
importlib.import_module("lm_eval.models")

# gen_kwargs keys generate_until understands (after lm_eval's normalize_gen_kwargs).
GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"})
# Settings that are not model_args: the task's gen_kwargs set the knobs, the adapter the rest.
NOT_KNOBS = frozenset(f.name for f in dataclasses.fields(DecoderConfig))
# model_args naming a decoder setting (R=0.5, block_length=32, cache=dual, ...): each the knob of some decoder.
KNOBS = tuple(dict.fromkeys(name for d in EVAL_DECODERS for name in REGISTRY[d].fields() if name not in NOT_KNOBS))


@dataclasses.dataclass
class Throughput:
    """Generated tokens, model passes and wall seconds (compilation included) of generate_until."""

    tokens: int = 0
    passes: int = 0
    seconds: float = 0.0

    def add(self, records: list[dict], seconds: float) -> None:
        """Finished rows' records (batching.finished_record: ids, passes) and the wall seconds they took."""
        self.tokens += sum(len(r["ids"]) for r in records)
        self.passes += sum(r["passes"] for r in records)
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "tokens_per_pass": self.tokens / max(self.passes, 1),
        }


def scoring_window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of at most max_length tokens whose last len(continuation) targets are the continuation.

    As lm_eval's HFLM: context + continuation, cut from the left to max_length + 1 tokens, shifted by one.
    """
    if not continuation:
        raise ValueError("the continuation encodes to no tokens: nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
    whole = (context + continuation)[-(max_length + 1) :]
    return whole[:-1], whole[1:]


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    return postprocess_generated_text(text, list(until), think_end_token=None)


@register_model("apd_jax")
class APDLM(TemplateLM):
    """APD (Dream-style drafter + Qwen2-style verifier), or another decoder, as an lm_eval model.

    model_args: drafter, verifier (checkpoint directories; default the embedded pair; a decoder of
    the diffusion model alone takes the drafter only, a Dream or LLaDA checkpoint), decoder (one of
    EVAL_DECODERS), the chosen decoder's knobs (KNOBS: R, W, M, rule for apd; block_length, cache,
    threshold, steps, remasking, ... for the block decoders; left out: the decoder's defaults),
    dtype (bfloat16 | float32; default as stored), max_length (tokens the verifier scores at once;
    default the models' context), seed. lm_eval's --batch_size sets the batch; its --device does not
    apply (JAX picks its devices).
    """

    def __init__(
        self,
        drafter: str | Path | None = None,
        verifier: str | Path | None = None,
        decoder: str = "apd",
        dtype: str | None = None,
        max_length: int | None = None,
        seed: int = 0,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lm_eval passes these two: only its 'auto' batching reads the first,
        device: str | None = None,  # and JAX, not lm_eval, places the arrays
        **knobs: Any,
    ) -> None:
        super().__init__()
        unknown = [k for k in knobs if k not in KNOBS]
        if unknown:
            raise TypeError(
                f"unknown apd_jax model_args {sorted(unknown)}; known: drafter, verifier, decoder, dtype, max_length, "
                f"seed and the decoders' knobs {', '.join(KNOBS)} (the batch size is lm_eval's --batch_size)"
            )
        if decoder not in EVAL_DECODERS:
            raise ValueError(f"decoder={decoder!r} must be one of {EVAL_DECODERS}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (apd_jax has no 'auto')")
        self.decoder = decoder
        self.chosen = REGISTRY[decoder]
        # The knobs given (left out: the decoder's defaults); a decoder that does not take one refuses it.
        unused = [k for k in knobs if k not in self.chosen.fields()]
        if unused:
            owner = next((d for d in EVAL_DECODERS if set(unused) <= set(REGISTRY[d].fields())), None)
            whose = "" if owner is None else f" ({REGISTRY[owner].settings.what}'s knobs)"
            raise ValueError(f"decoder={decoder} does not take {', '.join(unused)}{whose}: leave "
                             f"{'it' if len(unused) == 1 else 'them'} out"
                             + ("" if owner is None else f", or use decoder={owner}"))
        self.settings = self.chosen.settings_from(knobs)
        self.settings.validate()
        self.batch_size = int(batch_size)
        if verifier is not None and "verifier" not in self.chosen.uses:
            raise ValueError(f"decoder={decoder} runs the diffusion model alone (drafter=DIR): drop "
                             f"verifier={verifier} (loglikelihood tasks need a verifier: decoder=apd or ar)")
        # The checkpoints the decoder runs, each left out the embedded one; the tokenizer the verifier's if it runs.
        paths = {name: (given or ASSETS_DIR / name) if name in self.chosen.uses else None
                 for name, given in (("drafter", drafter), ("verifier", verifier))}
        self.drafter, self.verifier = (None if path is None else load_model(path, param_dtype=dtype)
                                       for path in paths.values())
        if self.verifier is not None and not self.verifier.cfg.causal:
            raise ValueError(f"verifier {paths['verifier']} is not a causal (Qwen2) model")
        pair = {"drafter", "verifier"} <= set(self.chosen.uses)
        vocab = shared_vocab_size(self.drafter.cfg, self.verifier.cfg) if pair else None
        self.models = Models(self.drafter, self.verifier, shared_vocab=vocab)
        self.tokenizer = load_tokenizer(paths["verifier"] or paths["drafter"])
        # Generation stops at the checkpoint's eos, the tokenizer's and its chat template's turn end.
        self.settings = self.chosen.with_stop_ids(self.settings, self.models, self.tokenizer)
        context = self.chosen.capacity(self.models, self.settings)
        self.max_length = context if max_length is None else max_length
        if type(self.max_length) is not int or not 1 <= self.max_length <= context:
            raise ValueError(f"max_length={max_length!r} must lie in [1, {context}] (an int: the models' context)")
        self.key = jax.random.key(int(seed))
        self.throughput = Throughput()
        self.info = {**{name: None if path is None else str(path) for name, path in paths.items()},
                     "decoder": decoder, "dtype": dtype,
                     **{k: getattr(self.settings, k) for k in KNOBS if k in self.chosen.fields()},
                     "max_length": self.max_length}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer (and so its chat template) in lm-eval's request caches."""
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template (and --fewshot_as_multiturn): the checkpoint tokenizer's own template
        (instruct checkpoints expect it), as transformers renders it."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        if self.verifier is None:
            raise ValueError(f"decoder={self.decoder} runs the diffusion model alone, which scores no loglikelihood: "
                             "run loglikelihood tasks with decoder=apd or decoder=ar (the causal verifier scores them)")
        windows = []
        for text, context, continuation in requests:
            try:
                windows.append(scoring_window(context, continuation, self.max_length))
            except ValueError as err:
                raise ValueError(f"cannot score {text!r}: {err}") from None
            if len(context) + len(continuation) > self.max_length + 1:
                log.warning("context of %d tokens cut to its last %d", len(context), len(windows[-1][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        lengths = [len(inputs) for inputs, _ in windows]
        for batch, rows in padded_batches(windows, self.batch_size, lengths=lengths):
            # Power-of-two lengths (and one batch size) keep the compiled shapes few.
            length = prompt_bucket(max(len(inputs) for inputs, _ in rows), 0, self.max_length)
            inputs, _ = pad_prompts([r[0] for r in rows], length)
            targets, _ = pad_prompts([r[1] for r in rows], length)
            logp, greedy = map(np.asarray, token_logprobs(self.verifier, jnp.asarray(inputs), jnp.asarray(targets)))
            for row, i in enumerate(batch):
                end, span = len(windows[i][0]), len(requests[i][2])
                results[i] = (float(logp[row, end - span : end].sum()), bool(greedy[row, end - span : end].all()))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in lm_eval's disjoint rolling windows of max_length tokens."""
        pieces, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, windows):
                pieces.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(pieces)):
            totals[n] += logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out = [""] * len(requests)
        for members in groups.values():
            texts = self._generate([requests[n].args[0] for n in members], requests[members[0]].args[1])
            for n, text in zip(members, texts):
                out[n] = text
        s = self.throughput.summary()
        print(f"apd_jax {self.decoder}: {s['tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s "
              f"(wall time, compilation included), {s['tokens_per_pass']:.2f} tokens/pass")
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Generate for contexts that share gen_kwargs (evaluate.decode_all: through batch_size slots for a
        decoder with them, else batch_size at a time); text cut at the stop strings."""
        kwargs = normalize_gen_kwargs(gen_kwargs, 256)
        unsupported = sorted(set(kwargs) - GEN_KWARGS)
        if unsupported:
            raise ValueError(f"gen_kwargs {unsupported} are not supported by apd_jax (it takes {sorted(GEN_KWARGS)})")
        until = kwargs["until"]  # generation itself stops only at eos, which decoding drops
        max_new = int(kwargs["max_gen_toks"])
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length {self.max_length}")
        # Knobs the task leaves out keep the decoder's defaults.
        knobs = {"temperature": float, "top_p": float, "top_k": int}
        config = dataclasses.replace(
            self.settings, max_new_tokens=max_new, **{k: cast(kwargs[k]) for k, cast in knobs.items() if k in kwargs}
        )
        # An empty context conditions on the prefix token, as loglikelihood's does; long ones keep their end.
        encoded = [self.tok_encode(c) or [self.prefix_token_id] for c in contexts]
        if max(map(len, encoded)) > room:
            log.warning("contexts longer than max_length - max_gen_toks = %d tokens keep their last %d", room, room)
        prompts = [ids[-room:] for ids in encoded]
        # Longest first, so that a fixed batch's rows pad to similar lengths (slots take any order).
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        self.key, key = jax.random.split(self.key)
        start = time.perf_counter()
        records = decode_all(self.chosen, self.models, config, [contexts[i] for i in order],
                             [prompts[i] for i in order], self.batch_size, key,
                             lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        self.throughput.add(records, time.perf_counter() - start)
        texts = [""] * len(contexts)
        for i, r in zip(order, records):
            texts[i] = truncate_at_stop(r["text"], until)
        return texts

    def get_model_info(self) -> dict:
        """Shown in lm_eval's results["config"]: the pair, the knobs and generate_until's speed."""
        return {**self.info, **{f"generate_{k}": v for k, v in self.throughput.summary().items()}}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    from apd_jax.utils.runtime import runtime_defaults

    runtime_defaults()  # before the backend starts, as `apd-jax` runs
    cli_evaluate()
