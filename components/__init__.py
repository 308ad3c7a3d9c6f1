"""The Kubeflow components: one module per pipeline step, each a typed component over a plain function.

Each module holds three things, in this order:

- the component function (``data``, ``preprocess``, ``train``, ``quantize``, ``evaluate``,
  ``register``, ``deploy``): its KFP signature (typed ``Input``/``Output`` artifacts and parameters) is the
  step's interface; KFP copies its source into the task, so its body imports what it calls and
  runs it inside ``with step("<name>"):`` (:mod:`components.step`), which maps user errors;
- the plain function the body calls (``train_step``, ...), testable with any object that has
  ``.path`` and ``.metadata``;
- where the step has one, its command line (``python -m components.evaluate``, ``.deploy``;
  ``python -m components.generate`` for the generator). Training's is the library's
  (``python -m toptagger.training``), which a Kubeflow TrainJob runs under torchrun too.

:mod:`pipelines.top_tagging` wires them. Module-level imports stay light (KFP's types): the
container's executor and the pipeline compiler load these modules, and the heavy libraries
(torch, MLflow, kserve) are imported inside the functions that need them.
"""
