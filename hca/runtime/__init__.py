"""What a Lightning run of any stage is wrapped in: the console it prints to, its progress bars and
status file, its experiment loggers, its hyper-parameter record and its distributed strategies.

* :mod:`hca.runtime.console` -- quiet library chatter (transformers, hub, DeepSpeed notices).
* :mod:`hca.runtime.progress` -- one progress bar per stage, with the stage's own unit.
* :mod:`hca.runtime.status_file` -- a pipeline child's progress, written to a file its parent reads.
* :mod:`hca.runtime.loggers` -- wandb when it is there (offline by default), never required.
* :mod:`hca.runtime.hparams` -- plain, YAML-safe hyper-parameters of a module or datamodule.
* :mod:`hca.runtime.strategies` -- DeepSpeed ZeRO on CPU (gloo) and its helpers.
"""
