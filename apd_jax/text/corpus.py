"""The training corpus every machine has offline: the Python standard library's source, and
optionally the installed source of other packages (`apd-jax train --packages`).

Stdlib `.py` files (site-packages excluded) in sorted order of their relative path, so the corpus
is the same on every run; a file is held out when its path's hash falls below
`heldout_fraction`, so the split depends on the path alone. Package files are found without
importing them and never held out (held-out figures stay the stdlib's); one sharing at least
half its long lines with held-out files (a vendored copy) is dropped.

Cleaning is light: non-UTF-8 files, generated tables, the pydoc topic dump and mostly non-ASCII
files are dropped; line endings, trailing whitespace and blank-line runs are normalised.
Documents are tokenized, each followed by eos, into one stream cut into fixed-length windows.
Prompts for the APD check, `compare` and `train-filter` are a `def` line and the lines before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apd_jax.text.tokenizer import SPECIAL_TOKENS
from apd_jax.utils.shapes import pow2_bucket

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 400_000  # drops pydoc_data/topics.py (a 750 KB string literal)
MAX_NON_ASCII = 0.05  # share of non-ASCII characters
MAX_TABLE_SHARE = 0.30  # share of characters on literal-table lines ('\x00', 0x.., 12:)
DEFAULT_HELDOUT_FRACTION = 0.03

# apd_jax's requirements with Python source (scipy comes with jax): installed wherever apd_jax is.
DEPENDENCY_PACKAGES = ("flax", "huggingface_hub", "jax", "ml_dtypes", "numpy", "optax", "orbax", "rich",
                       "safetensors", "scipy", "transformers")
OVERLAP_LINE_CHARS = 30  # lines this long (stripped) are specific enough to mark a copy
MAX_HELDOUT_OVERLAP = 0.5  # share of a package file's long lines found in held-out files

_TABLE_LINE = re.compile(r"""^\s*(u?['"]\\[xuU][0-9a-fA-F]|0x[0-9a-fA-F]+\s*[:,]|\d+\s*[:,])""")


@dataclasses.dataclass(frozen=True)
class Document:
    path: str  # POSIX path relative to the corpus root
    text: str
    source: str = "stdlib"  # or "packages"


def stdlib_root() -> Path:
    """This interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: str | Path) -> list[Path]:
    """Every .py file under `root` outside site-packages, sorted by relative POSIX path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory")
    files = [f for f in root.rglob("*.py") if f.is_file() and not EXCLUDED_DIRS & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def package_root(name: str) -> Path:
    """The directory of the installed top-level package `name`, found without importing it."""
    try:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except ValueError:  # a module whose __spec__ is unset
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        kind = "a single module, not a package" if spec is not None else "not an installed top-level package"
        raise FileNotFoundError(f"--packages {name!r} is {kind} here: give installed package names, "
                                "like jax,numpy, or deps")
    return Path(locations[0])


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """{package: 'distribution version'} of the installed packages, for the training record."""
    dists = importlib.metadata.packages_distributions()
    return {n: " ".join(f"{d} {importlib.metadata.version(d)}" for d in dists.get(n, [])) for n in names}


def _every_nth(files: list[Path], share: float) -> list[Path]:
    """About `share` of the files, evenly spread (every n-th)."""
    if share >= 1:
        return files
    keep = max(1, round(share * len(files)))
    return [files[int(i * len(files) / keep)] for i in range(keep)]


def _read(file: Path) -> str | None:
    try:
        return clean(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _long_lines(text: str) -> set[str]:
    return {line.strip() for line in text.split("\n") if len(line.strip()) >= OVERLAP_LINE_CHARS}


def copies_heldout(text: str, heldout_lines: set[str]) -> bool:
    """Whether at least MAX_HELDOUT_OVERLAP of the text's long lines occur in held-out files."""
    lines = _long_lines(text)
    return bool(lines) and len(lines & heldout_lines) >= MAX_HELDOUT_OVERLAP * len(lines)


def is_heldout(relpath: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Held-out split by file: the first 8 bytes of sha256(relative path) below `fraction` of 2**64."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def clean(text: str) -> str | None:
    """Lightly cleaned source, or None for a file that is data rather than code."""
    # A file spelling out a special token would smuggle it into the stream.
    if len(text) > MAX_FILE_BYTES or any(t in text for t in SPECIAL_TOKENS):
        return None
    if sum(ord(c) > 127 for c in text) > MAX_NON_ASCII * max(len(text), 1):
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "")
    lines = [line.rstrip() for line in text.split("\n")]
    table = sum(len(line) for line in lines if _TABLE_LINE.match(line))
    if table > MAX_TABLE_SHARE * max(len(text), 1):
        return None
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else None


def load_corpus(
    root: str | Path | None = None,
    *,
    packages: Sequence[str] = (),
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    max_files: int | None = None,
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents: the stdlib under `root` (default: this Python's), then the
    named installed packages' sources as training documents.

    `max_files` keeps every n-th stdlib file so that about that many remain, and the same
    share of each package's files (quick runs, tests).
    """
    root = stdlib_root() if root is None else Path(root)
    files = list_files(root)
    share = 1.0 if max_files is None or max_files <= 0 else min(1.0, max_files / max(len(files), 1))
    train, heldout = [], []
    for f in _every_nth(files, share):
        rel = f.relative_to(root).as_posix()
        text = _read(f)
        if text is not None:
            (heldout if is_heldout(rel, heldout_fraction) else train).append(Document(rel, text))
    if not train:
        raise ValueError(f"no usable .py files under {root}")
    heldout_lines = set().union(*(_long_lines(d.text) for d in heldout))
    for name in packages:
        pkg = package_root(name)
        for f in _every_nth(list_files(pkg), share):
            text = _read(f)
            if text is not None and not copies_heldout(text, heldout_lines):
                train.append(Document(f"packages/{name}/{f.relative_to(pkg).as_posix()}", text, "packages"))
    return train, heldout


def fingerprint(docs: Sequence[Document]) -> str:
    """sha256 over the documents' paths and texts: which corpus a model was trained on."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.path.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:16]


def token_stream(docs: Sequence[Document], tokenizer, eos_id: int) -> np.ndarray:
    """All documents tokenized, each followed by `eos_id`, as one int32 stream."""
    if not docs:
        return np.zeros((0,), np.int32)
    if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer`: parallel, fast
        encoded = [e.ids for e in tokenizer.encode_batch([d.text for d in docs])]
    else:  # a transformers tokenizer
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    parts = []
    for ids in encoded:
        parts.append(np.asarray(ids, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    return np.concatenate(parts)


def chunk(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows [N, seq_len] of the stream; the remainder is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


# ----------------------------------------------------------------------------- prompts


def heldout_prompts(docs: Sequence[Document], n: int, context_lines: int = 4) -> list[str]:
    """Up to n prompts from held-out files: a `def` line and the few lines before it, ending in a newline.

    One prompt per file in turn (deterministic), so many files are represented.
    """
    per_doc = []
    for d in docs:
        lines = d.text.split("\n")
        found = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
        per_doc.append([("\n".join(lines[max(0, i - context_lines) : i + 1]) + "\n").lstrip("\n") for i in found])
    prompts: list[str] = []
    depth = 0
    while len(prompts) < n and any(depth < len(p) for p in per_doc):
        prompts += [p[depth] for p in per_doc if depth < len(p)][: n - len(prompts)]
        depth += 1
    return prompts


def apd_eval_prompts(
    heldout_docs: Sequence[Document], tok, n: int, seq_len: int, max_new_tokens: int
) -> tuple[list[str], int]:
    """The held-out prompts of the APD check, and the generation length that fits the context.

    Prompts hold at most seq_len / 4 tokens (a def line with the lines before it, or the
    bare def line where that is too long), so prompt + generation fit the trained positions.
    """
    longest = seq_len // 4
    candidates = heldout_prompts(heldout_docs, 4 * n) + heldout_prompts(heldout_docs, 4 * n, context_lines=0)
    prompts = [q for q in candidates if len(tok.encode(q).ids) <= longest][:n]
    return prompts, min(max_new_tokens, seq_len - pow2_bucket(longest))


def stdlib_prompts(
    tok, n: int, *, heldout: bool, seq_len: int, root: str | Path | None = None, seed: int = 0
) -> list[str]:
    """n prompts of the stdlib corpus under `root`, built as `apd_eval_prompts` builds them.

    heldout=True: the first n of the APD check's own held-out prompts (what `apd-jax compare
    --heldout-prompts` decodes). heldout=False: prompts from the training files only, visited
    in a seeded random order so they span the library rather than its alphabetical start
    (what `apd-jax train-filter --train-prompts` learns from); other files, so never the same.
    """
    train_docs, heldout_docs = load_corpus(root)
    order = np.random.default_rng(seed).permutation(len(train_docs))
    docs = heldout_docs if heldout else [train_docs[i] for i in order]
    prompts, _ = apd_eval_prompts(docs, tok, n, seq_len, 0)
    if len(prompts) < n:
        side = "held-out" if heldout else "training"
        raise ValueError(f"the corpus's {side} files give only {len(prompts)} prompts of at most {seq_len // 4} tokens")
    return prompts
