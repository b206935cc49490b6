"""Worker side (one process per rank): `python -m jupyter_llm.train RUN_DIR`.

Imports nothing from IPython, widgets or Jupyter.
"""
