"""Model-predictive control: planning actions through a learned dynamics model (GrBAL's MPC controller)."""

from metalight.control.planner import Dynamics, PlannerSettings, Reward, plan, plan_loop

__all__ = ["Dynamics", "PlannerSettings", "Reward", "plan", "plan_loop"]
