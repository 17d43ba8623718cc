"""Compute CLIP features for every image of a LLaVA-Instruct JSON once, into safetensors shards.

    python -m train.cache_features --train_json llava_instruct_150k.json --image_dir coco/train2017 \
        --out features/clip-b32-pooled --vit_feature_mode pooled
    python -m train.finetune ... --feature_cache features/clip-b32-pooled
"""

import argparse
import json

from mmft.config import MMFTConfig
from mmft.features import build_cache
from mmft.loading import pick_device, pick_dtype
from mmft.vision import VisionEncoder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_json", required=True, nargs="+", help="one or more LLaVA-Instruct JSON files")
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--vit_model_id", default=MMFTConfig.vit_model_id)
    parser.add_argument("--vit_feature_mode", default="pooled", choices=["pooled", "patch"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=4096)
    args = parser.parse_args(argv)

    names = []
    for path in args.train_json:
        names += [r["image"] for r in json.load(open(path)) if isinstance(r, dict) and r.get("image")]
    device = pick_device()
    vision = VisionEncoder.from_pretrained(args.vit_model_id, args.vit_feature_mode, MMFTConfig.vit_max_pixels,
                                           dtype=pick_dtype(device)).to(device)
    index = build_cache(vision, args.vit_model_id, args.image_dir, names, args.out, args.shard_size, args.batch_size)
    print(f"cached {len(index['files'])} images ({len(index['unreadable'])} unreadable) "
          f"as [{index['num_tokens']}, {index['feature_dim']}] features -> {args.out}")


if __name__ == "__main__":
    main()
