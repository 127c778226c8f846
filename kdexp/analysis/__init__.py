"""Turning results.json files into numbers a thesis can print: statistics, tables, figures, the report."""
