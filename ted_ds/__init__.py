"""ted-ds: task-aware layer-wise distillation (TED) of causal LMs on DeepSpeed ZeRO-3."""
