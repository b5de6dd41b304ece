"""Hugging Face Hub ids as sources, resolved from the local cache only.

A source such as ``owner/name`` or ``owner/name@revision`` that is not a local path names a
snapshot in the Hugging Face cache. Nothing is ever downloaded (the project's rule): lookups
go through ``snapshot_download(local_files_only=True)``, which reads ``refs/`` and
``snapshots/`` and never opens a connection, whatever ``HF_HUB_OFFLINE`` says. A missing repo,
revision or file is one line naming the id, with the command that would fetch it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ShareError
from .confined import read_regular
from .formats import PEFT_CONFIG, PEFT_WEIGHTS, PICKLE_SUFFIXES

# Hub rules: owner and name of letters, digits, "-", "_", "." (no "--" or "..", not starting or
# ending with "-" or "."); a revision is a branch, tag (possibly with "/") or commit hash.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._-][A-Za-z0-9._/-]*))?$")


@dataclass(frozen=True)
class HubSnapshot:
    """One cached snapshot: the id as asked, the commit it resolved to, and its directory."""

    repo_id: str
    revision: str | None
    commit: str
    path: Path

    @property
    def name(self) -> str:
        """``owner--name``: unique across owners (as in the cache's ``models--owner--name``)."""
        return self.repo_id.replace("/", "--")

    @property
    def source(self) -> str:
        """``owner/name@<commit>``: records exactly what was read, and is itself a valid source."""
        return f"{self.repo_id}@{self.commit}"

    def __str__(self) -> str:
        return self.source


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when ``source`` reads as ``owner/name[@revision]``, else None."""
    match = _HUB_ID.match(source)
    if match is None:
        return None
    repo_id, revision = match["repo"], match["revision"]
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return None
    if Path(repo_id).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}:
        return None  # a missing weights file, not a repo
    if revision is not None and (".." in revision or revision.endswith("/") or "//" in revision):
        return None
    return repo_id, revision


def hub_cache_dir() -> Path:
    """The cache huggingface_hub would use, read from the environment now (not at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def resolve_hub_source(source: str) -> HubSnapshot | None:
    """The cached snapshot ``source`` names, None when it is not a Hub id; InputError when not cached."""
    parsed = parse_hub_id(source)
    if parsed is None:
        return None
    repo_id, revision = parsed
    cache = hub_cache_dir()
    _check_ref(source, cache, repo_id, revision)
    path = _cached_snapshot(source, repo_id, revision, cache)
    snapshot = HubSnapshot(repo_id, revision, path.name, path)
    _confine(source, snapshot, _repo_dir(cache, repo_id))
    _check_adapter_files(source, snapshot)
    return snapshot


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _check_ref(source: str, cache: Path, repo_id: str, revision: str | None) -> None:
    """A ref file huggingface_hub will read must be a small regular file holding a commit hash:
    a planted FIFO would hang the lookup, and ``../..`` would lead out of the cache."""
    ref = _repo_dir(cache, repo_id) / "refs" / (revision or "main")
    if not os.path.lexists(ref) or (revision and _COMMIT.fullmatch(revision)):
        return
    try:
        text = read_regular(ref, 256).decode("ascii", "replace").strip()
    except ShareError as exc:
        raise InputError(source, f"the cache's ref {ref} cannot be used: {getattr(exc, 'problem', exc)}") from None
    if os.path.islink(ref) or not _COMMIT.fullmatch(text):
        raise InputError(source, f"the cache's ref {ref} does not hold a commit hash: refused")


def _confine(source: str, snapshot: HubSnapshot, repo_dir: Path) -> None:
    """The snapshot and the files it links to must lie inside the repo's own cache folder."""
    inside = repo_dir.resolve()
    if repo_dir.is_symlink() or inside.parent != repo_dir.parent.resolve():
        raise InputError(source, f"the cache folder {repo_dir} is a link out of the cache: refused")
    if not _COMMIT.fullmatch(snapshot.commit) or snapshot.path.resolve().parent != inside / "snapshots":
        raise InputError(source, f"the cached snapshot {snapshot.path} is not a commit folder of {repo_dir}: refused")
    for file in (PEFT_CONFIG, PEFT_WEIGHTS):
        target = (snapshot.path / file).resolve()
        if os.path.lexists(snapshot.path / file) and inside not in target.parents:
            raise InputError(source, f"{file} in the cached snapshot points outside the cache ({target}): refused")


def _cached_snapshot(source: str, repo_id: str, revision: str | None, cache: Path) -> Path:
    """The snapshot directory, looked up by huggingface_hub without any network access."""
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    revision = _full_hash(cache, repo_id, revision)
    try:
        found = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True
        )
    except LocalEntryNotFoundError as exc:
        incomplete = type(exc).__name__ == "IncompleteSnapshotError"  # recent huggingface_hub checks completeness
        raise _not_cached(source, repo_id, revision, cache, incomplete) from None
    return Path(found)


def _full_hash(cache: Path, repo_id: str, revision: str | None) -> str | None:
    """A short commit hash (7+ hex digits) of exactly one cached snapshot becomes the full hash."""
    if revision is None or not re.fullmatch(r"[0-9a-f]{7,39}", revision):
        return revision
    snapshots = _repo_dir(cache, repo_id) / "snapshots"
    if (snapshots.parent / "refs" / revision).is_file() or not snapshots.is_dir():
        return revision  # a branch or tag spelled like hex wins, as in git
    matches = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
    return matches[0] if len(matches) == 1 else revision


def _repo_dir(cache: Path, repo_id: str) -> Path:
    """Where huggingface_hub keeps a model repo: ``models--owner--name``."""
    return cache / f"models--{repo_id.replace('/', '--')}"


def _not_cached(source: str, repo_id: str, revision: str | None, cache: Path, incomplete: bool) -> InputError:
    """Say which of repo, revision or files is missing, and how to fetch it."""
    fetch = f"`{_download_command()} {repo_id}{f' --revision {revision}' if revision else ''}`"
    repo_dir = _repo_dir(cache, repo_id)
    if incomplete:
        return InputError(
            source, f"the cached snapshot is incomplete (an interrupted download?); complete it with {fetch}"
        )
    if not repo_dir.is_dir():
        return InputError(
            source,
            f"no such file or directory, and not in the local Hugging Face cache (HF_HUB_CACHE={cache}); "
            f"to use the Hub repo, download it first with {fetch}",
        )
    known = ", ".join(_cached_revisions(repo_dir)) or "none"
    return InputError(
        source,
        f"revision {revision or 'main'!r} is not in the local Hugging Face cache (cached: {known}); "
        f"download it with {fetch}",
    )


def _cached_revisions(repo_dir: Path) -> list[str]:
    """Refs whose snapshot is cached, then short hashes of snapshots no ref names."""
    refs, snapshots = repo_dir / "refs", repo_dir / "snapshots"
    cached = {p.name for p in snapshots.iterdir() if p.is_dir()} if snapshots.is_dir() else set()
    targets = {}
    for p in refs.rglob("*") if refs.is_dir() else []:
        if p.is_file() and not p.is_symlink():
            try:
                targets[str(p.relative_to(refs))] = read_regular(p, 256).decode("ascii", "replace").strip()
            except ShareError:
                continue
    names = sorted(ref for ref, commit in targets.items() if commit in cached)
    return names + sorted(c[:12] for c in cached if c not in targets.values())


def _check_adapter_files(source: str, snapshot: HubSnapshot) -> None:
    """A PEFT adapter at the snapshot's root, its symlinks into ``blobs/`` intact."""
    where = f"the cached snapshot {snapshot.commit[:12]}"
    for file in (PEFT_CONFIG, PEFT_WEIGHTS):
        path = snapshot.path / file
        if path.is_symlink() and not path.exists():
            raise InputError(
                source,
                f"{file} in {where} points to a missing blob ({os.readlink(path)}); "
                f"download it again with `{_download_command()} {snapshot.repo_id}`",
            )
        if path.is_file():
            continue
        pickles = sorted(p.name for p in snapshot.path.glob("adapter_model*") if p.suffix in PICKLE_SUFFIXES)
        if pickles and file == PEFT_WEIGHTS:
            raise InputError(
                source, f"{where} has only {pickles[0]}: pickle checkpoints are refused (never unpickled)"
            )
        raise InputError(source, f"{where} has no {file}: not a PEFT LoRA adapter, or a partial download")


def _download_command() -> str:
    """``hf download`` on huggingface_hub >= 0.34, ``huggingface-cli download`` before."""
    import huggingface_hub

    major, minor = (int(x) if x.isdigit() else 0 for x in huggingface_hub.__version__.split(".")[:2])
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
