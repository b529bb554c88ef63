"""Stage 1 of the method: prover-labeled trajectories (METHOD.md sections 2, 3 and 8.1).

* :mod:`hca.collection.labelling` -- :func:`label_chunk`: policy responses, cut into steps, every prefix
  valued by Monte Carlo rollouts of the prover; :class:`CollectionConfig`.
* :mod:`hca.collection.writer` -- the prediction callback that writes shards atomically and resumes.
* :mod:`hca.collection.report` -- the end-of-collection summary and its progress histogram.

The LightningModule that drives a collection is :class:`hca.modules.collector.CollectorModule`.
"""
