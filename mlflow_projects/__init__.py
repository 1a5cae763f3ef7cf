"""Thin MLflow glue: one module per MLproject entry point (parse, open run, call the libraries, log)."""
