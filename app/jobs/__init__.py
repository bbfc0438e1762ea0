"""Jobs: submitted workflows, their attempts, task results and state changes."""
