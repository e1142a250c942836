"""SMP's ``smdistributed.modelparallel.torch.patches`` namespace (``patches.checkpoint``)."""
