"""What the method learns from, and what it writes down (no torch needed except where noted).

* :mod:`hca.data.problems` -- :class:`Problem` and the JSONL problem files (GSM8K, MATH-500, the embedded task).
* :mod:`hca.data.prompts` -- :class:`PromptFormat`: how a problem becomes the prompt a tokenizer sees.
* :mod:`hca.data.arithmetic` -- the embedded synthetic arithmetic task and its generator.
* :mod:`hca.data.regimes` -- the embedded task's regimes (``default``, ``sparse``, ``middle``) and their roots.
* :mod:`hca.data.trajectories` -- the prover-labeled trajectory record, its shards and manifest.
"""
