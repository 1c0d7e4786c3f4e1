"""One checker per lab: CHECKS (name, what it verifies, hint) and run(ctx, grader)."""
