"""Training-cost benchmarks: forward FLOPs per image (`flops`) and measured training cost (`train`)."""
