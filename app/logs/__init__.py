"""Job logs: lines shipped by agents, stored with the job, forwarded to Quickwit, and searched per tenant."""
