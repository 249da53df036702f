"""Dagster surface over the core: partitions, resources, assets, checks, sensors, jobs.

Thin and declarative: every decision is made by the core modules it calls.
"""
