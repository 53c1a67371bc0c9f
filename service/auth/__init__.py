"""Authentication (bearer JWTs) and authorization (roles to permissions)."""
