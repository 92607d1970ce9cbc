"""Training: the loop (one screen), the optimiser and schedule, the batch stream, what a run saves to resume
exactly, processes and devices (torchrun / DDP), the logs, and a whole run from its RunConfig."""

from retinanet.train.distributed import init_distributed, rank_and_world, train_device
from retinanet.train.log import RunLog, write_note
from retinanet.train.loop import NonFiniteLossError, TrainingInterrupted, train
from retinanet.train.optim import build_optimizer, build_scheduler, lr_factor
from retinanet.train.run import run_train
from retinanet.train.stream import BatchStream

__all__ = [
    "BatchStream",
    "NonFiniteLossError",
    "RunLog",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "init_distributed",
    "lr_factor",
    "rank_and_world",
    "train_device",
    "run_train",
    "train",
    "write_note",
]
