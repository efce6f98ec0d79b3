"""Fault injection: the service under kills, outages, redelivery storms and hostile input."""
