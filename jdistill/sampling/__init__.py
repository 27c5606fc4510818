from jdistill.sampling.samplers import SOLVERS, SolverState, init_state, run_steps, sample, sample_jit

__all__ = ["SOLVERS", "SolverState", "init_state", "run_steps", "sample", "sample_jit"]
