"""Tiny random Hugging Face checkpoints (written once per session) and their loaded models."""

from __future__ import annotations

import atexit
import functools
import gc
import os
import shutil
import tempfile

# Tests must not depend on an accelerator nor on its matmul precision defaults.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI keeps compiled programs under $XDG_CACHE_HOME; tests must not write the user's cache. The
# directory (tens of MB of programs by the end of a run) goes when the run ends.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="apd_jax-test-cache-")
atexit.register(functools.partial(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True))

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from apd_jax.checkpoints import load_hf  # noqa: E402
from apd_jax.bench.torch_reference.checkpoints import save_tiny_dream, save_tiny_qwen2  # noqa: E402
from apd_jax.bench.torch_reference.dream import TorchDream  # noqa: E402

# Shared by the decoder tests (imported with `from conftest import ...`): three prompts of
# different lengths, so batches need padding, and the tiny Dream checkpoint's mask id.
PROMPTS = [[5, 17, 33, 101, 7, 250, 64, 12, 99], [44, 3], [200, 11, 19, 300, 87, 66, 1, 150, 40, 41, 42, 43, 44, 9]]
MASK = 330  # save_tiny_dream's mask_token_id


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds
    memory maps, and a process may hold at most vm.max_map_count of them (65530 by
    default): two decoder modules alone reached 36941, and the whole suite in one process
    crashed inside the compiler once past the limit."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("qwen"), seed=1)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory):
    return save_tiny_dream(tmp_path_factory.mktemp("dream"), seed=2)


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return load_hf(qwen_dir)


@pytest.fixture(scope="session")
def dream(dream_dir):
    return load_hf(dream_dir)


@pytest.fixture(scope="session")
def torch_qwen(qwen_dir):
    return Qwen2ForCausalLM.from_pretrained(qwen_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def torch_dream(dream_dir):
    return TorchDream.from_pretrained(dream_dir).eval()


# ----------------------------------------------------------------------------- the command line, in process


def run_cli(argv: list[str]) -> int:
    """apd_jax.cli.main(argv)'s exit status, argparse's refusals (SystemExit) included."""
    from apd_jax.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def work_started(*args, **kwargs):
    raise AssertionError("work started before the options were checked")


@pytest.fixture
def no_work(monkeypatch):
    """Any model load, random model, corpus read or oracle run fails the test: errors come first."""
    import apd_jax.text.corpus
    from apd_jax.cli import bench, compare, eval as eval_command, generate, train_filter

    for module in (generate, bench, compare, eval_command, train_filter):
        monkeypatch.setattr(module, "load_model", work_started)
    monkeypatch.setattr(bench.bench, "random_model", work_started)
    monkeypatch.setattr(compare, "init_model", work_started)
    monkeypatch.setattr(apd_jax.text.corpus, "load_corpus", work_started)
