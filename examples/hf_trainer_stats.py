"""A Hugging Face Trainer run with fastmlp's ``StatsCallback``:
``python -P examples/hf_trainer_stats.py [OUTPUT_DIR]``.

The callback instruments the model at train begin and logs every layer's statistics every
4 optimizer steps to the backends of ``report_to`` (here TensorBoard, in the Trainer's own
event files under OUTPUT_DIR/runs). A small random GPT-2 on random tokens (nothing is
downloaded): it runs in seconds on a CPU. (``-P``: run from a checkout, the top-level
``kernels/`` folder would shadow Hugging Face's ``kernels`` package.)
"""

from __future__ import annotations

import argparse

import torch
import transformers

from fastmlp.integrations.transformers import StatsCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="runs/hf")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (64, 32))
    train = [{"input_ids": row, "labels": row} for row in ids]
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        report_to=["tensorboard"],
        logging_steps=4,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=train, callbacks=[StatsCallback(every=4)]
    )
    trainer.train()
    print(f"logged to {args.output_dir}/runs")


if __name__ == "__main__":
    main()
