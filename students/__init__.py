"""Students: OFA stage heads, distillation losses, the distillation task and the training loop."""
