"""What a user runs: one stage from YAML, or the stages in order, and what is made of their outputs.

* :mod:`hca.workflows.cli` -- the LightningCLI behind ``train.py`` (one stage, one YAML).
* :mod:`hca.workflows.pipeline` -- ``make quickstart``: the stages in order, resumable, side by side.
* :mod:`hca.workflows.recipes` -- the GSM8K / MATH recipes on local model folders.
* :mod:`hca.workflows.tiny_models` -- tiny real-format models built here (the recipes' CPU smoke run).
* :mod:`hca.workflows.prover_check` -- PAV's check of candidate provers.
* :mod:`hca.workflows.experiment` -- methods × seeds, with :mod:`hca.workflows.bootstrap` intervals.
* :mod:`hca.workflows.report` -- the quickstart's report, with :mod:`hca.workflows.credit_view`.

Nothing below this package imports it (tests/test_layout.py).
"""
