//! The lab: sites as network namespaces, a user-space WAN emulator between them, guest images.
pub mod disk_image;
