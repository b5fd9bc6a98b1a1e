"""The public API at the top level, and what using it imports (issue 25)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import apd_jax

REPO = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_definition():
    for name in apd_jax.__all__:
        value = getattr(apd_jax, name)
        if hasattr(value, "__module__") and callable(value):
            assert value.__module__.startswith("apd_jax."), name
    assert apd_jax.APDConfig is __import__("apd_jax.decoding.apd", fromlist=["APDConfig"]).APDConfig


def test_an_unknown_name_is_an_attribute_error():
    try:
        apd_jax.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("apd_jax.no_such_name resolved")


_USE_WITHOUT_TORCH = """
import pkgutil, sys
import apd_jax
from apd_jax import APDConfig, apd_generate, load_model
drafter, verifier = load_model(apd_jax.ASSETS_DIR / "drafter"), load_model(apd_jax.ASSETS_DIR / "verifier")
result = apd_generate(drafter, verifier, [[5, 17, 33, 101]], APDConfig(max_new_tokens=4))
assert result.lengths[0] > 0
for info in pkgutil.walk_packages(apd_jax.__path__, "apd_jax."):
    if not info.name.startswith("apd_jax.bench"):
        __import__(info.name)
print("TORCH", "torch" in sys.modules)
"""


def test_the_library_never_imports_torch_outside_bench():
    """Loading, generating and every module but apd_jax.bench's. (A Hugging Face tokenizer is left out:
    transformers itself imports torch where it is installed, from transformers.configuration_utils.)"""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _USE_WITHOUT_TORCH], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False", out.stdout


def test_importing_apd_jax_imports_no_jax():
    code = "import sys, apd_jax; print('jax' in sys.modules, 'transformers' in sys.modules)"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_importing_the_checkpoint_code_starts_no_thread():
    code = "import threading, apd_jax.checkpoints; print(threading.active_count())"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["1"], out.stderr[-2000:]
