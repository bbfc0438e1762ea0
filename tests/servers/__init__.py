"""Fixtures that start real servers (Valkey, MariaDB, sshd, HTTP) on loopback for the test suite."""
