"""The Hub: publish a round folder as one tagged commit, pull any round (or commit) back.

A model repo holds one round on `main` at a time, and every published round stays reachable as
the tag `round-N` on the commit that published it. A round is published as a single commit that
also deletes what the previous round had and this one lacks, so `main`, the tag and the folder on
disk hold the same files. Only `.safetensors` and JSON travel: pickles are refused before anything
is sent. The token is whatever huggingface_hub finds (HF_TOKEN, `hf auth login`); it is never
passed around here, so it cannot end up in a message. Pulling goes through the huggingface_hub
cache, so a round pulled once loads offline too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
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
from safetensors import SafetensorError, safe_open

from mmft.config import CONFIG_NAME, MMFTConfig, load_config
from mmft.round import ROUND_FILES, check_round_folder

ROUND_PATTERNS = [CONFIG_NAME, "projector.safetensors", "adapter/*", "metrics.json", "loss.png"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
TAG_PREFIX = "round-"
TAG_RE = re.compile(r"round-(\d+)")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # not "./lm", "../clip"
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"

LLAVA_DATASET = "liuhaotian/LLaVA-Instruct-150K"
KNOWN_LICENSES = {"microsoft/Phi-3.5-mini-instruct": "mit"}  # base LM id -> its license
FEATURE_MODE_TEXT = {
    "pooled": "pooled: CLIP's projected image embedding (`get_image_features`), one image token",
    "patch": "patch: CLIP's last hidden state, CLS and every patch (50 image tokens for ViT-B/32)",
}


class RoundNotFound(RuntimeError):
    """A round could not be pulled: unknown repo or revision, or offline with nothing cached."""


class RoundExists(RuntimeError):
    """The round's tag is already on the Hub (publish with force=True to move it)."""


def round_tag(number: int) -> str:
    return f"{TAG_PREFIX}{number}"


# -- checking a folder (cheap: headers and JSON only, the LM is never loaded) --------------------
def check_round(folder: str | Path) -> tuple[MMFTConfig, dict]:
    """Raise a clear error unless `folder` holds a complete, readable round; return its config."""
    folder = check_round_folder(folder)
    cfg, round_info = load_config(folder)  # ValueError naming the file if it is not an mmft config
    adapter_config = folder / "adapter/adapter_config.json"
    try:
        if "peft_type" not in json.loads(adapter_config.read_text()):
            raise ValueError("no 'peft_type' key")
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{adapter_config} is not a PEFT adapter config: {err}") from err
    for name in ROUND_FILES:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), framework="numpy") as weights:
                    if not list(weights.keys()):
                        raise ValueError("it holds no tensors")
            except (SafetensorError, ValueError, OSError) as err:
                raise ValueError(f"{folder / name} is not a readable safetensors file: {err}") from err
    return cfg, round_info


def find_pickles(folder: str | Path) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


# -- the model card ------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per round; one column per metric any round recorded."""
    metrics = sorted({name for row in rows for name in (row.get("metrics") or {})})
    header = ["Round", "Date", "Steps", "Samples", "Train loss", "Eval loss",
              *[m.replace("_", " ").capitalize() for m in metrics]]
    cells = [[round_tag(row["round"]) if isinstance(row.get("round"), int) else _fmt(row.get("round")),
              _fmt(str(row.get("created") or "")[:10]), _fmt(row.get("steps")), _fmt(row.get("samples")),
              _fmt(row.get("train_loss")), _fmt(row.get("eval_loss")),
              *[_fmt((row.get("metrics") or {}).get(m)) for m in metrics]] for row in rows]
    return header, cells


def _datasets(round_info: dict) -> tuple[list[str] | None, str]:
    """(Hub dataset ids for the metadata, a sentence for the card). `data.dataset` names a Hub data set;
    the shapes world shows as `data.synthetic`, a shapes path, or its colour/shape accuracy metrics."""
    data = round_info.get("data") or {}
    if data.get("dataset") and REPO_ID_RE.fullmatch(str(data["dataset"])):
        return [data["dataset"]], f"Trained on [{data['dataset']}](https://huggingface.co/datasets/{data['dataset']})."
    shapes_eval = {"color_accuracy", "shape_accuracy"} & set(round_info.get("metrics") or {})
    if data.get("synthetic") or "shapes" in str(data.get("train_json") or "").lower() or shapes_eval:
        return None, ("Trained on the **synthetic shapes demo data** (coloured shapes on plain backgrounds, "
                      "generated locally; not a Hub dataset). It shows that the pipeline learns, "
                      "not that the model understands real photos.")
    return [LLAVA_DATASET], (f"Trained on [LLaVA-Instruct-150K](https://huggingface.co/datasets/{LLAVA_DATASET}) "
                             "(COCO images with GPT-written conversations).")


def render_card(cfg: MMFTConfig, round_info: dict, repo_id: str, number: int, has_loss_plot: bool,
                template: str | Path = CARD_TEMPLATE) -> ModelCard:
    """The round's README.md: Hub metadata + feature mode, models, every round so far, plot, usage."""
    lm_is_hub_id = bool(REPO_ID_RE.fullmatch(cfg.lm_model_id)) and not Path(cfg.lm_model_id).exists()
    datasets, data_text = _datasets(round_info)
    data = ModelCardData(
        base_model=cfg.lm_model_id if lm_is_hub_id else None,  # the Hub only accepts repo ids here
        library_name="peft",
        pipeline_tag="image-text-to-text",
        datasets=datasets,
        tags=["llava", "qlora", "clip", "phi3", "mmft", f"feature-mode-{cfg.vit_feature_mode}"],
        license=round_info.get("license") or KNOWN_LICENSES.get(cfg.lm_model_id),
    )
    rows = list(round_info.get("history") or [])  # every round so far, this one last
    if not rows or rows[-1].get("round") != number:
        rows.append({**round_info, "round": number})
    header, cells = _table(rows)
    return ModelCard.from_template(
        data, template_path=str(template), repo_id=repo_id, revision=round_tag(number), round=number,
        lm_id=cfg.lm_model_id, lm_is_hub_id=lm_is_hub_id, vit_id=cfg.vit_model_id,
        feature_mode=FEATURE_MODE_TEXT[cfg.vit_feature_mode], data_text=data_text,
        parent=round_info.get("parent"), header=header, rows=cells, has_loss_plot=has_loss_plot,
    )


# -- publishing ----------------------------------------------------------------------------------
@dataclass
class RoundUpload:
    """What one push sends: the round's files and its card, checked before any request."""

    repo_id: str
    round: int
    files: dict[str, Path]  # path in the repo -> local file
    card: ModelCard

    @property
    def tag(self) -> str:
        return round_tag(self.round)

    def listing(self) -> list[tuple[str, int]]:
        """(path in repo, bytes) for every file the commit adds, README.md included."""
        sizes = [(path, local.stat().st_size) for path, local in self.files.items()]
        return sorted([*sizes, ("README.md", len(str(self.card).encode()))])


@dataclass
class Published:
    repo_id: str
    tag: str
    commit_id: str
    url: str


def plan_upload(folder: str | Path, repo_id: str, number: int | None = None,
                template: str | Path = CARD_TEMPLATE) -> RoundUpload:
    """Check the folder and build the card; raises (and sends nothing) on any problem."""
    folder = Path(folder)
    if not REPO_ID_RE.fullmatch(repo_id):
        raise ValueError(f"--repo-id must look like OWNER/NAME, got {repo_id!r}")
    if folder.is_dir():
        pickles = find_pickles(folder)
        if pickles:
            raise ValueError(f"{folder} holds pickle files ({', '.join(pickles)}): pickles can run code when "
                             "loaded, so they are never published. Save weights as .safetensors and remove them.")
    cfg, round_info = check_round(folder)
    number = round_info.get("round") if number is None else number
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"{folder / CONFIG_NAME} has no positive integer 'round.round' "
                         f"(found {number!r}): pass --round N")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if any(fnmatch(k, pat) for pat in ROUND_PATTERNS)}
    card = render_card(cfg, round_info, repo_id, number, "loss.png" in files, template)
    return RoundUpload(repo_id, number, files, card)


def publish(upload: RoundUpload, force: bool = False, private: bool = False) -> Published:
    """Create the repo if needed, make `main` exactly this round in one commit, tag it `round-N`."""
    api = HfApi()  # token: HF_TOKEN or the one `hf auth login` stored
    api.create_repo(upload.repo_id, exist_ok=True, private=private)
    refs = api.list_repo_refs(upload.repo_id)
    tags = {t.name: t.target_commit for t in refs.tags}
    if upload.tag in tags and not force:
        raise RoundExists(f"{upload.repo_id} already has {upload.tag} (commit {tags[upload.tag]}); nothing was "
                          "changed. Publish under another --round, or pass --force to republish and move the tag.")
    head = {b.name: b.target_commit for b in refs.branches}["main"]
    keep = set(upload.files) | {"README.md", ".gitattributes"}
    stale = [p for p in api.list_repo_files(upload.repo_id, revision=head) if p not in keep]
    operations = [CommitOperationAdd(path, str(local)) for path, local in upload.files.items()]
    operations += [CommitOperationAdd("README.md", str(upload.card).encode()),
                   *[CommitOperationDelete(p) for p in stale]]
    info = api.create_commit(upload.repo_id, operations, commit_message=f"Round {upload.round}",
                             commit_description=f"Publish {upload.tag}; main now holds exactly this round.",
                             parent_commit=head)  # fails, changing nothing, if main moved meanwhile
    if upload.tag in tags:
        api.delete_tag(upload.repo_id, tag=upload.tag)
    api.create_tag(upload.repo_id, tag=upload.tag, revision=info.oid, tag_message=f"Round {upload.round}")
    return Published(upload.repo_id, upload.tag, info.oid, f"{api.endpoint}/{upload.repo_id}/tree/{upload.tag}")


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
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, HfHubHTTPError) as err:
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
    except (OfflineModeIsEnabled, httpx2.TransportError):
        cached = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        refs = {p.name: p.read_text().strip() for p in (cached / "refs").glob(f"{TAG_PREFIX}*") if p.is_file()}
    rounds = [(name, sha) for name, sha in refs.items() if TAG_RE.fullmatch(name)]
    return sorted(rounds, key=lambda item: int(item[0][len(TAG_PREFIX):]))
