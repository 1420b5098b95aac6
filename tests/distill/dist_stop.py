"""Run one distillation stage and stop after N optimizer steps as if interrupted (for resume tests).

    torchrun --nproc_per_node=2 tests/distill/dist_stop.py N key=value ...
"""

import sys

from slimlm.config import DistillConfig, load_config
from slimlm.distill.trainer import train

if __name__ == "__main__":
    train(load_config(DistillConfig, None, sys.argv[2:]), stop_after=int(sys.argv[1]))
