"""The LightningModules of the stages (``model:`` in every YAML; thin: the math is in hca.credit and hca.rl).

* :mod:`hca.modules.sft` -- :class:`SFTModule`: the policy and the prover from gold worked solutions.
* :mod:`hca.modules.collector` -- :class:`CollectorModule`: stage 1 as ``trainer.predict``.
* :mod:`hca.modules.prm` -- :class:`PRMModule`: stage 2, the progress PRM.
* :mod:`hca.modules.policy` -- :class:`HCAPolicyModule`: stage 3, RL with the effective advantage
  (GRPO / RLOO / Dr. GRPO at alpha = beta = 0), validated by :mod:`hca.modules.policy_validation`.
"""
