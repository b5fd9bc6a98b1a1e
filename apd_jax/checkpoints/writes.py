"""Safe output directories: each written to a temporary sibling and renamed into place, so a failed
or interrupted write leaves nothing behind (atomic_dir); each holds a manifest of what apd_jax wrote
there (WRITTEN_MANIFEST), and overwrite replaces only such a directory that holds nothing else
(check_output); temporary directories a killed run left are removed by the next."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from apd_jax.utils.runtime import package_version

PARTIAL_MARKER = ".apd_jax_partial"  # in a temporary output directory while it is being written
# In every directory apd_jax writes (atomic_dir): what it wrote there, so that overwrite replaces a
# directory only when it holds nothing else (a user's README.md, .git/ or runs/ are never deleted).
WRITTEN_MANIFEST = ".apd_jax_written.json"
_OURS = {PARTIAL_MARKER, WRITTEN_MANIFEST}


def _entries(root: Path) -> set[str]:
    """Every file, directory and link under `root`, relative to it (links are not followed)."""
    found = set()
    for parent, dirs, files in os.walk(root):
        rel = Path(parent).relative_to(root)
        found.update(str(rel / name) for name in dirs + files)
    return found


def _write_manifest(directory: Path) -> None:
    files = sorted(_entries(directory) - _OURS)
    manifest = {"writer": "apd_jax", "version": package_version() or "unknown", "files": files}
    (directory / WRITTEN_MANIFEST).write_text(json.dumps(manifest, indent=1))


def _listed(directory: Path) -> set[str] | None:
    """The entries apd_jax's manifest in `directory` says it wrote; None without a readable manifest."""
    try:
        manifest = json.loads((directory / WRITTEN_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("writer") == "apd_jax" else None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def _outermost(entries: set[str], limit: int = 4) -> str:
    """Up to `limit` of `entries`, each folder named once (not its contents), for a message."""
    top = sorted(e for e in entries if str(Path(e).parent) not in entries)
    more = f" and {len(top) - limit} more" if len(top) > limit else ""
    return ", ".join(top[:limit]) + more


def _check_replaceable(out: Path) -> None:
    """Raise unless overwrite may replace `out`: an empty directory, or one whose manifest lists
    everything it holds (apd_jax wrote it and no one added to it)."""
    refuse = ("--overwrite (overwrite=True) replaces only a directory apd_jax wrote: remove it yourself or choose "
              "another output directory")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; {refuse}")
    entries = _entries(out) - {PARTIAL_MARKER}
    if not entries:
        return
    listed = _listed(out)
    if listed is None:
        raise FileExistsError(
            f"{out} was not written by apd_jax (it has no {WRITTEN_MANIFEST}, as directories written by other "
            f"tools or by earlier versions of apd_jax do not); {refuse}"
        )
    foreign = entries - listed - _OURS
    if foreign:
        raise FileExistsError(f"{out} holds files apd_jax did not write ({_outermost(foreign)}); {refuse}")


def _check_writable(out: Path) -> None:
    """Raise unless `out` can be made: the nearest existing folder above it is a directory this user may write."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            f"cannot write {out}: {parent} is a file, not a directory; choose another output directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {out}: {parent} is not writable (permissions, or a read-only or immutable file system); "
            "choose a writable output directory"
        )


def check_output(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> None:
    """Refuse an output directory before any work: one that is, is inside or holds a source, one that
    exists (unless overwrite, and then only one apd_jax wrote), or one that cannot be written."""
    target = out.resolve()
    for src in sources:
        src_real = Path(src).expanduser().resolve()
        if target == src_real:
            raise ValueError(f"output directory {out} is the source {src}; choose another output directory")
        if src_real in target.parents:
            raise ValueError(f"output directory {out} is inside the source {src}; choose a directory outside it")
        if target in src_real.parents:
            raise ValueError(
                f"output directory {out} contains the source {src}: replacing it would delete the source; "
                "choose another output directory"
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{out} already exists; choose another output directory, or pass --overwrite (overwrite=True from "
                "Python) to replace a directory apd_jax wrote"
            )
        _check_replaceable(out)
    _check_writable(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove `.NAME.*` temporary directories of `out` that an interrupted run of this machine left:
    only those holding apd_jax's marker whose writing process has gone."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*"):
        marker = tmp / PARTIAL_MARKER
        if tmp.is_symlink() or not marker.is_file():
            continue
        try:
            owner = json.loads(marker.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not _pid_alive(pid):
            _remove_tmp(tmp)


def _marked_tmp(out: Path) -> Path:
    """A new hidden sibling `.NAME.XXXXXXXX` of `out`, marked as this process's at once; made with
    the user's umask (as any folder they make), since it becomes the output."""
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def _remove_tmp(tmp: Path) -> None:
    """Remove a marked temporary directory, its marker last: one that cannot be removed whole stays
    marked, so a later run removes it."""
    for child in tmp.iterdir():
        if child.name == PARTIAL_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if all(child.name == PARTIAL_MARKER for child in tmp.iterdir()):
        (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
        tmp.rmdir()


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """A temporary sibling directory that replaces `out` only if the `with` body succeeds, with
    apd_jax's manifest of what it holds (WRITTEN_MANIFEST). An error or Ctrl-C leaves `out` as it
    was and removes the temporary directory: the body must have stopped writing into it (see
    orbax._save_params). `out` is checked by check_output; leftovers of killed runs (marked temporary
    directories) are removed."""
    out = Path(out).expanduser()
    check_output(out, overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp, old = _marked_tmp(out), None
    try:
        yield tmp
        _write_manifest(tmp)
        if out.exists():
            old = _marked_tmp(out)  # the replaced directory waits here, marked, until the new one is in place
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            (old / out.name).rename(out)  # the replaced directory back in its place
        for path in (tmp, old):
            if path is not None and path.exists():
                _remove_tmp(path)
        raise
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    if old is not None:
        _remove_tmp(old)


# Copied alongside the weights so a converted directory is self-contained.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json",
)


def _copy_configs(src: Path, dst: Path) -> None:
    """The SIDE_FILES and the model's own Python code (LLaDA's and Dream's modeling and configuration
    modules, which config.json's auto_map names for transformers' trust_remote_code) of `src`."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for code in sorted(src.glob("*.py")):
        if code.is_file():
            shutil.copy2(code, dst / code.name)
