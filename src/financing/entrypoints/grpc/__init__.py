"""The two gRPC services (Commands, Queries) and what stands beside them on both ports:
health checking, reflection, the request codec."""
