"""Streaming in bounded host memory: the peak RSS of a conversion or a load, each in its own process,
against a bound derived from the checkpoint's largest tensor (not a timing test).

The checkpoint (about 530 MB in bf16, in 150 MB shards with an index) is made in the test; its
largest tensor is the 32 MB embedding. The baseline is a process that only imports jax and
apd_jax and starts the backend, measured here, so the bound follows the machine. Peaks are each
process's own (VmHWM), not lifted by this test process's resident set.
"""

import pytest

from apd_jax.bench.load import make_random, step_in_subprocess
from apd_jax.checkpoints.safetensors import _tensor_index
from apd_jax.checkpoints.streaming import READ_CHUNK_BYTES, READ_THREADS

CONFIG = {
    "model_type": "qwen2", "vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 16, "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "max_position_embeddings": 4096, "rope_theta": 1e4, "rms_norm_eps": 1e-6,
}
# Beyond the baseline: a few copies of the largest tensor in flight (read, on the device, converted,
# written) plus the compiled converters and orbax's buffers; much less than the model itself.
WORKING_SET = 8


def in_flight(largest):
    """The working set, with the blocks the reader threads hold (each at most a READ_CHUNK_BYTES block)."""
    return WORKING_SET * largest + READ_THREADS * min(largest, READ_CHUNK_BYTES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_random(tmp_path_factory.mktemp("mem") / "hf", CONFIG, max_shard_size=150 * 10**6)
    sizes = [t.nbytes for t in _tensor_index(path).values()]
    return path, max(sizes), sum(sizes), step_in_subprocess("baseline")["peak_rss"]


def test_the_checkpoint_is_sharded_and_its_bound_can_fail(checkpoint):
    path, largest, total, _ = checkpoint
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) >= 3
    assert in_flight(largest) < total  # a conversion that held the model could not pass


def test_hf_to_orbax_holds_a_few_tensors_not_the_model(checkpoint, tmp_path):
    path, largest, total, baseline = checkpoint
    peak = step_in_subprocess("convert", path, tmp_path / "flax")["peak_rss"]
    assert peak - baseline <= in_flight(largest), (peak - baseline, largest, total)


@pytest.mark.parametrize("source", ["hf", "orbax"])
def test_load_holds_the_model_once(checkpoint, source, tmp_path):
    # On CPU the device memory is host memory: the loaded model itself is resident, once.
    path, largest, total, baseline = checkpoint
    if source == "orbax":
        step_in_subprocess("convert", path, tmp_path / "flax")
        path = tmp_path / "flax"
    peak = step_in_subprocess("load", path)["peak_rss"]
    assert peak - baseline <= total + in_flight(largest), (peak - baseline, largest, total)
