"""Protocols that train on top of a pre-trained run: evaluating a run, the SGD linear protocol, fine-tuning, distillation, and the labelled loop they share (also the supervised baseline)."""
