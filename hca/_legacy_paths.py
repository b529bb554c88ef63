"""The module paths of hca before its layout by stage (issue 20) keep importing.

Until 2026-12 the package was 43 flat modules and packages (``hca.collect``, ``hca.prm_model``,
``hca.rl_batch``, ``hca.pipeline``, ...). Users' YAML files (``class_path: hca.prm_scorer.PRMScorer``),
the ``config.yaml`` a LightningCLI run saved next to its checkpoints, ``python -m hca.pipeline``
commands and scripts name them. :class:`LegacyPathFinder` (installed on ``import hca``) resolves such
a name to the module's new home: ``import hca.rl_batch`` returns *the same module object* as
``import hca.rl.batch`` (one class, one ``isinstance``; pickles of either name load), and
``python -m hca.pipeline`` runs ``hca/workflows/pipeline.py``. An old name warns once, with a
``DeprecationWarning`` (hidden unless warnings are on). New code names the new paths
(tests/test_layout.py fails on an old one inside the package).
"""
from __future__ import annotations

import importlib
import sys

# old dotted name (under hca) -> its home now
MOVED = {
    "problems": "data.problems", "prompts": "data.prompts", "trajectories": "data.trajectories",
    "tasks": "data", "tasks.arithmetic": "data.arithmetic", "regimes": "data.regimes",
    "console": "runtime.console", "progress": "runtime.progress", "loggers": "runtime.loggers",
    "status_file": "runtime.status_file", "strategies": "runtime.strategies", "modules.hparams": "runtime.hparams",
    "seeds": "rollout.seeds", "gguf": "models.gguf", "lora": "models.lora",
    "collect": "collection.labelling", "collect_writer": "collection.writer", "collect_report": "collection.report",
    "prm_model": "prm.model", "prm_scorer": "prm.scorer", "prm_metrics": "prm.metrics",
    "rl_batch": "rl.batch", "ppo": "rl.ppo", "logprobs": "rl.logprobs", "scoring": "rl.scoring",
    "rl_metrics": "rl.metrics",
    "processbench": "evaluation.processbench", "search": "evaluation.search",
    "cli": "workflows.cli", "pipeline": "workflows.pipeline", "recipes": "workflows.recipes",
    "experiment": "workflows.experiment", "report": "workflows.report", "credit_view": "workflows.credit_view",
    "bootstrap": "workflows.bootstrap", "prover_check": "workflows.prover_check",
    "tiny_models": "workflows.tiny_models",
}
# ``hca.models`` and ``hca.evaluation`` were modules and are packages now: their __init__ re-exports the
# old module's names (hca.models.loading, hca.evaluation.policy), so they need no alias.


class _AliasLoader:  # the Loader protocol (no importlib.abc: ``import hca`` stays light)
    """Loads an old name as the new module itself; gives runpy the new file's code for ``python -m``."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        import warnings

        warnings.warn(f"{spec.name} is {self.new} since the layout by stage (docs/layout.md); the old path keeps "
                      "working", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # already executed under its new name
        pass

    def get_code(self, fullname):  # ``python -m hca.<old>``: run the new module's file as __main__
        import importlib.util

        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class LegacyPathFinder:  # the MetaPathFinder protocol
    """``hca.<old>`` -> ``hca.<new>`` for the names in :data:`MOVED`; nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("hca."):
            return None
        new = MOVED.get(fullname[4:])
        if new is None:
            return None
        import importlib.machinery
        import importlib.util

        new = "hca." + new
        real = importlib.util.find_spec(new)
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), origin=real.origin,
                                              is_package=real.submodule_search_locations is not None)
        if real.submodule_search_locations is not None:
            spec.submodule_search_locations = list(real.submodule_search_locations)
        spec.has_location = real.has_location
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import hca`` does)."""
    if not any(isinstance(f, LegacyPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LegacyPathFinder())  # before PathFinder: hca.tasks.<x> must not load twice
