"""Tasks: problem sources and their verifiers' names (``"arithmetic"``, ``"gsm8k"``, ``"math"``)."""
