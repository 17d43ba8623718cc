"""Rebuild the bundled shapes demo (demo/base, demo/round, demo/round-pooled) from nothing.

    python -m train.build_demo     # about 4.5 minutes on 2 quiet CPU cores

The two pre-trainings (CLIP, LM), and then the two rounds, run side by side, one process of one
thread per core, so a rebuild gives the same weights and figures. `--workers 1` runs them one after
the other in this process, on its threads: figures then move by a few points from run to run.

Prints accuracy per question kind, held-out (phrasings and image styles training never saw), on the
same pictures asked in an independent writer's wordings ("indep"), and in-distribution, the refine
damage rate, and held-out accuracy split by what made a question held-out (a frame no model saw; a
synonym only the base LM's text pre-training saw); the last line is JSON: the served (patch) round's
held-out figures, its independent-wording ones, and every mode's beside them.
"""

import argparse
import json
from pathlib import Path

from mmft.config import FEATURE_MODES, whole_number  # light: no torch

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"  # = mmft.demo.DEMO_DIR, without importing torch for --help


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--modes", default="patch,pooled", help="feature modes to train; the first is served")
    parser.add_argument("--samples", type=whole_number(1), default=4000)
    parser.add_argument("--steps", type=whole_number(1), default=900)
    parser.add_argument("--batch_size", type=whole_number(1), default=16, help="rounds' batch size")
    parser.add_argument("--lm_steps", type=whole_number(1), default=800)
    parser.add_argument("--lm_batch_size", type=whole_number(1), default=32,
                        help="the base LM's text pre-training batch size")
    parser.add_argument("--clip_steps", type=whole_number(0), default=1200)
    parser.add_argument("--eval_n", type=whole_number(1), default=300,
                        help="fresh held-out images (each asked every kind, in held-out and in independent wordings)")
    parser.add_argument("--indist_n", type=whole_number(1), default=100, help="fresh in-distribution images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_seed", type=int, default=None,
                        help="draw of the evaluation's images and questions (default: seed + 10000); another one "
                             "checks a recipe on material its choice never saw")
    parser.add_argument("--workers", type=whole_number(1), default=None,
                        help="processes side by side (default: one per core, at most 2)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if any(mode not in FEATURE_MODES for mode in modes) or len(set(modes)) != len(modes):
        parser.error(f"--modes {args.modes!r}: a comma-separated list of distinct modes among "
                     f"{', '.join(FEATURE_MODES)}")
    from transformers.utils import logging as hf_logging

    from mmft.demo import build_demo
    from mmft.shapes import summary

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    results = build_demo(args.out, tuple(modes), args.samples, args.steps, args.lm_steps, args.clip_steps,
                         args.eval_n, args.indist_n, args.seed, args.workers,
                         args.batch_size, args.lm_batch_size, args.eval_seed)
    table = {}
    for mode in modes:
        for split, metrics in (("held-out", results[mode]["heldout"]), ("indep", results[mode]["independent"]),
                               ("in-dist", results[mode]["in_distribution"])):
            figures = summary(metrics)
            table[(mode, split)] = figures
            print(f"{mode:7s} {split:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items())
                  + f"  ({metrics['images']} images)")
        families = results[mode]["heldout"].get("by_family", {})
        print(f"{mode:7s} held-out by what made it held-out: " + "  ".join(
            f"{k} {v['accuracy']:.3f} ({v['questions']} questions)" for k, v in sorted(families.items())))
        for split, what in (("heldout", "held-out frames"), ("independent", "independent wordings")):
            weak = sorted((v["accuracy"], kind, frame) for kind, frames in results[mode][split]["by_frame"].items()
                          for frame, v in frames.items() if v["accuracy"] < 0.8)
            print(f"{mode:7s} {what} under 0.8: " + ("; ".join(f"{k} {f!r} {a:.2f}" for a, k, f in weak) or "none"))
        for example in results[mode]["heldout"]["examples"]:
            mark = "ok " if example["right"] else "BAD"
            print(f"    {mark} {example['kind']:8s} {example['question']!r}: draft {example['draft']!r} "
                  f"-> {example['answer']!r}")
    print(json.dumps({"mode": modes[0], "split": "heldout", "images": args.eval_n,
                      **table[(modes[0], "held-out")],
                      "by_family": {k: v["accuracy"] for k, v in results[modes[0]]["heldout"].get("by_family", {}).items()},
                      "independent": table[(modes[0], "indep")],
                      "modes": {m: {"heldout": table[(m, "held-out")], "independent": table[(m, "indep")],
                                    "in_distribution": table[(m, "in-dist")]} for m in modes},
                      "seconds": results["seconds"], "workers": results["workers"]}))


if __name__ == "__main__":
    main()
