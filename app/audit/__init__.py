"""The audit log: who did what, in which tenant, from where, with which outcome, when; hash-chained."""
