//! Library side of ferry-guest: what the host needs to understand the guest
//! workload's output. The workload itself is the `ferry-guest-workload`
//! binary (src/main.rs); it is std only and so is everything here.

pub mod disk_record;
