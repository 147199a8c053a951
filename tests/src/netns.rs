//! Network namespaces for NAT topology tests (work in progress).
