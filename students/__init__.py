"""Students: timm models, OFA stage heads, distillation losses and the training loop."""

from students import zoo  # noqa: F401  (registers the small MLP students with timm)
