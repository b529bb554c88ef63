"""Stage 2 of the method: the progress reward model (METHOD.md section 4).

* :mod:`hca.prm.model` -- :class:`ProgressRewardModel` (a backbone and a value head), its export and loading.
* :mod:`hca.prm.scorer` -- :class:`PRMScorer`: the export as the RL step's step scorer.
* :mod:`hca.prm.metrics` -- how a PRM is judged: first harmful step F1, soft calibration, pairwise ranking.

The LightningModule that trains it is :class:`hca.modules.prm.PRMModule`; its evaluations at test
time (ProcessBench, best-of-N and beam search) are in :mod:`hca.evaluation`.
"""
