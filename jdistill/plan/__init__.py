"""Pod plans: will a step fit a TPU pod or GPU cluster, answered on this machine by XLA.

A recipe says what it compiles (``Recipe.plan(cfg)`` -> :mod:`jdistill.plan.steps`: the real
train steps of its stages, or the jitted sampler steps of a training-free method), built from
the config alone on abstract arrays: no weights are read and no data set is opened.
:mod:`jdistill.plan.compile` lowers and compiles each step for a mesh of host CPU devices and
reads what XLA reports per device (memory by kind, FLOPs, collectives);
:mod:`jdistill.plan.fit` compares that with an accelerator's memory and says what would make
it fit; :mod:`jdistill.plan.run` is ``jdistill plan``: the compile in a subprocess with as many
CPU devices as the mesh, then JSON + Markdown reports.

Importing this package imports nothing heavy: recipes import :mod:`jdistill.plan.steps` only.
"""
