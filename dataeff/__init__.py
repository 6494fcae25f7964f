"""dataeff: data-effective pre-training of medical vision foundation models."""
