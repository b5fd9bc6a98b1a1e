"""Bad input to the Python API and the decoder registry (issue 24): settings of the wrong type or not finite,
a missing config, prompts of the wrong shape, max_len beyond the models, eos ids outside the vocabulary, a
non-key, a shared vocabulary too large, options a decoder does not take. Each fails with one line naming the
input and the fix, before anything compiles."""

import dataclasses
import re
import typing

import jax
import numpy as np
import pytest
from conftest import PROMPTS
from flax import nnx

import apd_jax.cli.generate as generate_command
from apd_jax.decoding.apd import APDConfig, apd_generate, leftright_generate
from apd_jax.decoding.apd_eager import apd_generate_eager
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.cli import main
from apd_jax.evaluation.compare import compared_runs
from apd_jax.decoding.registry import DECODERS, Models, decoder
from apd_jax.decoding.diffusion import DiffusionConfig, ThresholdConfig, diffusion_generate, parallel_decode, threshold_generate
from apd_jax.decoding.generation import InputTypeError, capacity, check_prompts, prompt_bucket
from apd_jax.decoding.learn2pd import Filter, Learn2PDConfig, learn2pd_generate

SETTINGS = sorted({d.settings for d in DECODERS.values()}, key=lambda c: c.__name__)
SMALL = {"max_new_tokens": 4}


def fields_of(kind: type) -> list[tuple[type, str]]:
    """(settings class, field) for every field of every decoder's settings whose annotation includes `kind`."""
    found = []
    for cls in SETTINGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if hint is kind or kind in typing.get_args(hint):
                found.append((cls, f.name))
    return found


@pytest.fixture(scope="module")
def models(dream, qwen):
    return Models(dream, qwen, Filter(rngs=nnx.Rngs(0)))


def every_decoder():
    return pytest.mark.parametrize("name", sorted(DECODERS))


# Case 1: non-finite numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, field", fields_of(float), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_setting_must_be_finite(cls, field, value):
    with pytest.raises(ValueError, match=f"{field}={value} must be a finite number"):
        cls(**{field: value})


def test_temperature_inf_on_the_command_line_is_an_error(capsys):
    assert main(["generate", "--random-tiny", "--ids", "1 2 3", "--temperature", "inf"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "apd-jax generate: error: invalid APD settings: temperature=inf must be a finite number"]


# Case 2: types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"R": "0.7"}, r"R='0.7' \(a str\) must be a number \(float or int\)"),
        ({"W": 2.5}, r"W=2.5 \(a float\) must be an int"),
        ({"M": True}, r"M=True \(a bool\) must be an int"),
        ({"M_min": 2.0}, r"M_min=2.0 \(a float\) must be an int or None"),
        ({"rule": 1}, r"rule=1 \(an int\) must be a string"),
        ({"eos_token_ids": [2]}, r"eos_token_ids=\[2\] \(a list\) must be a tuple of int or None"),
        ({"eos_token_ids": (2, 3.0)}, r"eos_token_ids=\(2, 3.0\) \(a tuple\) must be a tuple of int or None"),
        ({"temperature": None}, r"temperature=None \(a NoneType\) must be a number"),
    ],
)
def test_a_setting_of_the_wrong_type_is_named_where_the_settings_are_built(settings, message):
    with pytest.raises(InputTypeError, match="invalid APD settings: " + message) as raised:
        APDConfig(**settings)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("cls, field", fields_of(int), ids=lambda x: getattr(x, "__name__", x))
def test_every_int_setting_refuses_a_float_and_a_string(cls, field):
    for value in (2.5, "3"):
        with pytest.raises(InputTypeError, match=f"{field}={value!r} .* must be an int"):
            cls(**{field: value})
    with pytest.raises(InputTypeError, match=f"{field}=True"):
        cls(**{field: True})


@pytest.mark.parametrize("cls, field", fields_of(float), ids=lambda x: getattr(x, "__name__", x))
def test_every_float_setting_takes_an_int_and_refuses_a_string(cls, field):
    assert getattr(cls(**{field: 1}), field) == 1
    with pytest.raises(InputTypeError, match=f"{field}='0.5' \\(a str\\) must be a number"):
        cls(**{field: "0.5"})


def test_numpy_numbers_are_settings_too():
    config = APDConfig(R=np.float32(0.5), W=np.int64(3), eos_token_ids=(np.int32(2),))
    config.validate()
    assert (config.R, config.W, config.eos_token_ids) == (0.5, 3, (2,))


def test_replace_checks_the_types_too():
    with pytest.raises(InputTypeError, match="steps=2.5"):
        dataclasses.replace(DiffusionConfig(), steps=2.5)


# Case 3: a missing config or one of another decoder ---------------------------------------------------------


def generate_calls(dream, qwen):
    """(generate function with its models bound, the settings class it takes)."""
    learned = Filter(rngs=nnx.Rngs(0))
    return [
        (lambda c: apd_generate(dream, qwen, PROMPTS, c), APDConfig),
        (lambda c: apd_generate_eager(dream, qwen, PROMPTS[0], c), APDConfig),
        (lambda c: leftright_generate(dream, PROMPTS, 2, c), APDConfig),
        (lambda c: ar_generate(qwen, PROMPTS, c), ARConfig),
        (lambda c: diffusion_generate(dream, PROMPTS, c), DiffusionConfig),
        (lambda c: threshold_generate(dream, PROMPTS, c), ThresholdConfig),
        (lambda c: learn2pd_generate(dream, learned, PROMPTS, c), Learn2PDConfig),
    ]


def test_config_none_or_of_another_decoder_names_the_class(dream, qwen):
    for call, cls in generate_calls(dream, qwen):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        with pytest.raises(InputTypeError, match=f"^config must be {article} {cls.__name__}, got None$"):
            call(None)
        other = ARConfig() if cls is not ARConfig else APDConfig()
        wrong = f"config must be {article} {cls.__name__}, got an? {type(other).__name__}"
        with pytest.raises(InputTypeError, match=wrong):
            call(other)
    with pytest.raises(InputTypeError, match="config must be a ParallelConfig, got None"):
        parallel_decode(dream, None, PROMPTS, None)


def test_the_registry_checks_the_settings_class(models):
    with pytest.raises(InputTypeError, match="config must be an ARConfig, got an APDConfig"):
        decoder("ar").generate(models, PROMPTS, APDConfig())


# Case 4: prompts --------------------------------------------------------------------------------------------


@every_decoder()
@pytest.mark.parametrize(
    "prompts, message",
    [
        ("hello", r"prompts is 'hello' \(a str\): give a list of prompts, each a list of token ids: \[\[\.\.\.\]\]"),
        ([5, 17, 33], r"prompts is a flat list of ids: give a list of prompts, each a list of token ids: "
                      r"\[\[\.\.\.\]\] \(\[\[1, 2, 3\]\] for one prompt, not \[1, 2, 3\]\)"),
        ([[5, 17], "hi"], r"prompt 1 is a string \('hi'\), not token ids: encode it first \(tokenizer.encode\)"),
        ([[5, 17], [3.7, 4]], r"prompt 1 holds 3.7 \(a float\) at position 0: token ids must be integers"),
        ([[5, 17.0]], r"prompt 0 holds 17.0 \(a float\) at position 1: token ids must be integers"),
        ([[5, True]], r"prompt 0 holds True \(a bool\) at position 1"),
        ([[5, 17], 3], r"prompt 1 is 3 \(an int\), not a list of ids"),
        (None, r"prompts is None"),
    ],
)
def test_prompts_of_the_wrong_shape_or_type_are_named(models, name, prompts, message):
    chosen = decoder(name)
    with pytest.raises(InputTypeError, match=message):
        chosen.generate(models, prompts, chosen.settings_from(SMALL))


def test_integer_arrays_are_prompts():
    """numpy and jax integer rows are ids, read as Python ints; a float array is not (no silent truncation)."""
    ids = [[5, 17, 33]]
    for prompts in (np.array(ids), [jax.numpy.array(ids[0])], [[np.int64(5), 17, np.int32(33)]], (i for i in ids)):
        rows = check_prompts(prompts, 320)
        assert rows == ids and all(type(x) is int for x in rows[0])
    with pytest.raises(InputTypeError, match=r"prompt 0 holds np.float64\(5.0\)"):
        check_prompts(np.array([[5.0, 17, 33]]), 320)


# Case 5: max_len above the models' max_position_embeddings -------------------------------------------------


@every_decoder()
def test_max_len_above_the_models_context_is_an_error(models, name):
    chosen = decoder(name)
    context = chosen.capacity(models, chosen.settings_from(SMALL))
    assert context == 512  # the tiny checkpoints' max_position_embeddings
    settings = chosen.settings_from(SMALL | {"max_len": context + 1})
    message = (f"max_len={context + 1} exceeds the models' max_position_embeddings {context}: lower max_len "
               f"\\(--max-len on the command line\\) to at most {context}, or leave it unset")
    with pytest.raises(ValueError, match=message):
        chosen.generate(models, PROMPTS, settings)
    assert chosen.capacity(models, chosen.settings_from(SMALL | {"max_len": 64})) == 64


def test_capacity_is_the_smallest_context_of_the_models(dream, qwen):
    short = dataclasses.replace(qwen.cfg, max_position_embeddings=100)
    assert capacity(None, dream.cfg, short) == 100
    assert capacity(80, dream.cfg, short) == 80
    with pytest.raises(ValueError, match="max_len=101 exceeds the models' max_position_embeddings 100"):
        capacity(101, dream.cfg, short)
    with pytest.raises(ValueError, match="max_len=0 must be >= 1"):
        APDConfig(max_len=0).validate()


# Case 6: eos ids outside the vocabulary ---------------------------------------------------------------------


@every_decoder()
def test_eos_ids_outside_the_vocabulary_are_an_error(models, name):
    chosen = decoder(name)
    vocab = 320 if name == "ar" or name == "apd" else 336  # the verifier's (APD: the shared ids), the drafter's
    settings = chosen.settings_from(SMALL | {"eos_token_ids": (2, vocab, -1)})
    message = (f"eos_token_ids \\[{vocab}, -1\\] lie outside the vocabulary \\[0, {vocab}\\): a generation could "
               f"never stop at them; give eos ids below {vocab}")
    with pytest.raises(ValueError, match=message):
        chosen.generate(models, PROMPTS, settings)


def test_a_model_configs_eos_outside_the_vocabulary_is_named(qwen):
    broken = nnx.clone(qwen)
    broken.cfg = dataclasses.replace(qwen.cfg, eos_token_ids=(9999,))
    with pytest.raises(ValueError, match=r"the model config's eos_token_ids \[9999\] lie outside the vocabulary"):
        ar_generate(broken, PROMPTS, ARConfig(**SMALL))


# Case 7: the PRNG key ---------------------------------------------------------------------------------------


@every_decoder()
@pytest.mark.parametrize(
    "key, message",
    [
        (123, r"key=123 \(an int\) is not one jax PRNG key; pass jax.random.key\(123\)"),
        ("7", r"key='7' \(a str\) is not one jax PRNG key; pass jax.random.key\(SEED\)"),
        (np.zeros(3, np.uint32), r"key \(an array of shape \(3,\) and dtype uint32\) is not one jax PRNG key"),
    ],
)
def test_a_key_that_is_not_a_prng_key_is_named(models, name, key, message):
    chosen = decoder(name)
    with pytest.raises(InputTypeError, match=message):
        chosen.generate(models, PROMPTS, chosen.settings_from(SMALL), key)


def test_a_legacy_key_samples_as_the_typed_key_of_the_same_seed(qwen):
    config = ARConfig(temperature=1.0, **SMALL)
    typed = ar_generate(qwen, [[5, 17, 33]], config, jax.random.key(3)).sequences()
    assert ar_generate(qwen, [[5, 17, 33]], config, jax.random.PRNGKey(3)).sequences() == typed
    with pytest.raises(InputTypeError, match=r"shape \(2,\) and dtype key<fry>"):
        ar_generate(qwen, [[5, 17, 33]], config, jax.random.split(jax.random.key(3)))


# Case 8: apd_generate's shared_vocab ------------------------------------------------------------------------


def test_shared_vocab_beyond_the_models_is_an_error(dream, qwen):
    message = (r"shared_vocab=1000000 must lie in \[1, 320\] \(drafter vocabulary 336, verifier 320\): pass "
               r"shared_vocab_size\(drafter.cfg, verifier.cfg\), or None to compute it")
    with pytest.raises(ValueError, match=message):
        apd_generate(dream, qwen, PROMPTS, APDConfig(**SMALL), shared_vocab=10**6)
    with pytest.raises(ValueError, match=r"shared_vocab=0 must lie in \[1, 320\]"):
        apd_generate(dream, qwen, PROMPTS, APDConfig(**SMALL), shared_vocab=0)
    with pytest.raises(InputTypeError, match="shared_vocab='320' must be an int"):
        apd_generate(dream, qwen, PROMPTS, APDConfig(**SMALL), shared_vocab="320")


def test_a_llada_drafter_with_a_qwen_verifier_is_refused(qwen):
    from apd_jax.decoding.apd_rule import shared_vocab_size
    from apd_jax.models.config import tiny_config
    from apd_jax.models.llada import LLADA
    from apd_jax.models.model import init_model

    llada = init_model(tiny_config(causal=False, family=LLADA), 3)
    message = ("a llada drafter and a qwen2 verifier do not share a tokenizer (llada's and qwen2's): APD needs one "
               "tokenizer for both models")
    with pytest.raises(ValueError, match=re.escape(message)):
        shared_vocab_size(llada.cfg, qwen.cfg)
    with pytest.raises(ValueError, match=re.escape(message)):
        apd_generate(llada, qwen, PROMPTS, APDConfig(**SMALL))


# Case 9: the cache-capacity message names the command-line flag --------------------------------------------


def test_the_capacity_error_names_max_len_and_its_flag():
    with pytest.raises(ValueError, match=r"prompt of 40 tokens \+ max_new_tokens 30 exceeds the cache capacity 64; "
                                         r"shorten the prompt or lower max_new_tokens \(a max_len set below "
                                         r"the models' context, generate's --max-len, may be raised up to it\)"):
        prompt_bucket(40, 30, 64)


# Case 10: options a decoder does not take -------------------------------------------------------------------


def test_an_option_the_decoder_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="^--decoder ar does not take --R, --M-min; it takes: --max-new-tokens, "
                                         "--temperature, --top-p, --top-k, --eos-token-ids, --max-len$"):
        decoder("ar").settings_from({"R": 5, "max_new_tokens": 8, "M_min": 2})
    with pytest.raises(ValueError, match="--decoder dream does not take --threshold; it takes: .*--steps"):
        decoder("dream").settings_from({"threshold": 0.5})
    assert decoder("learn2pd").settings_from({"threshold": 0.5}).keep_threshold == 0.5  # its alias


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_decoder_takes_each_of_its_fields(name):
    chosen = decoder(name)
    defaults = chosen.settings()
    assert chosen.settings_from({f: getattr(defaults, f) for f in chosen.fields()}) == defaults


def test_generate_refuses_an_option_of_another_decoder_before_loading(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate_command, "load_model", never)
    monkeypatch.setattr(generate_command, "init_model", never)
    assert main(["generate", "--decoder", "ar", "--R", "5", "--ids", "1 2 3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("apd-jax generate: error: --decoder ar does not take --R; it takes: "
                                               "--max-new-tokens, --temperature")


def test_compare_gives_each_decoder_only_what_it_takes():
    for _, name, values in compared_runs(8, APDConfig(R=0.5, W=4, M=8), 0.8, learn2pd=True):
        decoder(name).settings_from(values).validate()


def test_the_lm_eval_adapter_checks_its_knobs_before_loading():
    from apd_jax.evaluation.harness import APDLM

    with pytest.raises(InputTypeError, match=r"W=2.5 \(a float\) must be an int"):
        APDLM.create_from_arg_string("W=2.5,drafter=/no/such/dir")
    with pytest.raises(ValueError, match=r"decoder=ar does not take R \(APD's knobs\): leave it out, or use "
                                         "decoder=apd"):
        APDLM.create_from_arg_string("decoder=ar,R=0.5,verifier=/no/such/dir")
