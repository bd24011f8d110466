"""lm-evaluation-harness task templates that read local files (package data; see graftlm/evaluate/harness.py).

Each YAML here is a task without a `task:` name or a data file: graftlm writes, per language, a task that
`include:`s one of them and names its file (and, for XCOPA, its connectives; for SIB-200, its topics). utils.py
holds the functions the templates name with `!function`.
"""
