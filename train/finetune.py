"""Train any supported vision-language model on VisionZip tokens: projector | pretrain | finetune | lora.

    deepspeed train/finetune.py --config configs/demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 train/finetune.py --config configs/demo.yaml
    python train/finetune.py --config configs/demo.yaml train.max_steps=20

The recipe (steps, exit codes, preemption) is :mod:`visionzip_core.training.recipe`; installed, the
same entry is the ``visionzip-train`` command.
"""

import sys

from visionzip_core.training.recipe import main

if __name__ == "__main__":
    sys.exit(main())
