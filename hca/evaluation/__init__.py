"""Stage 4 of the method: evaluation of what the stages made.

* :mod:`hca.evaluation.policy` -- a policy on held-out problems: pass@1, unbiased pass@k, maj@k.
* :mod:`hca.evaluation.processbench` -- a PRM on ProcessBench (the earliest wrong step).
* :mod:`hca.evaluation.search` -- a PRM at test time: best-of-N selection and step-level beam search.

``from hca.evaluation import evaluate_policy, pass_at_k, ...`` (the module this package was before
the layout by stage) keeps working: the names of :mod:`hca.evaluation.policy` are re-exported.
"""
from hca.evaluation.policy import (EvalResult, evaluate_policy, majority_correct, pass_at_k,  # noqa: F401
                                   weighted_majority_correct)
