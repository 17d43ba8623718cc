"""The Hub: publish a round folder as one tagged commit, pull any round (or commit) back.

A model repo holds one round on `main` at a time, and every published round stays reachable as
the tag `round-N` on the commit that published it. A round is published as a single commit that
also deletes what the previous round had and this one lacks, so `main`, the tag and the folder on
disk hold the same files. Only `.safetensors`, JSON and the loss plot travel: pickles are refused
before anything is sent, tensors are checked against config.json (`mmft.round_check`), and config.json is published
without build-machine paths. A re-run of an interrupted push completes, or says it is already
there. The card is `mmft.card`'s. The token is whatever huggingface_hub finds (HF_TOKEN, `hf auth
login`); it is never passed around here, so it cannot end up in a message. Pulling goes through the huggingface_hub
cache, so a round pulled once loads offline too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    RepoFile,
    constants,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from mmft.card import CARD_TEMPLATE, REPO_ID_RE, TAG_PREFIX, check_repo_id, render_card, renumbered, round_tag
from mmft.config import CONFIG_NAME
from mmft.round import COMMIT_RE, LOSS_PLOT, METRICS_NAME, ROUND_FILES, path_matches, without_local_paths
from mmft.round_check import check_round

# An allow-list of exact names: a checkpoint's other files (optimizer state, trainer state with its paths, RNG
# pickles, PEFT's stub README) stay home, in the adapter folder too.
ROUND_PATTERNS = [*ROUND_FILES, METRICS_NAME, LOSS_PLOT]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
TAG_RE = re.compile(r"round-(\d+)")


class RoundNotFound(RuntimeError):
    """A round could not be pulled: unknown repo or revision, or offline with nothing cached."""


class RoundExists(RuntimeError):
    """The round's tag is already on the Hub with other files (publish with force=True to move it)."""


def find_pickles(folder: str | Path) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


# -- publishing ----------------------------------------------------------------------------------
def published_config(folder: Path, number: int | None = None) -> tuple[bytes, list[str]]:
    """config.json as published (round info sanitized, its number the one published under; the model
    config as it is) and warnings to show."""
    data = json.loads((folder / CONFIG_NAME).read_text())
    if "round" in data:
        data["round"] = without_local_paths(data["round"])  # its shape: checked by check_round before
        if number is not None:  # --round N: tag, card and config.json agree
            data["round"] = renumbered(data["round"], number)
    warnings = []
    for key in ("lm_model_id", "vit_model_id"):
        value = str(data["mmft"].get(key, ""))
        if not REPO_ID_RE.fullmatch(value):  # absolute, "../base/lm", "a/b/c": a folder on some machine
            warnings.append(f"{key} is the local path {value!r}: this round loads only where that path exists "
                            "(a relative one is read from the round's own folder, which for a round pulled from "
                            "the Hub is the Hub cache: it never loads from there). Train on a Hub model id to "
                            "publish a round anyone can load.")
        elif Path(value).exists():  # the published bytes never depend on this; the warning may
            warnings.append(f"{key} {value!r} is a folder here but a Hub repo id anywhere else: the round loads "
                            f"that folder here and the Hub repo {value} elsewhere.")
        elif not COMMIT_RE.fullmatch(str(data["mmft"].get(pin := key.replace("model_id", "revision")) or "")):
            warnings.append(f"{key} {value} is not pinned to a commit ({pin}={data['mmft'].get(pin)!r}): the round "
                            "loads whatever that revision holds when it is loaded, not the weights it was trained "
                            f"on. Rounds trained by mmft record the commit; set {pin} to it.")
    return (json.dumps(data, indent=2) + "\n").encode(), warnings


@dataclass
class RoundUpload:
    """What one push sends: the round's files and its card, checked before any request."""

    repo_id: str
    round: int
    files: dict[str, Path | bytes]  # path in the repo -> local file (or content: the sanitized config.json)
    card: ModelCard
    warnings: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return round_tag(self.round)

    def contents(self) -> dict[str, Path | bytes]:
        """Everything the commit adds, README.md included."""
        return {**self.files, "README.md": str(self.card).encode()}

    def listing(self) -> list[tuple[str, int]]:
        """(path in repo, bytes) for every file the commit adds, README.md included."""
        return sorted((path, len(item) if isinstance(item, bytes) else item.stat().st_size)
                      for path, item in self.contents().items())


@dataclass
class Published:
    repo_id: str
    tag: str
    commit_id: str
    url: str
    already: bool = False  # the tag already held exactly these files: nothing was sent


def plan_upload(folder: str | Path, repo_id: str, number: int | None = None,
                template: str | Path = CARD_TEMPLATE) -> RoundUpload:
    """Check the folder and build the card; raises (and sends nothing) on any problem."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if folder.is_dir():
        pickles = find_pickles(folder)
        if pickles:
            raise ValueError(f"{folder} holds pickle files ({', '.join(pickles)}): pickles can run code when "
                             "loaded, so they are never published. Save weights as .safetensors and remove them.")
    cfg, round_info = check_round(folder)
    given = number is not None
    number = round_info.get("round") if number is None else number
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"--round must be a positive integer, got {number!r}" if given else
                         f"{folder / CONFIG_NAME} has no positive integer 'round.round' (found {number!r}): "
                         "pass --round N")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if any(path_matches(k, pat) for pat in ROUND_PATTERNS)}
    files[CONFIG_NAME], warnings = published_config(folder, number)
    card = render_card(cfg, without_local_paths(round_info), repo_id, number, LOSS_PLOT in files, template)
    return RoundUpload(repo_id, number, files, card, warnings)


def _digest(item: Path | bytes, algorithm: str) -> str:
    """sha256 (LFS files) or the git blob sha1 (regular files) of a file or bytes, as the Hub reports them."""
    size = len(item) if isinstance(item, bytes) else item.stat().st_size
    h = hashlib.new(algorithm)
    if algorithm == "sha1":
        h.update(b"blob %d\0" % size)
    if isinstance(item, bytes):
        h.update(item)
    else:
        with open(item, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def holds_exactly(api: HfApi, upload: RoundUpload, revision: str) -> bool:
    """Whether `revision` holds exactly the upload's files (plus .gitattributes): paths, sizes, hashes."""
    remote = {f.path: f for f in api.list_repo_tree(upload.repo_id, revision=revision, recursive=True)
              if isinstance(f, RepoFile) and f.path != ".gitattributes"}
    local = upload.contents()
    if set(remote) != set(local):
        return False
    for path, item in local.items():
        size = len(item) if isinstance(item, bytes) else item.stat().st_size
        theirs = remote[path]
        if theirs.size != size:
            return False
        if theirs.lfs is not None:
            if theirs.lfs.sha256 != _digest(item, "sha256"):
                return False
        elif theirs.blob_id != _digest(item, "sha1"):
            return False
    return True


def publish(upload: RoundUpload, force: bool = False, private: bool = False) -> Published:
    """Create the repo if needed, make `main` exactly this round in one commit, tag it `round-N`.

    Re-running a push always finishes: a tag that already holds exactly these files is reported as
    `already` (nothing sent); a `main` that already holds them (a push interrupted between its commit
    and its tag) is tagged without a second commit. A tag holding *other* files is refused unless `force`."""
    api = HfApi()  # token: HF_TOKEN or the one `hf auth login` stored
    api.create_repo(upload.repo_id, exist_ok=True, private=private)
    refs = api.list_repo_refs(upload.repo_id)
    tags = {t.name: t.target_commit for t in refs.tags}
    url = f"{api.endpoint}/{upload.repo_id}/tree/{upload.tag}"
    if upload.tag in tags:
        if holds_exactly(api, upload, tags[upload.tag]):
            return Published(upload.repo_id, upload.tag, tags[upload.tag], url, already=True)
        if not force:
            raise RoundExists(f"{upload.repo_id} already has {upload.tag} (commit {tags[upload.tag]}) with other "
                              "files; nothing was changed. Publish under another --round, or pass --force to "
                              "republish and move the tag.")
    head = {b.name: b.target_commit for b in refs.branches}["main"]
    if holds_exactly(api, upload, head):  # committed before, the tag never made it
        commit_id = head
    else:
        keep = set(upload.files) | {"README.md", ".gitattributes"}
        stale = [p for p in api.list_repo_files(upload.repo_id, revision=head) if p not in keep]
        operations = [CommitOperationAdd(path, item if isinstance(item, bytes) else str(item))
                      for path, item in upload.contents().items()]
        operations += [CommitOperationDelete(p) for p in stale]
        info = api.create_commit(upload.repo_id, operations, commit_message=f"Round {upload.round}",
                                 commit_description=f"Publish {upload.tag}; main now holds exactly this round.",
                                 parent_commit=head)  # fails, changing nothing, if main moved meanwhile
        commit_id = info.oid
    if upload.tag in tags:
        api.delete_tag(upload.repo_id, tag=upload.tag)
    api.create_tag(upload.repo_id, tag=upload.tag, revision=commit_id, tag_message=f"Round {upload.round}")
    return Published(upload.repo_id, upload.tag, commit_id, url)


def error_line(err: BaseException) -> str:
    """An error as one console line. The Hub client's errors span several (URL, docs link, server text);
    a 401 gets what to do about it. The token is never in them: it is only ever sent as a header."""
    text = " ".join(str(err).split())
    if getattr(getattr(err, "response", None), "status_code", None) == 401:
        text += " (no valid token: set HF_TOKEN or run `hf auth login`)"
    if isinstance(err, (httpx2.TransportError, ConnectionRefusedError, ConnectionResetError, TimeoutError)) \
            and not isinstance(err, OfflineModeIsEnabled):  # "[Errno 111] Connection refused": of what?
        text = f"cannot reach the Hub at {constants.ENDPOINT}: {text}"
    if isinstance(err, UnicodeEncodeError):  # an HTTP header must be ASCII: a token pasted with a stray character
        text = _token_not_ascii() or text
    return text


def _token_not_ascii() -> str | None:
    from huggingface_hub import get_token

    bad = next((ch for ch in get_token() or "" if not ch.isascii()), None)
    return None if bad is None else ("the Hub token (HF_TOKEN or the one `hf auth login` stored) holds a character "
                                     f"that is not ASCII (U+{ord(bad):04X}): copy it again")


def token_refused(err: BaseException) -> str | None:
    """What is wrong with the token, when that is why a Hub call failed (None otherwise). The Hub answers
    an invalid or expired token with 401 on every request, public repos included."""
    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:  # snapshot_download wraps all
        return token_refused(err.__cause__)  # but a 401 (a 403 too) in "not in the cache"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401 and not isinstance(err, RepositoryNotFoundError):
        return ("the Hub refused the token (HTTP 401: invalid or expired): set a valid HF_TOKEN (on a Space, "
                "as a secret) or run `hf auth login`; a public repo needs no token")
    if status == 403 and not isinstance(err, RepositoryNotFoundError):
        return "the token may not read it (HTTP 403): give it read access to the repo, or set another HF_TOKEN"
    return _token_not_ascii() if isinstance(err, UnicodeEncodeError) else None


# -- pulling -------------------------------------------------------------------------------------
def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} at revision {revision or 'main'!r}"


def pull_round(source: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local round folder as is, or a Hub revision (tag, branch, commit id) via the local cache."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{source} is a local folder; a revision ({revision!r}) only applies to Hub repos")
        check_round(path)
        return path
    repo_id = str(source)
    if not REPO_ID_RE.fullmatch(repo_id):
        raise RoundNotFound(f"{source!r} is neither a round folder on disk nor a Hub repo id (OWNER/NAME)")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=ROUND_PATTERNS))
    except RevisionNotFoundError as err:
        raise RoundNotFound(f"{repo_id} has no revision {revision!r}: published rounds are tagged "
                            f"round-N (see mmft.hub.list_rounds), or pass a commit id") from err
    except RepositoryNotFoundError as err:
        raise RoundNotFound(f"Hub repo {repo_id} not found (or it is private and no token is set: "
                            "set HF_TOKEN or run `hf auth login`)") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, HfHubHTTPError,
            UnicodeEncodeError) as err:
        refused = token_refused(err)
        if refused:
            raise RoundNotFound(f"cannot pull {_where(repo_id, revision)}: {refused}") from err
        if isinstance(err, UnicodeEncodeError):
            raise
        state = "offline (HF_HUB_OFFLINE=1)" if constants.is_offline_mode() else "the Hub could not be reached"
        raise RoundNotFound(f"cannot pull {_where(repo_id, revision)}: {state} and it is not in the local "
                            f"cache ({cache_dir or constants.HF_HUB_CACHE}). Pull it once online (it is cached "
                            "then), or pass a local round folder.") from err
    try:
        check_round(folder)
    except (FileNotFoundError, ValueError) as err:
        raise RoundNotFound(f"{_where(repo_id, revision)} does not hold a complete round: {err}") from err
    return folder


def list_rounds(repo_id: str, cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(tag, commit id) of every `round-N` tag, oldest first; offline, the rounds pulled before."""
    try:
        refs = {t.name: t.target_commit for t in HfApi().list_repo_refs(repo_id).tags}
    except RepositoryNotFoundError as err:
        raise RoundNotFound(f"Hub repo {repo_id} not found (or private and no token is set)") from err
    except (HfHubHTTPError, UnicodeEncodeError) as err:
        refused = token_refused(err)
        if refused is None:
            raise
        raise RoundNotFound(f"cannot list the rounds of {repo_id}: {refused}") from err
    except (OfflineModeIsEnabled, httpx2.TransportError):
        cached = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        refs = {p.name: p.read_text().strip() for p in (cached / "refs").glob(f"{TAG_PREFIX}*") if p.is_file()}
    rounds = [(name, sha) for name, sha in refs.items() if TAG_RE.fullmatch(name)]
    return sorted(rounds, key=lambda item: int(item[0][len(TAG_PREFIX):]))
