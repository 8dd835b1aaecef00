//! Benchmarks that put ferry beside today's tools in one lab and one run, and keep their
//! results as CSV, JSON and plots.
pub mod cold;
pub mod cpu;
pub mod disk_files;
pub mod heartbeat;
pub mod live;
pub mod live_disk;
pub mod live_disk_native;
pub mod live_disk_report;
pub mod live_native;
pub mod live_report;
pub mod measure;
pub mod plot;
pub mod prober;
pub mod qemu_tls;
pub mod qmp;
pub mod report;
pub mod site_vm;
pub mod sites;
