"""The deterministic fault simulator: the real engine on virtual time against a simulated site.

``watchtower sim`` runs it over many random fault sequences (or one hand-written script) and
scores every page against the ground truth; see :mod:`watchtower.sim.score` for the rules.
"""
