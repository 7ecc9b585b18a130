"""One rank of a 2-process CPU DDP job under a simulated SLURM step (``tests/imaging_meta/test_slurm.py``).

Each rank sends itself the requeue signal at the start of another training batch (rank 0 at batch 1, rank 1 at
batch 2), as ranks on two nodes receive it at slightly different moments. With Lightning's handler the save ran
inside the handler, wherever each rank was, and the ranks hung in two different collectives; with
`imaging_meta.requeue.SlurmRequeue` both save (and requeue) at the end of the batch in which the first of them
was signalled, and again for the second.

Usage: python -m tests.imaging_meta.requeue_check --rank R --port P --out DIR
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors import signal_connector

from imaging_meta.requeue import SlurmRequeue


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(12, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lightning-handler", action="store_true", help="without SlurmRequeue (the hang it prevents)")
    args = ap.parse_args()
    os.environ.update({
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "imaging-meta", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1", "SLURM_PROCID": str(args.rank), "SLURM_LOCALID": str(args.rank), "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port),
    })
    signal_connector.call = lambda cmd, **kw: 0  # no scontrol here: the requeue "succeeds"
    torch.manual_seed(0)
    callbacks = [] if args.lightning_handler else [SlurmRequeue()]
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=args.out, use_distributed_sampler=True,
                      callbacks=[*callbacks, SignalAt(1 if args.rank == 0 else 2)])
    trainer.fit(Tiny())


if __name__ == "__main__":
    main()
