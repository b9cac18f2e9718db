"""World facts: ranks, nodes, the environment table, launching and aborting."""
