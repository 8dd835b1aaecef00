//! The lab: sites as network namespaces, a user-space WAN emulator between them, guest images.
pub mod control;
pub mod disk_image;
pub mod disk_records;
pub mod embedded;
pub mod forwarder;
pub mod guest;
pub mod guest_image;
pub mod lab;
pub mod link;
pub mod probe;
pub mod qemu;
pub mod stretch;
pub mod synthetic_image;
pub mod sys;
pub mod tamper;
pub mod topology;
pub mod units;
