//! Benchmarks that put ferry beside today's tools in one lab and one run, and keep their
//! results as CSV, JSON and plots.
pub mod cold;
pub mod plot;
pub mod report;
pub mod sites;
