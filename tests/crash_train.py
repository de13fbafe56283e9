"""Test helper, run by torchrun as a script: ``rnip train`` in which one rank SIGKILLs itself.

``RNIP_TEST_CRASH_AT=RANK:EPOCH:STEP`` kills that rank after that optimiser step of that (1-based)
epoch, on the first attempt of the torchrun job only (``TORCHELASTIC_RESTART_COUNT`` 0), to
simulate a worker dying. The crash is a trainer callback added here; the package knows nothing of it.
"""

import os
import signal
import sys

from rnip_ext import training
from rnip_ext.callbacks import Callback
from rnip_ext.distributed import restart_count


class CrashAt(Callback):
    def __init__(self, rank: int, epoch: int, step: int) -> None:
        self.rank, self.epoch, self.step = rank, epoch, step

    def on_train_batch_end(self, trainer, step: int) -> None:
        rank = 0 if trainer.dist_ctx is None else trainer.dist_ctx.rank
        if (rank, trainer.epoch + 1, step) == (self.rank, self.epoch, self.step) and restart_count() == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    rank, epoch, step = (int(v) for v in os.environ["RNIP_TEST_CRASH_AT"].split(":"))
    init = training.Trainer.__init__

    def with_crash(self, *args, callbacks=(), **kwargs):
        init(self, *args, callbacks=[*callbacks, CrashAt(rank, epoch, step)], **kwargs)

    training.Trainer.__init__ = with_crash
    from rnip_ext.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
