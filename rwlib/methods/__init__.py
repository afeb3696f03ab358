"""One module per paper: ``rwlib.methods.<slug>`` holds that paper's method and nothing else."""
