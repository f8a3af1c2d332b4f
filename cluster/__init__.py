"""Topology, launcher, frontend, client, harness, planner, CLI. The only package that imports ray."""
