"""Canary rollouts: the deploy in waves, each gated by the checks; halt, roll back, resume.

`ipvs-fleet rollout inventory/<env>.py` (see cli.py); the waves are data
(the collection role's `policy/rollout.yml`, see config.py); the journal format is in
journal.py.
"""
