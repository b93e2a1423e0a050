from nexus.training.gradient_methods import (ActivationOffloader, CheckpointPolicy, MemoryConfig,  # noqa: F401
                                             SelectiveCheckpoint, SelectiveCheckpointConfig,
                                             apply_selective_checkpointing)
