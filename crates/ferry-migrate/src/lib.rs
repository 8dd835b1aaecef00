//! QEMU's outgoing migration stream, split so ferry can carry RAM pages by reference.
