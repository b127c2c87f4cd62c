"""Training: vision-tower attribute pretraining, stage 1 alignment and stage 2 instruction tuning."""
