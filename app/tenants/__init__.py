"""Tenants and their projects: the walls every other object lives inside."""
