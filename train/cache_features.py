r"""Compute CLIP features for every image of a LLaVA-Instruct JSON once, into safetensors shards.

    python -m train.cache_features --train_json llava_instruct_150k.json --image_dir coco/train2017 \
        --out features/clip-b32-patch --vit_feature_mode patch
    python -m train.finetune ... --feature_cache features/clip-b32-patch

The feature choice (--vit_feature_mode, and in patch mode --vit_feature_layer and
--vit_feature_select_strategy) must be the training run's: finetune refuses a cache built otherwise.
Features are computed as a training run computes them (bf16 on CUDA, float32 on a CPU), so a run from
the cache trains as one with CLIP on the fly; a local CLIP folder is recorded by its absolute path.
"""

import argparse

from mmft.config import FEATURE_MODES, SELECT_STRATEGIES, MMFTConfig, model_key, whole_number


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_json", required=True, nargs="+", help="one or more LLaVA-Instruct JSON files")
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--vit_model_id", default=MMFTConfig.vit_model_id)
    parser.add_argument("--vit_revision", default=None)
    parser.add_argument("--vit_feature_mode", default=MMFTConfig.vit_feature_mode, choices=FEATURE_MODES)
    parser.add_argument("--vit_feature_layer", type=int, default=MMFTConfig.vit_feature_layer,
                        help="patch mode: index into CLIP's hidden_states (-1 last, -2 second-to-last)")
    parser.add_argument("--vit_feature_select_strategy", default=MMFTConfig.vit_feature_select_strategy,
                        choices=SELECT_STRATEGIES, help="patch mode: default = drop CLS (LLaVA), full = keep it")
    parser.add_argument("--batch_size", type=whole_number(1), default=64)
    parser.add_argument("--shard_size", type=whole_number(1), default=4096)
    args = parser.parse_args(argv)

    import torch

    from mmft.data import DataError, load_json
    from mmft.features import build_cache
    from mmft.loading import pick_device, pick_dtype, pin_revision
    from mmft.vision import VisionEncoder

    cfg = MMFTConfig(vit_model_id=model_key(args.vit_model_id), vit_revision=args.vit_revision,
                     vit_feature_mode=args.vit_feature_mode, vit_feature_layer=args.vit_feature_layer,
                     vit_feature_select_strategy=args.vit_feature_select_strategy)
    names = []
    try:
        for path in args.train_json:
            records = load_json(path)
            if not isinstance(records, list):  # before --out is touched: an empty run would empty a good cache
                raise DataError(f"{path}: expected a JSON list of conversations, got {type(records).__name__}")
            # a record whose "image" is not a file name is skipped, as training skips it
            names += [r["image"] for r in records
                      if isinstance(r, dict) and isinstance(r.get("image"), str) and r["image"]]
    except DataError as err:
        parser.exit(1, f"error: {err}\n")
    if not names:
        parser.exit(1, f"error: no record in {', '.join(args.train_json)} names an image: nothing to cache\n")
    try:
        cfg.vit_revision = pin_revision(cfg.vit_model_id, cfg.vit_revision)  # a branch moves: record its commit now
        device = pick_device()
        # as training computes them: bf16 on CUDA, float32 on a CPU (`training_dtype`; bf16 there only with --bf16)
        dtype = pick_dtype(device) if device.type == "cuda" else torch.float32
        vision = VisionEncoder.from_config(cfg, dtype=dtype).to(device)
    except (OSError, ValueError) as err:  # a mistyped or unreachable CLIP id
        parser.exit(1, f"error: {' '.join(str(err).split())}\n")
    try:
        index = build_cache(vision, cfg.vit_model_id, args.image_dir, names, args.out, args.shard_size,
                            args.batch_size, vit_revision=cfg.vit_revision)
    except OSError as err:  # no such image folder, --out is a file: nothing was touched
        parser.exit(1, f"error: {err}\n")
    print(f"cached {len(index['files'])} images ({len(index['unreadable'])} unreadable) "
          f"as [{index['num_tokens']}, {index['feature_dim']}] features -> {args.out}")
    if names and not index["files"]:
        parser.exit(1, "error: no image could be read: the cache is empty\n")


if __name__ == "__main__":
    main()
