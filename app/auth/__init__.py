"""Authentication and authorization: JWT bearer tokens carrying tenant, project and role."""
