"""The Llava export's model card, and publishing the export to its own Hub repo.

An export is published to `OWNER/NAME-llava`, not as a revision of the round's repo: that repo's
`main` is then a plain transformers model, so `from_pretrained("OWNER/NAME-llava")`, the Hub's
widgets and `vllm serve OWNER/NAME-llava` work without a revision, and the round repo keeps
holding rounds only (its `main` is exactly one round). Each export is one commit tagged `round-N`,
like the round it came from.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from mmft.card import KNOWN_LICENSES
from mmft.config import MMFTConfig
from mmft.round import without_local_paths

EXPORT_SUFFIX = "-llava"

CARD = """
# {title}

An mmft round exported as a plain **`LlavaForConditionalGeneration`**: CLIP
(`{vit_id}`) -> projector (Linear -> GELU -> Linear) -> `{lm_id}` with the round's LoRA adapter
merged in. It loads with transformers alone, no mmft import.

```python
from PIL import Image, ImageOps
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{repo}"{revision_arg})
processor = AutoProcessor.from_pretrained("{repo}"{revision_arg})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the picture?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = ImageOps.exif_transpose(Image.open("picture.jpg"))  # upright, as mmft reads photos
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

or `pipeline("image-text-to-text", model="{repo}")` with the same `messages` (the picture as
`{{"type": "image", "image": ...}}`).

## What this model is, and is not

- **It is mmft's draft stage**: image + question -> a short answer. Image features: CLIP's hidden
  state at layer {layer}, {strategy_text} ({num_tokens} image tokens); the chat template puts them
  at the start of the first user turn, where mmft puts them. Checked: logits equal mmft's (fp32)
  and greedy answers are the same tokens, for questions within mmft's budget of
  {max_question_tokens} tokens: mmft cuts a longer question to that, this chat template does not.{penalty}
- **It is not** mmft's staged pipeline: mmft rewrites each draft with the *base* model (adapter
  off) into a clean sentence and tidies the text; this export has the adapter merged in, so there
  is no base model inside it. Use the round repo with mmft for that.
- llama.cpp: {llama_cpp}
{source}
"""


def export_repo_id(repo_id: str) -> str:
    return repo_id + EXPORT_SUFFIX


def render_export_card(cfg: MMFTConfig, round_info: dict, repo: str, num_tokens: int,
                       revision: str | None = None) -> ModelCard:
    from mmft.export import feature_choice  # no cycle at import time: export imports this lazily too

    layer, strategy = feature_choice(cfg)
    strategy_text = "CLS token kept (`full`)" if strategy == "full" else "CLS token dropped (`default`)"
    llama_cpp = ("converts and runs (see the mmft README, \"Use a round without mmft\")." if strategy == "default"
                 else "llama.cpp's LLaVA image encoder always drops CLIP's CLS token, so this export "
                      "(CLS kept) is not the same model there; rounds trained with the `default` strategy are.")
    number = round_info.get("round")
    source = f"\nExported from mmft round {number}." if isinstance(number, int) else ""
    data = ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text",
                         tags=["llava", "mmft", "clip", "phi3", f"feature-strategy-{strategy}"],
                         license=round_info.get("license") or KNOWN_LICENSES.get(cfg.lm_model_id))  # as the round's card
    # a base trained from a local folder: its name, not this machine's path
    vit_id, lm_id = without_local_paths(cfg.vit_model_id), without_local_paths(cfg.lm_model_id)
    penalty = "" if cfg.gen_repetition_penalty == 1.0 else (
        f" The round's repetition penalty ({cfg.gen_repetition_penalty}) is in the generation config; transformers "
        "applies it to the prompt's tokens as well, mmft to the answer's only, so an answer that repeats a word of "
        "the question can differ.")
    content = CARD.format(penalty=penalty, title=repo.rsplit("/", 1)[-1], vit_id=vit_id, lm_id=lm_id, repo=repo,
                          max_question_tokens=cfg.prompt_max_question_tokens,
                          revision_arg=f', revision="{revision}"' if revision else "",
                          max_new_tokens=cfg.gen_max_new_tokens, layer=layer, strategy_text=strategy_text,
                          num_tokens=num_tokens, llama_cpp=llama_cpp, source=source)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{content}")


def check_round_exportable(round_dir: str | Path) -> None:
    """Raise `ExportError` (before any upload) if the round cannot become a Llava model."""
    from mmft.config import load_config
    from mmft.export import check_exportable

    check_exportable(load_config(round_dir)[0])


def plan_export_upload(round_dir: str | Path, repo_id: str, number: int, workdir: str | Path):
    """Export the round under `workdir` and describe the upload (a `RoundUpload` for `mmft.hub.publish`)."""
    from mmft.card import renumbered
    from mmft.config import load_config
    from mmft.export import export_llava
    from mmft.hub import RoundUpload, round_tag

    target = export_repo_id(repo_id)
    folder = export_llava(round_dir, Path(workdir) / "llava", force=True)
    cfg, round_info = load_config(round_dir)
    num_tokens = json.loads((folder / "config.json").read_text())["image_seq_length"]
    # the number it is published under (`--round N`), as the round repo's tag, card and config.json say
    card = render_export_card(cfg, renumbered(round_info, number), target, num_tokens, revision=round_tag(number))
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "README.md"}
    return RoundUpload(target, number, files, card)


def check_export_visibility(repo_id: str, private: bool = False) -> bool:
    """Whether the export must be private: the round's repo is, or `private` (`--private`) asks for it. An
    export repo that exists public then is refused (`ExportError`) before anything is sent: it would
    publish the round's weights, merged."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from mmft.export import ExportError

    api = HfApi()

    def visibility(repo: str) -> bool | None:  # None: not there (or not ours to see)
        try:
            return bool(api.model_info(repo).private)
        except RepositoryNotFoundError:
            return None

    round_private = visibility(repo_id) is True
    if not (private or round_private):
        return False
    target = export_repo_id(repo_id)
    if visibility(target) is False:
        why = f"{repo_id} is private" if round_private else "--private was given"
        raise ExportError(f"{target} is public and {why}: the export would publish the round's weights; make "
                          f"{target} private (its Settings on the Hub) and run this again")
    return True


def publish_export(round_dir: str | Path, repo_id: str, number: int, force: bool = False, private: bool = False):
    """Export and publish to `OWNER/NAME-llava` as one commit tagged `round-N`; returns `Published`.
    The export holds the round's weights merged: it is created private when the round's repo is, and a
    public export repo of a private round is refused before anything is sent (`check_export_visibility`)."""
    from mmft.hub import publish

    private = check_export_visibility(repo_id, private)
    with tempfile.TemporaryDirectory() as tmp:
        return publish(plan_export_upload(round_dir, repo_id, number, tmp), force=force, private=private)
