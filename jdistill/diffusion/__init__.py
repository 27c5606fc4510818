"""The mathematics of diffusion, with no model code: schedules, parameterisations,
guidance, time grids and single solver steps."""

from jdistill.diffusion.guidance import cfg, meng_w_from_scale, scale_from_meng_w
from jdistill.diffusion.parameterization import from_x0_eps, to_x0_eps
from jdistill.diffusion.schedules import CosineVP, DiscreteVP, RectifiedFlow, shift_time
from jdistill.diffusion.timesteps import TimeGrid, make_grid

__all__ = [
    "CosineVP", "DiscreteVP", "RectifiedFlow", "TimeGrid", "cfg", "from_x0_eps", "make_grid",
    "meng_w_from_scale", "scale_from_meng_w", "shift_time", "to_x0_eps",
]
