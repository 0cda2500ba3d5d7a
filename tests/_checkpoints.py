"""One way for tests to write a real Lightning checkpoint of a module without training it."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


def save_checkpoint(module: pl.LightningModule, path: Path) -> Path:
    """``Trainer.save_checkpoint`` of ``module`` as it is (no fit), into ``path``."""
    trainer = pl.Trainer(
        default_root_dir=path.parent,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path
