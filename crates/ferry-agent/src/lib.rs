//! The per-site agent: a TLS listener for other sites' sessions (receiving objects into its data
//! directory) and a unix control socket through which the local CLI asks it to send.
pub mod config;
pub mod control;
pub mod session;
pub mod warm;
pub mod path_probe;
pub mod bbr;
pub mod qmp;
pub mod vm;
pub mod pages;
pub mod migrate;
pub mod nbd;
