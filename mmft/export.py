"""Export a patch-mode round as a plain transformers `LlavaForConditionalGeneration` folder.

    python -m mmft.export ROUND OUT [--dtype float32|bfloat16|float16] [--text-model DIR] [--force]

mmft's patch mode *is* a Llava model: CLIP's hidden states -> `linear_1` -> GELU -> `linear_2` ->
spliced into the LM's input embeddings. So the export only writes it out: the LoRA adapter merged
into a copy of the base LM (the base on disk is never touched), CLIP's vision tower, the projector
under `multi_modal_projector.`, one config.json, and a `LlavaProcessor` whose chat template puts
the image where mmft puts it (start of the first user turn) and which expands one `<image>` token
into as many slots as the vision tower gives features. What the export does not carry: mmft's
staged refine (base model, adapter off, rewrites the draft) - the export is the draft model.

Pooled rounds are refused: their one image token is CLIP's *projected* embedding
(`visual_projection(pooler_output)`), which a Llava vision tower (hidden states only) cannot give.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from mmft.config import load_config
from mmft.prompt import IMAGE_TEXT
from mmft.round import check_round_folder

IMAGE_TOKEN = IMAGE_TEXT  # the processor's image token: what mmft drops from every message
DTYPE_NAMES = ("float32", "bfloat16", "float16")
STRATEGIES = ("default", "full")  # LlavaConfig.vision_feature_select_strategy: "default" drops CLS


class ExportError(ValueError):
    """A round that cannot become a Llava model; the message says why and what to do."""


def feature_choice(cfg) -> tuple[int, str]:
    """(vision_feature_layer, vision_feature_select_strategy) the round was trained with.

    Rounds from before these fields existed used CLIP's last hidden state with CLS: (-1, "full").
    """
    return getattr(cfg, "vit_feature_layer", -1), getattr(cfg, "vit_feature_select_strategy", "full")


def check_exportable(cfg) -> None:
    """Raise ExportError unless the round's config can be written as a Llava model."""
    if cfg.vit_feature_mode != "patch":
        raise ExportError(
            f"this round uses vit_feature_mode={cfg.vit_feature_mode!r}: its single image token is CLIP's "
            "projected embedding (visual_projection of the pooled output), and a Llava model feeds the "
            "projector CLIP hidden states only, so it cannot be a LlavaForConditionalGeneration. "
            "Train a round with --vit_feature_mode patch to export it."
        )
    if cfg.mp_depth != 2:
        raise ExportError(f"Llava's projector is Linear -> GELU -> Linear (mp_depth 2); this round has "
                          f"mp_depth={cfg.mp_depth}, which has no Llava equivalent")
    if cfg.mp_hidden_dim is not None and cfg.mp_output_dim is not None and cfg.mp_hidden_dim != cfg.mp_output_dim:
        raise ExportError(f"Llava's projector hidden size is the LM's hidden size ({cfg.mp_output_dim}); this "
                          f"round has mp_hidden_dim={cfg.mp_hidden_dim}")
    layer, strategy = feature_choice(cfg)
    if strategy not in STRATEGIES or not isinstance(layer, int):
        raise ExportError(f"feature choice ({layer!r}, {strategy!r}) is not one Llava has: an int layer and "
                          f"a strategy in {STRATEGIES}")


def chat_template(base_template: str, system: str = "") -> str:
    """The LM's own chat template behind a preamble that flattens multimodal content the way mmft does.

    Content given as a list of parts ({"type": "image"}, {"type": "text", "text": ...}) becomes one
    string: one `<image>` per image part at the start, then the text (stripped, as mmft strips); the
    image then moves before the whitespace that leads the message. mmft's system prompt
    (`prompt_system`) is added when the conversation brings none.
    """
    system_msg = "{'role': 'system', 'content': " + json.dumps(system, ensure_ascii=False) + "}"
    preamble = (
        "{%- set ns = namespace(messages=[]) -%}"
        + (f"{{%- if messages[0]['role'] != 'system' -%}}{{%- set ns.messages = [{system_msg}] -%}}{{%- endif -%}}"
           if system else "")
        + "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        # LLaVA-style "<image>\nQ" / "Q\n<image>": the image first, the text stripped (as mmft.data reads it)
        f"{{%- set text = '{IMAGE_TOKEN}' * message['content'].count('{IMAGE_TOKEN}')"
        f" + (message['content'] | replace('{IMAGE_TOKEN}', '') | trim) -%}}"
        "{%- else -%}"
        "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set words = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        f" | join('\\n') | replace('{IMAGE_TOKEN}', '') -%}}"
        f"{{%- set text = '{IMAGE_TOKEN}' * n_images + (words | trim) -%}}"
        "{%- endif -%}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.messages -%}"
    )
    # mmft splices the image before the whitespace that leads the user message (mmft.prompt.encode_chat):
    # `<|user|><image>\n{question}`, so the text after the image tokenizes as in the plain chat.
    move = "".join(f" | replace('{ws}{IMAGE_TOKEN}', '{IMAGE_TOKEN}{ws}')" for ws in ("\\n", " ") * 2)
    return preamble + "{%- set rendered -%}" + base_template + "{%- endset -%}{{ rendered" + move + " }}"


def _resolve(folder: Path, model_id: str) -> str:
    """Model ids starting with "." are relative to the round folder (as `load_round` reads them)."""
    return str((folder / model_id).resolve()) if model_id.startswith(".") else model_id


def _export_dtype(cfg, folder: Path, dtype):
    """The requested dtype, else the LM's stored one (Phi-3.5: bfloat16), else float32."""
    import torch
    from transformers import AutoConfig

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise ExportError(f"--dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
        return getattr(torch, dtype)
    from mmft.loading import check_model_id

    check_model_id(_resolve(folder, cfg.lm_model_id), f"{folder / 'config.json'} names lm_model_id ")
    stored = getattr(AutoConfig.from_pretrained(_resolve(folder, cfg.lm_model_id), revision=cfg.lm_revision),
                     "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _grow_vocab(lm, rows: int) -> None:
    """Give the LM `rows` embedding / lm_head rows, the new ones set to the mean of the old ones.

    The image token's input embedding is always replaced by an image feature, so its row only has
    to exist; its lm_head row as the mean makes its logit the mean of the others' (never above
    the best one, so greedy answers do not change), and generation suppresses it anyway.
    """
    import torch

    old_in, old_out = lm.get_input_embeddings(), lm.get_output_embeddings()
    n_old = old_in.weight.shape[0]
    with torch.no_grad():
        new_in = torch.nn.Embedding(rows, old_in.weight.shape[1], dtype=old_in.weight.dtype)
        new_in.weight[:n_old] = old_in.weight
        new_in.weight[n_old:] = old_in.weight.mean(0, keepdim=True)
        lm.set_input_embeddings(new_in)
        if old_out is not None and old_out.weight is not old_in.weight:
            new_out = torch.nn.Linear(old_out.in_features, rows, bias=False, dtype=old_out.weight.dtype)
            new_out.weight[:n_old] = old_out.weight
            new_out.weight[n_old:] = old_out.weight.mean(0, keepdim=True)
            lm.set_output_embeddings(new_out)
        elif old_out is not None:
            lm.tie_weights()
    lm.config.vocab_size = rows


def _add_image_token(tokenizer, lm) -> int:
    """Add `<image>` as a special token; grow the LM's vocab only if the id falls outside it."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = lm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        _grow_vocab(lm, image_id + 1)
    return image_id


def _copy_sentencepiece(cfg, folder: Path, out: Path) -> None:
    """Copy the base LM's `tokenizer.model` if it has one: llama.cpp's Phi-3 converter reads it."""
    from transformers.utils import cached_file

    path = cached_file(_resolve(folder, cfg.lm_model_id), "tokenizer.model", revision=cfg.lm_revision,
                       _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    if path:
        shutil.copyfile(path, out / "tokenizer.model")


def _check_outputs(folder: Path, cfg, outputs: list[Path]) -> None:
    """An output folder, and its `.partial` sibling, are replaced whole: never one that is, or holds, what the
    export reads (the round, a local base model) or the other output."""
    inputs = {"the round being exported": folder.resolve()}
    for key in ("lm_model_id", "vit_model_id"):
        path = Path(_resolve(folder, getattr(cfg, key)))
        if path.exists():
            inputs[f"the base model {getattr(cfg, key)}"] = path.resolve()
    for out in outputs:  # replacing it would remove the link, or fail on it after the whole export
        if out.is_symlink():
            raise ExportError(f"{out} is a symbolic link: give the folder it points to, or another folder")
    groups = [(out, out.with_name(out.name + ".partial"), _pending(out)) for out in outputs]  # the export's own
    for n, group in enumerate(groups):
        for out in group:
            for what, path in inputs.items():
                if path == out.resolve() or out.resolve() in path.parents:
                    raise ExportError(f"{out} is or holds {what}: choose another output folder")
            for other in (o for later in groups[n + 1 :] for o in later):
                a, b = out.resolve(), other.resolve()
                if a == b or a in b.parents or b in a.parents:
                    raise ExportError(f"the output folders {out} and {other} overlap: choose separate ones")


def _pending(out: Path) -> Path:
    """The text folder an export to `out` has moved into place, recorded until OUT follows: killed between its
    two final moves, it has TEXT in place and OUT not yet, and its re-run must not need --force for TEXT (an
    OUT that is there was there before, and still needs it). Like `OUT.partial`, the name is the export's."""
    return out.with_name(out.name + ".partial.json")


def _refuse_existing(outputs: list[Path], force: bool) -> None:
    """An existing non-empty output is only replaced with force, or when an interrupted export to the same
    folders was allowed to (`_pending`); checked for every output before any `.partial` folder is cleared (a
    refusal must not cost the work an interrupted export left there)."""
    try:
        allowed = set(json.loads(_pending(outputs[0]).read_text())["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        allowed = set()
    for out in outputs:
        if out.exists() and any(out.iterdir()) and not force and str(out.resolve()) not in allowed:
            raise ExportError(f"{out} already exists and is not empty; choose another folder or pass --force")


def _fresh_folder(out: Path) -> Path:
    """A temporary sibling of `out`, emptied."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export: start it again
    tmp.mkdir(parents=True)
    return tmp


def _publish_folder(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_llava(round_dir: str | Path, out: str | Path, dtype=None, text_model: str | Path | None = None,
                 force: bool = False) -> Path:
    """Write `out` as a LlavaForConditionalGeneration folder (+ processor, card); return it.

    `text_model`: also write the merged LM alone there as a plain causal-LM folder (llama.cpp's
    text converter takes that). Written to `out.partial` first, so an interrupted export leaves no
    half folder at `out` and simply runs again.
    """
    folder = check_round_folder(round_dir)
    cfg, round_info = load_config(folder)
    check_exportable(cfg)  # before torch is even imported: a refusal is instant

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mmft.export_hub import render_export_card
    from mmft.loading import load_round

    layer, strategy = feature_choice(cfg)
    out = Path(os.path.abspath(out))  # "." has no name to put ".partial" after; links stay links (refused)
    text_model = os.path.abspath(text_model) if text_model else None
    outputs = [out] + ([Path(text_model)] if text_model else [])
    _check_outputs(folder, cfg, outputs)
    _refuse_existing(outputs, force)
    dtype = _export_dtype(cfg, folder, dtype)
    model, _ = load_round(folder, device="cpu", dtype=dtype, quantize="none")  # strict projector, same checks
    tmp = _fresh_folder(out)  # after the round loaded: a round that does not leaves no empty `.partial` behind
    text_tmp = _fresh_folder(Path(text_model)) if text_model else None
    lm = model.lm.merge_and_unload() if model.has_adapter else model.lm  # in memory; the base on disk is untouched
    tokenizer, vision = model.tokenizer, model.vision
    image_id = _add_image_token(tokenizer, lm)
    template = chat_template(tokenizer.chat_template, cfg.prompt_system)
    tokenizer.chat_template = template
    for key in ("is_local", "local_files_only"):  # how *this* machine loaded it, not part of the model
        tokenizer.init_kwargs.pop(key, None)

    vision_config = vision.vision_model.config
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    num_image_tokens = n_patches + (1 if strategy == "full" else 0)  # CLIP adds one CLS token
    # `_name_or_path` is where this machine loaded each model from: no place in a published config.json
    text_dict, vision_dict = ({k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
                              for c in (lm.config, vision_config))
    config = LlavaConfig(
        vision_config=vision_dict, text_config=text_dict,
        image_token_index=image_id, image_seq_length=num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy, vision_feature_layer=layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    tower = llava.model.vision_tower
    parts = [(getattr(tower, "vision_model", tower), vision.vision_model),
             (llava.model.multi_modal_projector, model.projector),
             (llava.model.language_model, lm.model), (llava.lm_head, lm.lm_head)]
    for target, source in parts:  # strict: every weight named, none left random
        state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
        target.load_state_dict(state, strict=True, assign=True)
        for name, buffer in source.named_buffers():  # non-persistent ones (rotary, position ids) too
            owner, _, leaf = name.rpartition(".")
            module = target.get_submodule(owner)
            if getattr(module, leaf).is_meta:
                module._buffers[leaf] = buffer.detach().clone()
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"internal error: weights not carried over into the Llava model: {left[:5]}")
    llava.generation_config = _generation_config(lm, tokenizer, cfg, image_id)
    llava.save_pretrained(tmp)

    processor = LlavaProcessor(
        image_processor=vision.processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=template, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(tmp)
    _record_bos_eos(tokenizer, tmp)
    _copy_sentencepiece(cfg, folder, tmp)
    (tmp / "README.md").write_text(str(render_export_card(cfg, round_info, str(out), num_image_tokens)))
    if text_tmp is not None:
        lm.generation_config = llava.generation_config
        lm.to(dtype).save_pretrained(text_tmp)
        tokenizer.save_pretrained(text_tmp)
        _record_bos_eos(tokenizer, text_tmp)
        _copy_sentencepiece(cfg, folder, text_tmp)
        _pending(out).write_text(json.dumps({"outputs": [str(Path(text_model).resolve())]}))  # what it moves first
        _publish_folder(text_tmp, Path(text_model))
    _publish_folder(tmp, out)
    _pending(out).unlink(missing_ok=True)
    return out


def _record_bos_eos(tokenizer, folder: Path) -> None:
    """Write down whether the tokenizer adds BOS / EOS (transformers 5 does not save it): llama.cpp's
    converter reads `add_bos_token`, and without it llama.cpp adds a BOS that mmft's prompts never had."""
    probe = tokenizer("a")["input_ids"]
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["add_bos_token"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    config["add_eos_token"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    path.write_text(json.dumps(config, indent=2) + "\n")


def _generation_config(lm, tokenizer, cfg, image_id: int):
    """mmft's defaults: greedy, stop at end-of-turn or EOS, never emit the image token."""
    from transformers import GenerationConfig

    stop = [tokenizer.convert_tokens_to_ids(cfg.prompt_end_of_turn), tokenizer.eos_token_id]
    return GenerationConfig(
        bos_token_id=lm.generation_config.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[t for t in stop if t is not None and t >= 0], max_new_tokens=cfg.gen_max_new_tokens,
        do_sample=cfg.gen_do_sample, suppress_tokens=[image_id],
        **({"temperature": cfg.gen_temperature, "top_p": cfg.gen_top_p} if cfg.gen_do_sample else {}),
        **({"repetition_penalty": cfg.gen_repetition_penalty} if cfg.gen_repetition_penalty != 1.0 else {}),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a patch-mode mmft round as a LlavaForConditionalGeneration "
                                                 "folder (transformers, vLLM, llama.cpp).")
    parser.add_argument("round_dir", help="round folder (adapter/, projector.safetensors, config.json)")
    parser.add_argument("out", help="folder to write the Llava model to")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="weights dtype (default: the LM's stored dtype)")
    parser.add_argument("--text-model", help="also write the merged LM alone here (for llama.cpp's converter)")
    parser.add_argument("--force", action="store_true", help="replace OUT (and --text-model) if they exist")
    args = parser.parse_args(argv)
    try:
        out = export_llava(args.round_dir, args.out, args.dtype, args.text_model, args.force)
    except Exception as err:  # one line, no traceback: a damaged round file (SafetensorError), a full disk...
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} (LlavaForConditionalGeneration)" + (f" and {args.text_model}" if args.text_model else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
