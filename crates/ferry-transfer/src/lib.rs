//! The transfer engine: what a sender announces, what a receiver already holds, and moving only
//! the difference over a receiver-driven, content-addressed protocol (crate ferry-proto).
pub mod catalog;
pub mod compress;
pub mod local;
pub mod manifest;
pub mod priority;
pub mod progress;
pub mod receiver;
pub mod scan;
pub mod sender;
pub mod staging;
pub mod wire;
