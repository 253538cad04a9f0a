"""Evaluators of a trained run, used by `python -m instdisc_jax.evaluate`.

Each evaluator is a small object built from what it needs (a `features.FeatureCache` around the
run's embedding function, the splits, a few settings) and knows nothing of the training loop;
`run(state) -> dict` evaluates a train state (`restore.open_run` restores one from a workdir):

* `knn_sweep.KnnSweep`: weighted kNN for several (k, tau) from one neighbour search, on the
  memory bank and on recomputed features;
* `linear_probe.LinearProbe`: softmax regression on the frozen embedding and pooled features;
* `semi_supervised.SemiSupervised`: fine-tuning on 1 % / 10 % of the labels;
* `export.Export`: features, labels and indices to .npz;
* `pictures.RetrievalGrid`, `pictures.TrainingCurves`: the retrieval grid and Fig. 4.

`features.FeatureCache` extracts each split's features once for all of them; `config` defines
`--config.eval.*`.
"""
