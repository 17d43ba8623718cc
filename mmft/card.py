"""The model card of a published round: Hub metadata, the models, the data it declared, every round so far.

Rendered from `model_card.md` with `huggingface_hub.ModelCard`. The training data is what the run
declared in `round.data.dataset`: only a Hub repo id becomes `datasets` metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from mmft.config import MMFTConfig
from mmft.round import COMMIT_RE

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
TAG_PREFIX = "round-"
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # not "./lm", "../clip"
LLAVA_DATASET = "liuhaotian/LLaVA-Instruct-150K"
KNOWN_LICENSES = {"microsoft/Phi-3.5-mini-instruct": "mit"}  # base LM id -> its license


def check_repo_id(repo_id: str, what: str = "--repo-id") -> None:
    """Refuse, before anything is sent, an OWNER/NAME the Hub would refuse: its client's own rules (96
    characters, no `--` or `..`, no `-`/`.` at either end, no `.git` end), so a dry run that passes is a
    push that can pass."""
    if not REPO_ID_RE.fullmatch(repo_id):
        raise ValueError(f"{what} must look like OWNER/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} is not a name the Hub accepts: {err}") from None


def feature_text(cfg: MMFTConfig) -> str:
    """The image features in words, from the feature choice the round was trained with."""
    if cfg.vit_feature_mode == "pooled":
        return "pooled: CLIP's projected image embedding (`get_image_features`), one image token"
    layer = "last hidden state" if cfg.vit_feature_layer == -1 else f"hidden state {cfg.vit_feature_layer}"
    if cfg.vit_feature_select_strategy == "full":
        return f"patch: CLIP's {layer}, CLS and every patch (50 image tokens for ViT-B/32)"
    return f"patch: CLIP's {layer}, every patch without CLS (49 image tokens for ViT-B/32)"


def round_tag(number: int) -> str:
    return f"{TAG_PREFIX}{number}"


def _fmt(value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per round: what it trained on and its losses (each round's evaluation is in its own card)."""
    header = ["Round", "Date", "Steps", "Samples", "Train loss", "Eval loss"]
    cells = [[round_tag(row["round"]) if isinstance(row.get("round"), int) else _fmt(row.get("round")),
              _fmt(str(row.get("created") or "")[:10]), _fmt(row.get("steps")), _fmt(row.get("samples")),
              _fmt(row.get("train_loss")), _fmt(row.get("eval_loss"))] for row in rows]
    return header, cells


def renumbered(round_info: dict, number: int) -> dict:
    """The round info as published under `number` (`--round N`): its number, and this run's history row
    with it, so that tag, card and config.json say the same."""
    out = {**round_info, "round": number}
    history = round_info.get("history")
    if history and history[-1].get("round") == round_info.get("round"):  # this run's row
        out["history"] = [*history[:-1], {**history[-1], "round": number}]
    return out


def _qlora(round_info: dict) -> bool:
    """The adapter was trained on a 4-bit base (a projector-only stage trains no adapter)."""
    return round_info.get("quantize") == "nf4" and round_info.get("stage") != "projector"


def _method(round_info: dict) -> str:
    """How the adapter was trained, from what the run recorded (rounds before the record: just LoRA)."""
    base = {"nf4": "a 4-bit NF4 base", "none": "an unquantized base"}.get(round_info.get("quantize"))
    if round_info.get("stage") == "projector":
        parent = round_info.get("parent") or {}
        start = f" as round {parent['round']} left it" if parent.get("round") is not None else \
            " at LoRA's zero start"
        return (f"{start}: this round trained the projector alone (LLaVA's stage 1)"
                + (f", on {base}" if base else ""))
    if _qlora(round_info):
        return " trained with QLoRA (on a 4-bit NF4 base)"
    return f" trained on {base}" if base else ""


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize().replace("|", "\\|")


def _evaluation(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """This round's metrics as a header and rows [what, held-out, (independent wordings,) in-distribution]:
    mmft records held-out figures unprefixed, the same held-out pictures asked in an independent
    writer's wordings as `independent_*` and in-distribution ones as `indist_*`
    (`mmft.demo.evaluate_round`), so each kind's figures sit side by side; `heldout_*` groups (e.g.
    wordings no model saw) have a held-out figure only."""
    beside = ["independent_"] * any(k.startswith("independent_") for k in metrics) + ["indist_"]
    header = ["what", "held-out"] + [{"independent_": "independent wordings", "indist_": "in-distribution"}[p]
                                     for p in beside]
    rows = []
    for name in sorted(metrics):
        prefix = next((p for p in beside if name.startswith(p)), None)
        if prefix and name[len(prefix):] in metrics:
            continue  # shown beside its held-out figure
        if prefix:  # a figure with no held-out twin: in its own column, dashes elsewhere
            row = [_label(name[len(prefix):]), "—"] + ["—"] * len(beside)
            row[2 + beside.index(prefix)] = _fmt(metrics[name])
            rows.append(row)
        elif name.startswith("heldout_"):
            rows.append([_label(name[len("heldout_"):]) + " (held-out subgroup)", _fmt(metrics[name])]
                        + ["—"] * len(beside))
        else:
            rows.append([_label(name), _fmt(metrics[name])] + [_fmt(metrics.get(p + name)) for p in beside])
    return header, rows


def _datasets(round_info: dict) -> tuple[list[str] | None, str]:
    """(Hub dataset ids for the metadata, a sentence for the card), from what the run declared in
    `data.dataset` (and `data.synthetic`); only a Hub repo id becomes metadata. Paths prove nothing."""
    data = round_info.get("data") or {}
    dataset = str(data.get("dataset") or "").strip()
    if REPO_ID_RE.fullmatch(dataset):
        if dataset == LLAVA_DATASET:
            return [dataset], (f"Trained on [LLaVA-Instruct-150K](https://huggingface.co/datasets/{dataset}) "
                               "(COCO images with GPT-written conversations). Its dataset card gives its licence as "
                               "CC BY 4.0, its use subject to OpenAI's terms of use, and the COCO images carry their "
                               "own.")
        return [dataset], f"Trained on [{dataset}](https://huggingface.co/datasets/{dataset})."
    if data.get("synthetic") or "mmft.shapes" in dataset:
        return None, ("Trained on the **synthetic shapes demo data** (coloured shapes on plain backgrounds, "
                      "generated locally by `mmft.shapes`; not a Hub dataset). It shows that the pipeline "
                      "learns, not that the model understands real photos.")
    if dataset:
        return None, f"Trained on {dataset.replace('|', '/')} (as the training run declared it; not a Hub dataset)."
    return None, "This round's config.json does not say what it was trained on."


def model_cell(model_id: str, revision: str | None) -> str:
    """A base model as the card names it: the id, linked on the Hub at the commit the round pins (what
    `load_round` loads), or said plainly when the revision is a branch or not recorded."""
    if not REPO_ID_RE.fullmatch(model_id):
        return f"`{model_id}` (a local path, not a Hub id: this round loads only where that path exists)"
    url = f"https://huggingface.co/{model_id}"
    if revision and COMMIT_RE.fullmatch(revision):
        return f"[`{model_id}`]({url}/tree/{revision}) at commit `{revision}`"
    if revision:
        return f"[`{model_id}`]({url}/tree/{revision}) at `{revision}` (a branch or tag, not pinned to a commit)"
    return f"[`{model_id}`]({url}) (no revision recorded: whatever `main` holds when it loads)"


def render_card(cfg: MMFTConfig, round_info: dict, repo_id: str, number: int, has_loss_plot: bool,
                template: str | Path = CARD_TEMPLATE) -> ModelCard:
    """The round's README.md: Hub metadata + feature mode, models, every round so far, plot, usage."""
    lm_is_hub_id = bool(REPO_ID_RE.fullmatch(cfg.lm_model_id))  # from the string: the card never depends on the machine
    datasets, data_text = _datasets(round_info)
    data = ModelCardData(
        base_model=cfg.lm_model_id if lm_is_hub_id else None,  # the Hub only accepts repo ids here
        library_name="peft",
        pipeline_tag="image-text-to-text",
        datasets=datasets,
        # phi3 only where the LM is one: a Hub id names it; a local folder is taken as mmft's Phi-3 family
        tags=["llava", "qlora" if _qlora(round_info) else "lora", "clip",
              *(["phi3"] if not lm_is_hub_id or re.search(r"phi-?3", cfg.lm_model_id, re.IGNORECASE) else []),
              "mmft", f"feature-mode-{cfg.vit_feature_mode}"],
        license=round_info.get("license") or KNOWN_LICENSES.get(cfg.lm_model_id),
    )
    round_info = renumbered(round_info, number)
    rows = list(round_info.get("history") or [])  # every round so far, this one last
    if not rows or rows[-1].get("round") != number:
        rows.append(round_info)
    header, cells = _table(rows)
    evaluation_header, evaluation = _evaluation(round_info.get("metrics") or {})
    return ModelCard.from_template(
        data, template_path=str(template), repo_id=repo_id, revision=round_tag(number), round=number,
        lm_id=cfg.lm_model_id, lm_is_hub_id=lm_is_hub_id, vit_id=cfg.vit_model_id,
        lm_cell=model_cell(cfg.lm_model_id, cfg.lm_revision), vit_cell=model_cell(cfg.vit_model_id, cfg.vit_revision),
        projector=" → GELU → ".join(["Linear"] * cfg.mp_depth),
        feature_mode=feature_text(cfg), data_text=data_text, method=_method(round_info),
        parent=round_info.get("parent"), header=header, rows=cells,
        evaluation=evaluation, evaluation_header=evaluation_header, has_loss_plot=has_loss_plot,
    )


