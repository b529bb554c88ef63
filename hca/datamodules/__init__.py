"""The LightningDataModules of the stages (``data:`` in every YAML), and how their loaders resume and shard.

* :mod:`hca.datamodules.sft` -- :class:`SFTDataModule`: problems with gold worked solutions, tokenized.
* :mod:`hca.datamodules.problems` -- :class:`ProblemChunkDataModule`: problems in fixed chunks for collection.
* :mod:`hca.datamodules.trajectories` -- :class:`TrajectoryDataModule`: the prover-labeled trajectories as
  PRM training examples, length-bucketed (:mod:`hca.datamodules.bucketing`).
* :mod:`hca.datamodules.rl_problems` -- :class:`ProblemDataModule`: batches of problems for RL steps.
* :mod:`hca.datamodules.resumable` -- shuffled loaders that resume mid-epoch exactly.
* :mod:`hca.datamodules.sharding` -- which rank does what, and gathering what each measured.
"""
