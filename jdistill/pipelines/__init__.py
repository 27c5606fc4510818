"""End-to-end pipelines built on the Denoiser and the samplers (see docs/pipelines.md)."""

from jdistill.pipelines.prompts import PromptEncoder, family_of, sdxl_time_ids
from jdistill.pipelines.scheduling import (SamplingPlan, UnsupportedSchedulerOption, default_solver, plan,
                                           prediction_type, schedule_from_config)
from jdistill.pipelines.text_to_image import Output, TextToImage

__all__ = ["TextToImage", "Output", "PromptEncoder", "family_of", "sdxl_time_ids", "SamplingPlan", "plan",
           "default_solver", "prediction_type", "schedule_from_config", "UnsupportedSchedulerOption"]
