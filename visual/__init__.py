"""Visual analysis: plots, model introspection, the figures and shape-table commands."""
