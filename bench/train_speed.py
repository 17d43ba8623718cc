"""Training throughput on the tiny model (CPU): cached CLIP features vs on-the-fly CLIP, and dynamic
padding vs padding every batch to a fixed maximum. Runs the real path (`mmft.training.finetune`).

    python -m bench.train_speed [--steps 60]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=POSITIVE, default=60)
    parser.add_argument("--pad_to", type=POSITIVE, default=256, help="the fixed length to compare against")
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

from transformers import TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from mmft import shapes  # noqa: E402
from mmft.features import build_cache  # noqa: E402
from mmft.testing import build_tiny_models  # noqa: E402
from mmft.config import RunArguments  # noqa: E402
from mmft.training import default_training_args, finetune  # noqa: E402
from mmft.vision import VisionEncoder  # noqa: E402


def run(work: Path, cfg, data, steps: int, cache: str | None, pad_to: int | None) -> tuple[float, float]:
    """(training samples/s as the Trainer measured it, train loss)."""
    run_args = RunArguments(train_json=str(data / "train.json"), image_dir=str(data / "images"), feature_cache=cache,
                            pad_to_length=pad_to, max_eval_samples=8, quantize="none")
    targs = TrainingArguments(**default_training_args(
        output_dir=str(work / f"run-{bool(cache)}-{pad_to}"), max_steps=steps, per_device_train_batch_size=8,
        eval_strategy="no", save_strategy="no", logging_steps=steps, disable_tqdm=True, seed=0))
    _, info = finetune(cfg, run_args, targs)
    return info["train_samples_per_second"], info["train_loss"]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = build_tiny_models(work / "tiny", mode="patch")
        shapes.write_dataset(work / "data", 400, seed=0)
        t = time.perf_counter()
        vision = VisionEncoder.from_config(cfg)
        names = [r["image"] for r in json.loads((work / "data" / "train.json").read_text())]
        build_cache(vision, cfg.vit_model_id, work / "data" / "images", names, work / "cache")
        cache_seconds = time.perf_counter() - t
        rows = {}
        for name, cache, pad in (("on-the-fly CLIP, dynamic padding", None, None),
                                 ("cached features, dynamic padding", str(work / "cache"), None),
                                 (f"cached features, padded to {args.pad_to}", str(work / "cache"), args.pad_to)):
            rows[name] = run(work, cfg, work / "data", args.steps, cache, pad)
    names = list(rows)
    print(f"{'configuration':40s} {'samples/s':>10s} {'train loss':>10s}")
    for name, (speed, loss) in rows.items():
        print(f"{name:40s} {speed:10.1f} {loss:10.4f}")
    result = {
        "onthefly_samples_per_s": round(rows[names[0]][0], 2),
        "cached_samples_per_s": round(rows[names[1]][0], 2),
        "fixed_pad_samples_per_s": round(rows[names[2]][0], 2),
        "cached_speedup": round(rows[names[1]][0] / rows[names[0]][0], 2),
        "dynamic_padding_speedup": round(rows[names[1]][0] / rows[names[2]][0], 2),
        "cache_build_seconds_400_images": round(cache_seconds, 2),
        "steps": args.steps, "batch_size": 8, "threads": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
