"""`python -m epic_ext.train`: config (command line), run.py (the frozen, resolved run), preflight (every check
before DeepSpeed starts), loop (DeepSpeed training, export), checkpoint (save, find, resume). The data readers are
in epic_ext.data, the demo in epic_ext.demo."""
