"""Compiler passes: one file per pass, each with one entry function (see backend.PASSES)."""
