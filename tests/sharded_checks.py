"""Sharded-APD checks on 8 virtual CPU devices, run by test_sharding.py in a fresh process.

The virtual device count is read once, when jax starts its backend, and the pytest
process has started it already (other test modules import jax); so test_sharding.py
runs this script with the named checks as arguments. It prints one JSON line:
check name -> "ok" or the failure's traceback.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import contextlib  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from apd_jax import cli  # noqa: E402
from apd_jax.decoding import apd  # noqa: E402
from apd_jax.models.cache import KVCache  # noqa: E402
from apd_jax.checkpoints import export_hf, load_hf, load_orbax, model_params, save_orbax  # noqa: E402
from apd_jax.models.config import tiny_config  # noqa: E402
from apd_jax.models.model import forward_logits, init_model  # noqa: E402
from apd_jax.models.sharding import CACHE_SPEC, constrain_cache, make_mesh, param_spec, shard_model, shard_rows  # noqa: E402

MESHES = ((1, 8), (2, 4), (8, 1))  # (data, model)
# Every split dim divisible by 8; the verifier has grouped-query attention (16 heads on 8 KV heads).
DRAFTER = tiny_config(False, num_heads=8, num_kv_heads=8, head_dim=8)
VERIFIER = tiny_config(True, num_heads=16, num_kv_heads=8, head_dim=4)
PROMPTS = [[5, 17, 33, 101, 7], [44, 3], [200, 11, 19, 300, 87, 66, 1], [9], list(range(1, 17)), [77, 78], [310, 4],
           [100, 200, 250]]  # padded to 16: caches of 16 + 32 positions
GREEDY = apd.APDConfig(R=0.7, W=4, M=12, max_new_tokens=32, eos_token_ids=())
SAMPLED = apd.APDConfig(R=0.5, W=4, M=12, max_new_tokens=32, eos_token_ids=(), temperature=0.8, top_p=0.9)


@functools.cache
def models():
    return init_model(DRAFTER, 1), init_model(VERIFIER, 2)


@functools.cache
def sharded(data: int, model: int):
    mesh = make_mesh(data, model)
    return mesh, *(shard_model(m, mesh) for m in models())


def _flat_params(model) -> dict[str, jax.Array]:
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _full(spec: P, ndim: int) -> tuple:
    """A spec with its implicit trailing Nones written out (jax drops them from output shardings)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _assert_placed(arr: jax.Array, spec: P, mesh, what: str) -> None:
    assert arr.sharding.mesh == mesh, (what, arr.sharding)
    assert _full(arr.sharding.spec, arr.ndim) == _full(spec, arr.ndim), (what, arr.sharding)
    local = tuple(n // (mesh.shape[a] if a else 1) for n, a in zip(arr.shape, _full(spec, arr.ndim)))
    assert {s.data.shape for s in arr.addressable_shards} == {local}, (what, local)


def _assert_model_placed(model, mesh) -> None:
    for path, arr in _flat_params(model).items():
        _assert_placed(arr, param_spec(path, model.cfg.family), mesh, path)


def apd_matches_single_device():
    drafter, verifier = models()
    for config in (GREEDY, SAMPLED):
        ref = apd.apd_generate(drafter, verifier, PROMPTS, config, jax.random.key(5))
        for shape in MESHES:
            mesh, d, v = sharded(*shape)
            out = apd.apd_generate(d, v, PROMPTS, config, jax.random.key(5), mesh=mesh)
            assert out.sequences() == ref.sequences(), (shape, config.temperature)
            assert np.array_equal(out.accepted, ref.accepted) and out.passes == ref.passes, (shape, config.temperature)


def forward_logits_match():
    tokens = np.random.default_rng(0).integers(0, 320, size=(8, 24)).astype(np.int32)
    for i, model in enumerate(models()):
        ref = np.asarray(forward_logits(model, jnp.asarray(tokens)))
        for shape in MESHES:
            mesh, *placed = sharded(*shape)
            (rows,) = shard_rows(mesh, tokens)
            got = np.asarray(forward_logits(placed[i], rows))
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=f"model {i} mesh {shape}")


def params_sharded_as_declared():
    # Freshly placed: an nnx.jit call writes its outputs back into the model, and on a size-1
    # axis XLA may hand back an equivalent spec (P('model', None) for P(None, 'model')).
    for shape in MESHES:
        mesh = make_mesh(*shape)
        for model in models():
            _assert_model_placed(shard_model(model, mesh), mesh)
    # Spot checks on (data=2, model=4), written out: heads, intermediate and vocab split 4 ways.
    d = shard_model(models()[0], make_mesh(2, 4))
    local = {p: a.addressable_shards[0].data.shape for p, a in _flat_params(d).items()}
    assert local["layers.0.self_attn.qkv_proj.kernel"] == (64, 2, 3, 8)  # 2 of 8 KV-head groups
    assert local["layers.0.self_attn.qkv_proj.bias"] == (2, 3, 8)
    assert local["layers.0.self_attn.o_proj.kernel"] == (16, 64)
    assert local["layers.1.mlp.gate_up_proj.kernel"] == (64, 2, 32)
    assert local["layers.1.mlp.down_proj.kernel"] == (32, 64)
    assert local["embed_tokens.embedding"] == (84, 64) and local["lm_head"] == (64, 84)
    assert local["norm.weight"] == (64,)


def caches_sharded_as_declared():
    mesh, d, v = sharded(2, 4)
    # A prefill on a cache made inside jit comes out as declared: batch over data, KV heads over model.
    prefill = nnx.jit(lambda m, t, n: m(t, valid=n, cache=constrain_cache(KVCache.zeros(m.cfg, 8, 32), mesh))[1])
    cache = prefill(v, *shard_rows(mesh, np.ones((8, 16), np.int32), np.arange(9, 17, dtype=np.int32)))
    assert len(cache.k) == len(cache.v) == v.cfg.num_layers
    for layer, (k, v_) in enumerate(zip(cache.k, cache.v)):
        _assert_placed(k, CACHE_SPEC, mesh, f"k[{layer}]")
        _assert_placed(v_, CACHE_SPEC, mesh, f"v[{layer}]")
    _assert_placed(cache.lengths, P("data"), mesh, "lengths")
    assert cache.k[0].addressable_shards[0].data.shape == (4, 2, 32, 4)
    # Inside the compiled APD loop, every device only ever holds its [8/2, 8/4, 48, head_dim] block of
    # each layer's cache: the full [8, 8, 48, head_dim] never appears.
    calls = []
    jitted = apd._generate
    apd._generate = lambda *args: calls.append(args) or jitted(*args)
    try:
        apd.apd_generate(d, v, PROMPTS, GREEDY, mesh=mesh)
    finally:
        apd._generate = jitted
    hlo = jitted.lower(*calls[0]).compile().as_text()
    for head_dim in (DRAFTER.head_dim, VERIFIER.head_dim):
        assert f"f32[4,2,48,{head_dim}]" in hlo and f"f32[8,8,48,{head_dim}]" not in hlo, head_dim


def _drafter_hf_config() -> dict:
    cfg = models()[0].cfg
    return {
        "model_type": "Dream", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "mask_token_id": cfg.mask_token_id,
        "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": "float32",
    }


def _assert_restored(restored, mesh) -> None:
    _assert_model_placed(restored, mesh)
    want = _flat_params(models()[0])
    for path, arr in _flat_params(restored).items():
        assert np.array_equal(np.asarray(arr), np.asarray(want[path])), path


def orbax_restores_into_shards():
    mesh = make_mesh(2, 4)
    with tempfile.TemporaryDirectory() as tmp:
        save_orbax(models()[0], Path(tmp) / "ckpt", _drafter_hf_config())
        restored = load_orbax(Path(tmp) / "ckpt", mesh=mesh)
    _assert_restored(restored, mesh)


def hf_loads_into_shards():
    # Each device reads only its slice of each HF tensor (the fused q/k/v by KV-head group too).
    mesh = make_mesh(2, 4)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config").mkdir()
        (Path(tmp) / "config" / "config.json").write_text(json.dumps(_drafter_hf_config()))
        export_hf(model_params(models()[0]), Path(tmp) / "config", Path(tmp) / "hf")
        restored = load_hf(Path(tmp) / "hf", mesh=mesh)
    _assert_restored(restored, mesh)


def cli_mesh_flag():
    def generate(*extra: str) -> list[str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["generate", "--random-tiny", "--ids", "--prompts-file", str(prompts),
                             "--max-new-tokens", "16", "--W", "4", "--M", "8", *extra]) == 0
        return out.getvalue().splitlines()[:-1]  # the last line is timing

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("5 17 33\n44 3 9 12\n")
        assert generate("--mesh", "data=2,model=2") == generate()


def main(names: list[str]) -> None:
    results = {}
    for name in names:
        try:
            globals()[name]()
            results[name] = "ok"
        except Exception:  # report every check, not just the first failure
            results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 virtual CPU devices, got {jax.devices()}"
    main(sys.argv[1:])
