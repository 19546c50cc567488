//! Leader election over a coordination.k8s.io Lease.
