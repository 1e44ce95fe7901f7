"""Students: timm models, OFA stage heads, distillation losses and the training loop."""
