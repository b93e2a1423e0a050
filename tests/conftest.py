import os

# Triton reads this when a kernel is decorated: set before anything imports nexus_kernels,
# so that kernel tests run the Triton source through the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("NEXUS_BACKEND", None)
