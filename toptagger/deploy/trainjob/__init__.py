"""The train step as a Kubeflow Trainer v2.3.0 ``TrainJob``: rendered, run, and printed by hand.

- :mod:`.render`: what the TrainJob is (:func:`~.render.render` from a :class:`~.render.TrainJobShape`,
  the run key and the training flags), where its jets and export are staged, and the GPU pool as
  the compiled pipeline hands it to the launcher (:func:`~.render.pool_flags`);
- :mod:`.run`: the job through the Kubernetes API (:func:`~.run.run_trainjob`: create or find
  again, follow, delete or keep);
- ``python -m toptagger.deploy.trainjob render --nodes N --gpus-per-node G --image IMAGE``
  (:mod:`.__main__`) prints the rendered job for ``kubectl apply -f -``.

The pipeline's launcher (:mod:`components.trainjob`) uses the first two; nothing is imported here,
so that importing one does not load the ``kubernetes`` client or the training config.
"""
