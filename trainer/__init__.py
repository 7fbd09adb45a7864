"""Fine-tuning job: Hydra-configured trainer under DeepSpeed ZeRO."""
