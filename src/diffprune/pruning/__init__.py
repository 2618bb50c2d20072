"""The pieces every pruning method shares: which tensors (targets), how many entries and which
(topk), when (schedule), by what (scorers), and the model that applies a mask (masked)."""
