"""The block decoder's KV caches (apd_jax.decoding.blocks.cached) against Fast-dLLM's published
code, token for token at temperature 0 on tiny random float32 checkpoints: its cached LLaDA samplers
(apd_jax.bench.fastdllm_generate_published, verbatim) on a LLaDA checkpoint written by the published
modeling code and run by it (its past_key_values and replace_position), and its Dream block decoding
(apd_jax.bench.pytorch.fastdllm_dream_sample: the published `_sample` of bench/dream_published) on the
published Dream modeling code with the weights of the conftest's tiny Dream.

Each row of a ragged batch equals the published sampler on that row alone (rows reach block
boundaries at different passes under the threshold rule, so refreshes and window passes share
passes), and a batch of one equals it too. The published answers with one cache differ from those
without (LLaDA) or with the other (Dream), so the comparison tells the modes apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.diffusion import ThresholdConfig, threshold_generate
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import abstract_model
from apd_jax.models.qwen2 import DREAM

torch = pytest.importorskip("torch")
published = pytest.importorskip("apd_jax.bench.fastdllm_generate_published")
torch_llada = pytest.importorskip("apd_jax.bench.torch_llada")

SAMPLERS = {"prefix": "generate_with_prefix_cache", "dual": "generate_with_dual_cache", "none": "generate"}
N, STEPS, BLOCK = 16, 8, 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the published LLaDAModelLM, apd_jax's model) of one tiny random checkpoint."""
    from apd_jax.checkpoints import load_model

    path = torch_llada.save_tiny_llada(tmp_path_factory.mktemp("ckpt") / "llada", seed=0)
    return torch_llada.load_torch_llada(path), load_model(path)


def rows(lengths=(7, 13, 20)):
    return [np.random.default_rng(5).integers(0, 280, n).tolist() for n in lengths]


def config(rule: str, cache: str):
    """LLaDA's fixed count per step, or the threshold rule, in two blocks of the 16-token answer."""
    if rule == "llada":
        return LLaDAConfig(max_new_tokens=N, steps=STEPS, block_length=BLOCK, eos_token_ids=(), cache=cache)
    return ThresholdConfig(max_new_tokens=N, threshold=0.05, block_length=BLOCK, eos_token_ids=(), cache=cache)


def fastdllm(reference, prompt, rule: str, cache: str) -> tuple[list[int], int]:
    """The published sampler's answer to one prompt alone, and its forward passes."""
    run = getattr(published, SAMPLERS[cache])
    out, nfe = run(reference, torch.tensor([prompt]), steps=STEPS, gen_length=N, block_length=BLOCK,
                   mask_id=290, threshold=None if rule == "llada" else 0.05)
    return out[0, len(prompt):].tolist(), nfe


def generate(model, prompts, rule: str, cache: str):
    run = llada_generate if rule == "llada" else threshold_generate
    return run(model, prompts, config(rule, cache))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", ["llada", "threshold"])
def test_ragged_rows_equal_fastdllm_rows_alone(models, rule, cache):
    reference, model = models
    prompts = rows()
    got = generate(model, prompts, rule, cache)
    differs = []
    for b, prompt in enumerate(prompts):
        want, nfe = fastdllm(reference, prompt, rule, cache)
        assert got.tokens[b].tolist() == want
        # The published loop runs one more pass in a block its refresh emptied; apd_jax moves on.
        assert got.row_passes()[b] <= nfe
        differs.append(want != fastdllm(reference, prompt, rule, "none")[0])
    assert any(differs)  # the cache changed an answer: the comparison tells cached from uncached decoding
    if rule == "threshold":
        assert len(set(got.row_passes().tolist())) > 1  # rows changed blocks at different passes


@pytest.mark.parametrize("rule, cache", [("llada", "dual"), ("threshold", "prefix")])
def test_a_batch_of_one_equals_fastdllm(models, rule, cache):
    reference, model = models
    (prompt,) = rows((11,))
    assert generate(model, [prompt], rule, cache).tokens[0].tolist() == fastdllm(reference, prompt, rule, cache)[0]


def test_a_rule_reading_answer_positions_sees_the_whole_answer_alike(models):
    """A keep rule other than the threshold (as Learn2PD's filter, which reads positions in the
    answer) is shown the whole answer in every cached pass; one deciding as the threshold does
    decodes as the threshold, which window passes show the blocks alone."""
    from flax import nnx

    from apd_jax.decoding.diffusion import parallel_decode

    class Above(nnx.Module):
        def __call__(self, pred, masked):
            return pred.confidence > 0.05

    _, model = models
    prompts = rows()
    want = threshold_generate(model, prompts, config("threshold", "prefix"))
    got = parallel_decode(model, Above(), prompts, config("threshold", "prefix"))
    assert got.tokens.tolist() == want.tokens.tolist() and got.row_passes().tolist() == want.row_passes().tolist()


def test_end_of_text_on_a_cache_keeps_rows_apart(models):
    """End-of-Text (no published counterpart with a cache): a row that commits an eos drops the
    positions after it, hidden from the window passes' attention too; each row of a batch equals its
    run alone (rows one prompt bucket apart would compile anew)."""
    _, model = models
    settings = ThresholdConfig(max_new_tokens=N, threshold=0.05, block_length=BLOCK, eot_threshold=0.01,
                               eos_token_ids=(180,), cache="dual")  # 180: a token some rows predict
    prompts = [np.random.default_rng(6).integers(0, 280, n).tolist() for n in (13, 14, 15)]
    got = threshold_generate(model, prompts, settings)
    assert got.stopped_at_eos.any() and not got.stopped_at_eos.all()
    for b, prompt in enumerate(prompts):
        alone = threshold_generate(model, [prompt], settings)
        assert got.sequences()[b] == alone.sequences()[0] and got.row_passes()[b] == alone.row_passes()[0]


def test_the_registry_takes_the_cache_by_field_name(models):
    from apd_jax.decoding.registry import Models, decoder

    _, model = models
    llada = decoder("llada")
    settings = llada.settings_from({"max_new_tokens": N, "steps": STEPS, "block_length": BLOCK,
                                    "eos_token_ids": (), "cache": "dual"})
    prompts = rows((11,))
    got = llada.generate(Models(drafter=model), prompts, settings)
    assert got.tokens.tolist() == generate(model, prompts, "llada", "dual").tokens.tolist()


@pytest.mark.parametrize("settings, message", [
    (LLaDAConfig(cache="full"), "cache='full': use one of ('none', 'prefix', 'dual')"),
    (LLaDAConfig(cache="dual", cfg_scale=1.0), "cache='dual' runs without guidance"),
    (ThresholdConfig(cache="prefixed"), "cache='prefixed': use one of"),
])
def test_bad_cache_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings.validate()


@pytest.fixture(scope="module")
def published_dream(dream, dream_dir):
    """Fast-dLLM's published DreamModel (apd_jax.bench.dream_published) with the weights of the
    conftest's tiny Dream checkpoint, float32."""
    from apd_jax.bench.dream_published.modeling_dream import DreamModel
    from apd_jax.bench.pytorch import published_dream_config
    from apd_jax.bench.torch_reference.checkpoints import load_safetensors_dir

    model = DreamModel(published_dream_config(dream.cfg))
    model.load_state_dict(load_safetensors_dir(dream_dir), strict=True)
    return model.eval()


def fastdllm_dream(model, prompt, steps: int, threshold: float | None, cache: str) -> tuple[list[int], int, int]:
    """The published Dream loop's answer to one prompt alone, its refresh passes and its window passes."""
    from apd_jax.bench.pytorch import PassClock, fastdllm_dream_sample

    clock = PassClock(model, len(prompt) + N)
    out = fastdllm_dream_sample(clock, torch.tensor([prompt]), N, BLOCK, threshold, 330, cache, steps)
    refresh, window = clock.kinds()
    return out[0, len(prompt):].tolist(), len(refresh), len(window)


def dream_settings(steps: int, threshold: float | None, cache: str):
    from apd_jax.decoding.blocks.dream import DreamBlockConfig

    return DreamBlockConfig(max_new_tokens=N, steps=steps, block_length=BLOCK, threshold=threshold, cache=cache,
                            eos_token_ids=())


# steps=STEPS: the schedule commits tokens every pass, several in some; steps=N (as bench runs it): its
# int(masks * (1 - s / t)) is 0 at some passes, which both loops run. Threshold 0.9 is bench's (tiny
# random weights never reach it: one token a pass); 0.1 commits several.
@pytest.mark.parametrize(("cache", "steps", "threshold"), [
    ("prefix", STEPS, None), ("dual", STEPS, None), ("prefix", N, None), ("dual", N, None),
    ("prefix", N, 0.1), ("dual", N, 0.1), ("dual", N, 0.9),
])
def test_dream_ragged_rows_equal_fastdllm_dream_rows_alone(dream, published_dream, cache, steps, threshold):
    """Fast-dLLM's Dream block decoding (the block's first pass commits its first position; then the
    entropy schedule or the threshold; top_k 50), each row of a ragged batch as the published loop
    (bench/dream_published's `_sample` on its modeling code) alone: token for token, and pass for pass
    under a threshold (the schedule's passes that commit nothing are not counted apart)."""
    from apd_jax.decoding.blocks.dream import dream_block_generate

    prompts = [np.random.default_rng(5).integers(0, 300, n).tolist() for n in (7, 13, 20)]
    got = dream_block_generate(dream, prompts, dream_settings(steps, threshold, cache))
    other = "dual" if cache == "prefix" else "prefix"
    differs = []
    for b, prompt in enumerate(prompts):
        tokens, refresh, window = fastdllm_dream(published_dream, prompt, steps, threshold, cache)
        assert got.tokens[b].tolist() == tokens
        # A refresh per block. row_passes counts the passes that committed a token: the schedule's
        # int(masks * (1 - s / t)) is 0 at some passes at steps=N, which the published loop runs too.
        assert refresh == N // BLOCK and got.row_passes()[b] <= refresh + window
        if threshold is not None:  # the threshold rule commits at least one token every pass
            assert got.row_passes()[b] == refresh + window
        differs.append(tokens != fastdllm_dream(published_dream, prompt, steps, threshold, other)[0])
    # The two caches give different answers somewhere: the comparison tells them apart.
    assert any(differs)
    if steps == STEPS and threshold is None:
        assert got.row_passes().tolist() == [STEPS] * 3  # every step committed
    if threshold == 0.1:
        assert got.row_passes().max() < N // 2  # several tokens a pass
    if threshold == 0.9:
        assert got.row_passes().tolist() == [N] * 3  # one token a pass


@pytest.mark.parametrize(("cache", "threshold"), [("dual", None), ("prefix", 0.1)])
def test_dream_a_batch_of_one_equals_fastdllm_dream(dream, published_dream, cache, threshold):
    from apd_jax.decoding.blocks.dream import dream_block_generate

    prompt = np.random.default_rng(5).integers(0, 300, 11).tolist()
    got = dream_block_generate(dream, [prompt], dream_settings(STEPS, threshold, cache))
    assert got.tokens[0].tolist() == fastdllm_dream(published_dream, prompt, STEPS, threshold, cache)[0]


def test_bench_times_dream_block_decoding(dream):
    """bench_canvas runs Fast-dLLM's Dream block decoding, named by its rule and cache."""
    from apd_jax.bench import decoders as bench
    from apd_jax.decoding.blocks.dream import DreamBlockConfig

    settings = DreamBlockConfig(max_new_tokens=N, steps=STEPS, block_length=BLOCK, eos_token_ids=(), cache="dual")
    row = bench.bench_canvas(dream, settings, 1, 7, {"bandwidth": 1e15, "matmul_flops": 1e9}, 1)
    assert row.name == f"Dream block steps={STEPS} block={BLOCK} schedule cache=dual" and row.passes == STEPS


def test_a_shifted_family_is_refused_a_cache():
    """Dream predicts position i from output i - 1, outside a window that starts at i: only the rule
    that commits each block's first position in its refresh decodes Dream on a cache."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, family=DREAM, mask_token_id=63, eos_token_ids=(1,))
    with pytest.raises(ValueError, match="cache=.prefix. runs a dream model only with Fast-dLLM.s Dream rule"):
        threshold_generate(abstract_model(cfg), [[1, 2]], ThresholdConfig(max_new_tokens=4, cache="prefix"))


def test_bench_times_the_cached_modes_beside_fastdllm(models, tmp_path):
    """`apd-jax bench --baselines llada`'s pieces on CPU: the block decoder's cached rows, named by
    their cache, a bound between a window pass's and a refresh pass's, and Fast-dLLM's rows of the
    same cache and rule matched to them (--against)."""
    from apd_jax.bench import decoders as bench
    from apd_jax.bench import pytorch as bench_torch
    from apd_jax.bench.bounds import matmul_params

    reference, model = models
    ceilings = {"bandwidth": 1e15, "matmul_flops": 1e9}  # compute-bound: the bound follows the tokens run
    steps_n = LLaDAConfig(max_new_tokens=N, block_length=BLOCK, eos_token_ids=(), cache="dual")  # as bench runs it
    jax_rows = [bench.bench_canvas(model, c, 1, 11, ceilings, 1) for c in (steps_n, config("threshold", "dual"))]
    assert [r.name for r in jax_rows] == [f"LLaDA steps={N} block={BLOCK} cache=dual",
                                          f"llada threshold=0.05 block={BLOCK} cache=dual"]
    layers, head = matmul_params(model.cfg)
    refresh, window = (2e3 * (layers * tokens + head * answer) / 1e9
                       for tokens, answer in ((11 + N, N), (BLOCK, BLOCK)))
    assert all(window < r.bound_ms < refresh for r in jax_rows)
    (tmp_path / "jax.json").write_text(bench.to_json(jax_rows, ceilings))
    prompt = bench.random_prompts([model.cfg], 1, 11)[0]
    torch_rows = [bench_torch.bench_fastdllm(reference, model.cfg, prompt, N, BLOCK, "dual", threshold, 1)
                  for threshold in (None, 0.05)]
    lines = bench_torch.ratios(torch_rows, tmp_path / "jax.json")
    assert [line.split(":")[0] for line in lines] == [r.name for r in torch_rows]
    assert torch_rows[0].passes == jax_rows[0].passes == N
