"""The LightningCLI behind ``train.py``: any LightningModule/LightningDataModule by class path."""
from __future__ import annotations

import os


def main(args=None, run: bool = True):
    os.environ.setdefault("WANDB_MODE", "offline")  # never send anything unless asked to
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hca.runtime.console import quiet_console

    quiet_console()
    import sys
    from unittest import mock

    from lightning.pytorch.cli import LightningCLI

    argv = [sys.argv[0]] if args is not None else sys.argv  # given args replace the command line
    from hca.runtime.status_file import ENV, StatusFile

    extra = {}
    if os.environ.get(ENV):  # a pipeline child: progress to a file (hca.runtime.status_file)
        extra["trainer_defaults"] = {"callbacks": [StatusFile(os.environ[ENV])]}
    with mock.patch("sys.argv", argv):
        return LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **extra,
        )
