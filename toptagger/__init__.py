"""The top tagger's shared library: jets -> images -> model -> metrics, and the stores around them.

Split by concern; nothing here imports Kubeflow or the server, so the pipeline's components, the
predictor, the benchmarks and the OpenCL engine all build on the same pieces:

- :mod:`toptagger.jets`: the reference dataset format, the Pythia8 + FastJet generator, kinematics;
- :mod:`toptagger.images`: ``jet_images``, the one renderer for training, evaluation and serving;
- :mod:`toptagger.model`: the ResNet-50 tagger, its weights apart from its architecture;
- :mod:`toptagger.signature`: the tensors a served tagger takes and returns;
- :mod:`toptagger.training`: the training configuration (one declaration), data and loop;
- :mod:`toptagger.evaluation`: figures of merit, the mass-window baseline, plots and reports;
- :mod:`toptagger.storage` and :mod:`toptagger.model_uri`: local paths, ``s3://``, ``models:/``;
- :mod:`toptagger.registry`: MLflow tracking, the model registry and the promotion gate;
- :mod:`toptagger.deploy`: the KServe InferenceService of a kustomize overlay;
- :mod:`toptagger.constants`, :mod:`toptagger.errors`, :mod:`toptagger.cli`: what all of them share.
"""
