//! End-to-end tests and benchmarks of vmbackup live in tests/ and benches/.
