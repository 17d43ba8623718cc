"""Fine-tune one round: QLoRA on the LM + the projector (or, with --projector_only, the projector alone).

    python -m train.finetune --train_json llava_instruct_150k.json --image_dir coco/train2017 \
        --output_dir runs --max_samples 12000 --max_steps 6000
    python -m train.finetune ... --resume_round runs/round-1 --data_offset 12000   # the next round

Every TrainingArguments option works too (--learning_rate, --per_device_train_batch_size, ...).
"""

from transformers import HfArgumentParser, TrainingArguments

from mmft.training import DataArguments, ModelArguments, default_training_args, finetune


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**default_training_args())
    margs, dargs, targs = parser.parse_args_into_dataclasses(args=argv)
    folder, info = finetune(margs, dargs, targs)
    print(f"[rank {targs.process_index}/{targs.world_size}] finished at step {info['steps']}")
    if targs.process_index == 0:
        extra = "".join(f", {k} {v}" for k, v in info["metrics"].items())
        print(f"round {info['round']} ({info['stage']}): {info['steps']} steps, train loss {info['train_loss']}, "
              f"eval loss {info['eval_loss']}{extra} -> {folder}")


if __name__ == "__main__":
    main()
