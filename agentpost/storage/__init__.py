"""Persistence. The only package that speaks SQL or knows txpostgres exists."""
