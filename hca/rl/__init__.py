"""Stage 3 of the method: RL with the effective advantage (METHOD.md sections 5-8.3).

* :mod:`hca.rl.batch` -- :class:`RLBatch`: sampled groups, verified, cut into steps and credited
  (:class:`CreditConfig` names the credit; the math is :mod:`hca.credit`).
* :mod:`hca.rl.scoring` -- step scorers at RL time: none, a callable, online Monte Carlo (the PRM's is
  :class:`hca.prm.scorer.PRMScorer`).
* :mod:`hca.rl.logprobs` -- teacher-forced log-probs and entropies, with gradients.
* :mod:`hca.rl.ppo` -- the clipped update over mini- and micro-batches (:class:`PPOConfig`).
* :mod:`hca.rl.metrics` -- what an RL step logs about its batch.

The LightningModule is :class:`hca.modules.policy.HCAPolicyModule`.
"""
