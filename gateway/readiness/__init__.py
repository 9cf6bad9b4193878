"""Release readiness: a checklist that runs, keeps its evidence, and gates promotion (issue 8)."""
