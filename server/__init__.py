"""Scalarium server: API, orchestration, jobs, providers, PKI and CLI."""
