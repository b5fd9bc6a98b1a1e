"""The lm-eval adapter on the embedded pair: scores against transformers' Qwen2, generations against
apd_jax's own decoders, the harness run on local tasks (Python API and command line), bad arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from apd_jax import ASSETS_DIR
from apd_jax.decoding.apd import APDConfig, apd_generate
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.evaluation.harness import APDLM, truncate_at_stop
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"
BATCH = 8


@pytest.fixture(scope="module")
def lm():
    return APDLM(dtype="float32", batch_size=BATCH)


@pytest.fixture(scope="module")
def ar_lm():
    """The verifier alone with a 16-token context, so windows and truncation show on short texts."""
    return APDLM(decoder="ar", dtype="float32", max_length=16, batch_size=4)


@pytest.fixture(scope="module")
def reference():
    return Qwen2ForCausalLM.from_pretrained(
        ASSETS_DIR / "verifier", dtype=torch.float32, attn_implementation="eager"
    ).eval()


def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-softmax of transformers' logits (float64 on the host)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def reference_score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm_eval's causal split (the whole string encoded, the context's tokens cut off), scored in torch."""
    eos = tok.eos_token_id
    if context:
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [eos], tok.encode(continuation)
    logp = torch_logprobs(model, ctx + cont)[len(ctx) - 1 : -1]
    return float(sum(logp[i, t] for i, t in enumerate(cont))), bool(all(logp.argmax(-1) == cont))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


PAIRS = [
    ("import os\nimport", " sys"),
    ("import os\nimport", " banana split"),
    ("", "import os"),  # empty context: scored after the eos token
    ("def f(x): ", "return x"),  # trailing space moves into the continuation
    ("class TestCase(unittest.", "TestCase):"),
]


def test_loglikelihood_equals_transformers_qwen2(lm, reference):
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        want, want_greedy = reference_score(reference, lm.tokenizer, context.rstrip(" "),
                                            context[len(context.rstrip(" ")):] + continuation)
        assert abs(logprob - want) < 1e-4, (context, continuation, logprob, want)
        assert greedy == want_greedy
    assert got[0][1] and not got[1][1]  # ' sys' is the verifier's greedy choice, ' banana split' is not


def test_rolling_windows_score_every_token_once(ar_lm, reference):
    """max_length 16: blocks of 16 predictions, each block's inputs the 16 tokens before its end
    (the first block starts with the eos token), as lm_eval's rolling windows define."""
    text = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n" * 2
    tokens = [ar_lm.tokenizer.eos_token_id] + ar_lm.tokenizer.encode(text)
    n, L = len(tokens) - 1, 16
    assert n > 2 * L and n % L  # full blocks and a partial one
    want = 0.0
    for start in range(0, n, L):
        end = min(start + L, n)
        first = max(end - L, 0)
        logp = torch_logprobs(reference, tokens[first:end])
        want += sum(logp[i - first, tokens[i + 1]] for i in range(start, end))
    short = "import os\nimport sys\n"
    whole = [ar_lm.tokenizer.eos_token_id] + ar_lm.tokenizer.encode(short)
    logp = torch_logprobs(reference, whole)
    want_short = sum(logp[i, t] for i, t in enumerate(whole[1:]))
    got = ar_lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    assert got == pytest.approx([want, want_short], abs=1e-4)


def test_truncate_at_stop():
    assert truncate_at_stop("a = 1\nb = 2", ["\n"]) == "a = 1"
    assert truncate_at_stop("x(y)\nz", ["\n", "("]) == "x"  # the earliest stop string wins
    assert truncate_at_stop("abc", []) == "abc"


# The local generation task's prompts: the compiled shape these tests and simple_evaluate share.
DOCS = [json.loads(line) for line in (TASKS / "stdlib_complete.jsonl").read_text().splitlines()]
PROMPTS = [d["prompt"] for d in DOCS]


def generate(model: APDLM, prompts: list[str], **gen_kwargs) -> list[str]:
    return model.generate_until(requests("generate_until", [(p, gen_kwargs) for p in prompts]))


def apd_texts(lm: APDLM, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    ids = [lm.tokenizer.encode(p) for p in prompts]
    result = apd_generate(lm.drafter, lm.verifier, ids, APDConfig(max_new_tokens=max_new_tokens), jax.random.key(0))
    return [lm.tokenizer.decode(s, skip_special_tokens=True) for s in result.sequences()]


def test_greedy_generate_until_is_apd_generate(lm):
    raw = generate(lm, PROMPTS, until=[], max_gen_toks=8)
    assert raw == apd_texts(lm, PROMPTS)
    # A stop string that occurs in a generation cuts it at its first occurrence.
    stop = next(c for c in raw[0][2:] if not c.isspace())
    cut = generate(lm, PROMPTS, until=[stop], max_gen_toks=8)
    assert cut == [text.split(stop)[0] for text in raw] and len(cut[0]) < len(raw[0])


def test_sampling_knobs_reach_apd(lm):
    greedy = generate(lm, PROMPTS, until=[], max_gen_toks=8)
    assert generate(lm, PROMPTS, until=[], max_gen_toks=8, do_sample=True, temperature=1.0, top_k=1) == greedy
    assert generate(lm, PROMPTS, until=[], max_gen_toks=8, do_sample=True, temperature=5.0) != greedy


def test_ar_decoder_keeps_the_context_end(ar_lm):
    long_prompt = "import os\nimport sys\nimport re\nimport json\nimport"
    [text] = generate(ar_lm, [long_prompt], until=[], max_gen_toks=6)
    kept = ar_lm.tokenizer.encode(long_prompt)[-(16 - 6):]  # max_length 16 minus the 6 new tokens
    result = ar_generate(ar_lm.verifier, [kept], ARConfig(max_new_tokens=6))
    assert text == ar_lm.tokenizer.decode(result.sequences()[0], skip_special_tokens=True)


@pytest.mark.parametrize(
    "model_args, error, message",
    [
        ("foo=1", TypeError, r"unknown apd_jax model_args \['foo'\]"),
        ("R=1.5", ValueError, r"R=1.5 must lie in \[0, 1\]"),
        ("W=0", ValueError, "W=0 must be >= 1"),
        ("decoder=dream", ValueError, "decoder='dream' must be one of"),
        ("drafter=/no/such/dir", FileNotFoundError, "/no/such/dir not found"),
        ("max_length=4096", ValueError, r"max_length=4096 must lie in \[1, 512\]"),
    ],
)
def test_bad_model_args(model_args, error, message):
    with pytest.raises(error, match=message):
        APDLM.create_from_arg_string(model_args)


def test_bad_batch_size_and_gen_kwargs(lm):
    with pytest.raises(ValueError, match="no 'auto'"):
        APDLM.create_from_arg_string("", {"batch_size": "auto"})
    with pytest.raises(ValueError, match=r"\['repetition_penalty'\] are not supported"):
        generate(lm, PROMPTS, until=[], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="max_gen_toks=512 leaves no room"):
        generate(lm, PROMPTS, until=[], max_gen_toks=512)


def test_simple_evaluate_on_local_tasks(lm, reference, monkeypatch, capsys):
    """lm_eval's own evaluation of the three local tasks; every logged response checked independently."""
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    out = simple_evaluate(
        model=lm, tasks=["stdlib_complete", "stdlib_choice", "stdlib_text"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), log_samples=True,
    )
    assert "tokens/s" in capsys.readouterr().out
    results, samples = out["results"], out["samples"]

    texts = [truncate_at_stop(text, ["\n"]) for text in apd_texts(lm, PROMPTS)]
    by_prompt = {s["doc"]["prompt"]: s["resps"][0][0] for s in samples["stdlib_complete"]}
    assert [by_prompt[p] for p in PROMPTS] == texts
    hits = [t == d["completion"] for t, d in zip(texts, DOCS)]
    assert results["stdlib_complete"]["exact_match,none"] == pytest.approx(np.mean(hits))

    correct = []
    for s in samples["stdlib_choice"]:
        doc = s["doc"]
        scores = [reference_score(reference, lm.tokenizer, doc["context"], c)[0] for c in doc["choices"]]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(scores, abs=1e-4)
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert results["stdlib_choice"]["acc,none"] == pytest.approx(np.mean(correct))

    for s in samples["stdlib_text"]:
        text = s["doc"]["text"]
        assert s["resps"][0][0] == pytest.approx(reference_score(reference, lm.tokenizer, "", text)[0], abs=1e-4)
    assert results["stdlib_text"]["word_perplexity,none"] > 1.0


def test_command_line_runs_offline(tmp_path):
    """The documented command, in a fresh process with a fresh datasets cache and the Hub offline."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "apd_jax.evaluation.harness", "--model", "apd_jax", "--model_args", "dtype=float32",
           "--include_path", "tests/data/lm_eval", "--tasks", "stdlib_choice", "--limit", "3",
           "--batch_size", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    assert any(line.startswith("|stdlib_choice|") and "|acc " in line for line in table), proc.stdout


def test_chat_template_through_lm_eval(tmp_path, monkeypatch):
    """--apply_chat_template (and --fewshot_as_multiturn): each request is the tokenizer's template rendering."""
    from test_chat import with_chat_template

    drafter = with_chat_template(ASSETS_DIR / "drafter", tmp_path / "drafter")
    verifier = with_chat_template(ASSETS_DIR / "verifier", tmp_path / "verifier")
    chat_lm = APDLM(drafter=str(drafter), verifier=str(verifier), dtype="float32", batch_size=BATCH)
    assert chat_lm.tokenizer_name.endswith("verifier")
    monkeypatch.chdir(REPO)
    out = simple_evaluate(
        model=chat_lm, tasks=["stdlib_complete"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True, apply_chat_template=True, fewshot_as_multiturn=True, limit=2,
    )
    for sample in out["samples"]["stdlib_complete"]:
        prompt = sample["arguments"][0][0]
        expected = chat_lm.apply_chat_template([{"role": "user", "content": sample["doc"]["prompt"]}])
        assert prompt == expected and prompt.startswith("<|im_start|>user\n") and prompt.endswith("assistant\n")
