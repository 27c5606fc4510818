"""Guided (progressive) distillation of the digits FLOW teacher: configs/digits_guided.py with
configs/digits_flow_teacher.py as the teacher. Its students are the "progressive" rows of the LADD
table (one teacher, every method): the same DDIM halvings, which on a rectified-flow schedule
(a = 1 - t, s = t) are Euler steps on the unit grid t = i / N.

    jdistill distill --config configs/digits_flow_guided.py --workdir runs/digits_flow_guided
    jdistill ladd-table --workdir runs/digits_ladd --compare progressive=runs/digits_flow_guided
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "digits_guided", os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_guided.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.teacher.workdir = "runs/digits_flow_teacher"
    c.teacher.config = "configs/digits_flow_teacher.py"
    return c
