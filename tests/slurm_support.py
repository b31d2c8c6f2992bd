"""Fixtures for end-to-end tests against the real single-node Slurm cluster (tests/cluster/).

OWNER: cluster helper.
"""
