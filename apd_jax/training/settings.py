"""The settings of `apd-jax train` and their defaults: the embedded pair's recipe, and the small
LLaDA-shaped model's (the `llada` job).

Kept apart from the training code so that the command line reads its defaults here without
importing the training stack.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from apd_jax.models.config import DRAFTER_SIZE, VERIFIER_SIZE, ModelSize, below_problems, raise_problems
from apd_jax.text import corpus

# The `llada` job's model: LLaDA's layout (untied head, no q/k/v bias) at a size CPU trains
# (apd_jax/assets/llada).
LLADA_SIZE = ModelSize(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384)
# What `--which` trains: the tokenizer alone, a member of the pair or both, or the LLaDA-shaped model.
JOBS = ("both", "tokenizer", "drafter", "verifier", "llada")


def models_trained(which: str) -> list[str]:
    """The model directories a --which job writes: the pair's (both), one model's, or none (tokenizer)."""
    return ["drafter", "verifier"] if which == "both" else [] if which == "tokenizer" else [which]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 7000
    batch_size: int = 128
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 300
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    eval_every: int = 500
    eval_windows: int = 128
    eval_batch: int = 32
    eps: float = 1e-3
    suffix_prob: float = 0.5
    # Residual dropout on every attention and MLP output while training (GPT-2's): a
    # regulariser for the many epochs over a small corpus. 0 turns it off.
    dropout: float = 0.0
    # Gradient accumulation: each step's batch in this many equal slices, summed (the same
    # loss and gradient, less memory). 0: the fewest that fit the device's free memory.
    micro_batches: int = 0

    def validate(self) -> None:
        problems = below_problems(self, ("steps", "batch_size", "log_every", "eval_every", "eval_windows", "eval_batch"))
        problems += below_problems(self, ("seq_len",), 16)
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} must be >= 0")
        if self.micro_batches < 0 or (self.micro_batches and self.batch_size % self.micro_batches):
            problems.append(f"micro_batches={self.micro_batches} must be 0 (auto) or divide batch_size={self.batch_size}")
        if not 0 <= self.suffix_prob <= 1 or not 0 < self.eps < 1:
            problems.append("suffix_prob must lie in [0, 1] and eps in (0, 1)")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} must lie in [0, 1)")
        raise_problems("training", problems)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    out: Path
    which: str = "both"  # one of JOBS
    vocab_size: int = 4096
    drafter: ModelSize = DRAFTER_SIZE
    verifier: ModelSize = VERIFIER_SIZE
    drafter_train: TrainSettings = TrainSettings(steps=15000)
    # The verifier overfits the stdlib without dropout; the drafter's masking is its noise.
    verifier_train: TrainSettings = TrainSettings(steps=8000, seed=1, dropout=0.15)
    llada: ModelSize = LLADA_SIZE
    llada_train: TrainSettings = TrainSettings(steps=2000)
    param_dtype: str = "float32"
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on accelerators, float32 on CPU
    storage_dtype: str = "bfloat16"
    stdlib: Path | None = None
    packages: tuple[str, ...] = ()  # installed packages whose sources join the training files
    # The stdlib's tokens appear this many times in the training stream: with packages (the
    # dependencies are about 4x the stdlib's size), a weight for the held-out files' own domain.
    stdlib_repeats: int = 1
    max_files: int | None = None
    heldout_fraction: float = corpus.DEFAULT_HELDOUT_FRACTION
    retrain_tokenizer: bool = False
    eval_prompts: int = 32
    eval_max_new_tokens: int = 128
