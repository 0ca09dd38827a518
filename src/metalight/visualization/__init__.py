"""What a researcher looks at: image tasks and their predictions (images), regression fits (regression), navigation trajectories (navigation), per-step charts and event files (charts)."""

from metalight.visualization.charts import AccuracyCharts, inner_step_accuracy, read_scalars, tensorboard_writer
from metalight.visualization.images import ATTENTION_LEGEND, LEGEND, LEGEND_NO_ADAPTATION, ValidationTaskImage, attention_grid, query_predictions, show_task, task_grid, unnormalize
from metalight.visualization.navigation import NavigationTrajectories, adapted_trajectories, plot_trajectories
from metalight.visualization.regression import RegressionFits, adapted_fits, plot_fits, plot_mse_per_step

__all__ = [
    "ATTENTION_LEGEND", "LEGEND", "LEGEND_NO_ADAPTATION", "AccuracyCharts", "NavigationTrajectories", "RegressionFits", "adapted_trajectories", "plot_trajectories", "ValidationTaskImage", "adapted_fits", "attention_grid", "inner_step_accuracy",
    "plot_fits", "plot_mse_per_step", "query_predictions", "read_scalars", "show_task", "task_grid", "tensorboard_writer", "unnormalize",
]
