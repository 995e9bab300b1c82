"""Delivering bodies to clients: the spool that frees a slow client's upstream connection."""
