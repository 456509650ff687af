"""A test-only callback that makes one rank of a DDP fit fail mid-training (a bug, an out-of-memory error, a bad GPU).

    python cli.py fit ... --trainer.callbacks+ tests.fault_at.FaultAt --trainer.callbacks.rank 1

The other ranks then stall for `stall` seconds, as NCCL ranks do in their next collective when a peer is gone: gloo
on a CPU would notice the closed connection at once and hide what a job on GPUs meets.
"""
import time

import lightning.pytorch as pl


class FaultAt(pl.Callback):
    def __init__(self, rank: int = 1, step: int = 2, stall: float = 600.0):
        self.rank, self.step, self.stall = rank, step, stall

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")
        time.sleep(self.stall)
