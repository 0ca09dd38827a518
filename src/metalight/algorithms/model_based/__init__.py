"""Model-based meta-learners: read the support set (or a trial's past episodes) as input and predict in one forward pass, with no gradient step at test time (CNPs, SNAIL, RL²)."""
