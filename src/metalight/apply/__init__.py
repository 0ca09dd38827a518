"""A trained learner applied: FewShotLearner (adapt, predict), predict.py, eval.py and scoring fixed episodes."""
