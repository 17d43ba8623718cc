"""Rebuild the bundled shapes demo (demo/base + demo/round) from nothing; prints metrics as JSON last.

    python -m train.build_demo            # ~2 min on 2 quiet CPU cores (OMP_NUM_THREADS=1 on a shared one)
"""

import argparse
import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"  # = mmft.demo.DEMO_DIR, without importing torch for --help


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--modes", default="patch,pooled", help="feature modes to train; the first is served")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lm_steps", type=int, default=500)
    parser.add_argument("--clip_steps", type=int, default=400)
    parser.add_argument("--eval_n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from mmft.demo import build_demo

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    modes = args.modes.split(",")
    results = build_demo(args.out, tuple(modes), args.samples, args.steps, args.lm_steps, args.clip_steps,
                         args.eval_n, args.seed)
    for mode in modes:
        r = results[mode]
        print(f"{mode:7s} colour {r['color_accuracy']:.3f}  shape {r['shape_accuracy']:.3f}  "
              f"eval loss {r['eval_loss']}  ({r['steps']} steps, {results['seconds'][mode]} s)")
        for example in r.pop("examples"):
            print(f"        {example['question']!r}: draft {example['draft']!r} -> {example['answer']!r}")
    served = results[modes[0]]
    print(json.dumps({"mode": modes[0], "color_accuracy": served["color_accuracy"],
                      "shape_accuracy": served["shape_accuracy"], "modes": {m: results[m] for m in modes},
                      "seconds": results["seconds"], "eval_images": args.eval_n}))


if __name__ == "__main__":
    main()
