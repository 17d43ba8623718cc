r"""Fine-tune one round: QLoRA on the LM + the projector (or, with --projector_only, the projector alone).

    python -m train.finetune --train_json llava_instruct_150k.json --image_dir coco/train2017 \
        --output_dir runs --max_samples 12000 --max_steps 6000
    python -m train.finetune ... --resume_round runs/round-1 --data_offset 12000   # the next round

Model flags are MMFTConfig's fields (--vit_feature_mode, --lora_r, --prompt_max_answer_tokens, ...), run
flags are RunArguments' (--train_json, --quantize nf4|int8|none, ...), and every transformers
TrainingArguments flag works too (--output_dir, --max_steps, --learning_rate, ...). --help lists the
first two at once; --help_all lists all three (slower: it imports the Trainer).
"""

import argparse
import sys

from transformers import HfArgumentParser

from mmft.config import MMFTConfig, RunArguments


def parser_for(*dataclasses) -> HfArgumentParser:
    return HfArgumentParser(dataclasses, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help_all" not in argv and ("-h" in argv or "--help" in argv):
        parser_for(MMFTConfig, RunArguments).parse_args(argv)  # prints the help and exits, no torch import
    from transformers import TrainingArguments

    from mmft.data import DataError
    from mmft.training import default_training_args, finetune

    parser = parser_for(MMFTConfig, RunArguments, TrainingArguments)
    parser.add_argument("--help_all", action="help", help="this help, with every TrainingArguments flag")
    parser.set_defaults(**default_training_args())
    try:
        cfg, run, targs = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a value the config refuses (its message says which and what is allowed)
        parser.error(str(err))
    try:
        folder, info = finetune(cfg, run, targs)
    except (DataError, OSError, ValueError) as err:  # bad data, a round folder or its config.json, a model id
        sys.exit(f"error: {' '.join(str(err).split())}")
    print(f"[rank {targs.process_index}/{targs.world_size}] finished at step {info['steps']}")
    if targs.process_index == 0:
        extra = "".join(f", {k} {v}" for k, v in info["metrics"].items())
        print(f"round {info['round']} ({info['stage']}): {info['steps']} steps, train loss {info['train_loss']}, "
              f"eval loss {info['eval_loss']}{extra} -> {folder}")


if __name__ == "__main__":
    main()
