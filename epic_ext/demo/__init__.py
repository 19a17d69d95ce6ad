"""The demo: EPIC on a tiny LLaVA that knows a generated visual QA task, on a CPU in minutes.

- `python -m epic_ext.demo` (`make demo`): the zero-shot drop under compression, a short EPIC run through the real
  training path, the recovery, costs and a plot (pipeline.py);
- task.py: the shapes task and its offline processor;
- `python -m epic_ext.demo.model` (`make demo-model`): how the committed demo model (DEMO_MODEL_DIR) was made;
- stages.py: the staged, cached runner shared by the demo model and bench/ablation.py.
"""

from .pipeline import ASSET_DIR as DEMO_MODEL_DIR

__all__ = ["DEMO_MODEL_DIR"]
