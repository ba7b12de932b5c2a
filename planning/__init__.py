"""GPU memory and time plans for training and previews, measured on fake tensors without a GPU."""
