"""Customer fine-tuning: LoRA (and, later, DreamBooth) on a base model, with diffusers + peft."""
