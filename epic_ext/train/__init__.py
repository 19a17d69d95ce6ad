"""Training: LLaVA-format data, the EPIC distillation loop and its embedded demo task."""
